//! The TTFT chart of `kvgate bench` and `compare`: one CDF line per run, as SVG, rasterized to
//! PNG with the system's fonts when the file name asks for it.

use anyhow::{Context, bail};

/// Writes the TTFT chart as SVG or PNG, by the file's extension.
pub(super) fn write_plot(path: &std::path::Path, series: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
    let svg = ttft_cdf_svg(series);
    let bytes = match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => svg.into_bytes(),
        Some("png") => svg_to_png(&svg)?,
        _ => bail!("--plot writes SVG or PNG; name the file *.svg or *.png"),
    };
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Rasterizes a chart at twice its size. Labels use the system's fonts; without any, the lines
/// are still drawn.
pub(super) fn svg_to_png(svg: &str) -> anyhow::Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    // The chart asks for `sans-serif`; map it to an installed sans face (else any face).
    let family = |pred: &dyn Fn(&str) -> bool| {
        db.faces().flat_map(|f| f.families.iter()).map(|(name, _)| name.clone()).find(|n| pred(n))
    };
    if let Some(name) = family(&|n| n.contains("Sans") && !n.contains("Mono")).or_else(|| family(&|_| true)) {
        db.set_sans_serif_family(name.clone());
        opt.font_family = name;
    }
    let tree = usvg::Tree::from_str(svg, &opt).context("rendering the plot")?;
    let size = tree.size().to_int_size();
    let mut pixmap =
        tiny_skia::Pixmap::new(size.width() * 2, size.height() * 2).context("rendering the plot: empty image")?;
    resvg::render(&tree, tiny_skia::Transform::from_scale(2.0, 2.0), &mut pixmap.as_mut());
    pixmap.encode_png().context("encoding the plot as PNG")
}

/// Overlaid TTFT CDFs, one line per named series of sorted samples (ms), log-scaled time axis.
pub(super) fn ttft_cdf_svg(series: &[(String, Vec<f64>)]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const L: f64 = 60.0;
    const B: f64 = 40.0;
    const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];
    let all: Vec<f64> = series.iter().flat_map(|(_, s)| s.iter().copied()).filter(|x| *x > 0.0).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1e-3);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    let (llo, lhi) = (lo.log10().floor(), hi.log10().ceil());
    let x = |v: f64| L + (v.max(1e-9).log10() - llo) / (lhi - llo) * (W - L - 20.0);
    let y = |p: f64| H - B - p * (H - B - 20.0);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{L}" y1="20" x2="{L}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">time to first token (ms, log scale)</text>
<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">fraction of requests</text>
"#,
        H - B,
        W - 20.0,
        H - B,
        H - B,
        (L + W - 20.0) / 2.0,
        H - 8.0,
        H / 2.0,
        H / 2.0
    );
    for d in llo as i32..=lhi as i32 {
        let v = 10f64.powi(d);
        out.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{3}\" text-anchor=\"middle\">{v}</text>\n",
            x(v),
            20.0,
            H - B,
            H - B + 16.0
        ));
    }
    for p in [0.5, 0.9, 0.99] {
        out.push_str(&format!(
            "<line x1=\"{L}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#eee\"/><text x=\"{2}\" y=\"{0:.1}\" text-anchor=\"end\">p{3}</text>\n",
            y(p),
            W - 20.0,
            L - 4.0,
            (p * 100.0) as u32
        ));
    }
    for (k, (name, samples)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let n = samples.len().max(1) as f64;
        let points: Vec<String> =
            samples.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(*v), y((i + 1) as f64 / n))).collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>\n",
            points.join(" "),
            L + 10.0,
            34.0 + 16.0 * k as f64,
            name.replace('&', "&amp;").replace('<', "&lt;")
        ));
    }
    out.push_str("</svg>\n");
    out
}
