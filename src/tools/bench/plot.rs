//! The TTFT chart of `kvgate bench` and `compare`: one CDF line per run, as SVG, rasterized to
//! PNG with the system's fonts when the file name asks for it.

use anyhow::{Context, bail};

/// Writes the TTFT chart (titled after `what` was run) as SVG or PNG, by the file's extension.
pub(super) fn write_plot(path: &std::path::Path, what: &str, series: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
    let svg = ttft_cdf_svg(what, series);
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

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A number of ms as a short label: `0.35`, `4.2`, `120`, `2,400`.
fn ms_label(v: f64) -> String {
    if (10.0..1000.0).contains(&v) && (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if v >= 1000.0 {
        let n = v.round() as u64;
        let (k, r) = (n / 1000, n % 1000);
        format!("{k},{r:03}")
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Ticks of a log axis over `[lo, hi]`: the 1-2-5 values within it, or its ends when fewer than
/// three fall inside.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powi(lo.log10().floor() as i32);
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                ticks.push(v);
            }
        }
        decade *= 10.0;
    }
    if ticks.len() < 3 {
        ticks = vec![lo, (lo * hi).sqrt(), hi];
    }
    ticks
}

/// Overlaid TTFT CDFs, one line per named series of sorted samples (ms), on a log time axis
/// fitted to the data, with each series' p50, p90 and p99 marked and written in.
pub(super) fn ttft_cdf_svg(what: &str, series: &[(String, Vec<f64>)]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const L: f64 = 64.0;
    const R: f64 = 24.0;
    const T: f64 = 44.0;
    const B: f64 = 48.0;
    const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];
    let all: Vec<f64> = series.iter().flat_map(|(_, s)| s.iter().copied()).filter(|x| *x > 0.0).collect();
    let min = all.iter().copied().fold(f64::INFINITY, f64::min);
    let max = all.iter().copied().fold(0.0, f64::max);
    // The range the samples span, with a margin; a single value gets a decade around it.
    let (lo, hi) = if all.is_empty() {
        (1.0, 1000.0)
    } else if max / min < 1.5 {
        (min / 3.0, max * 3.0)
    } else {
        (min / 1.25, max * 1.25)
    };
    let (llo, lhi) = (lo.log10(), hi.log10());
    let x = |v: f64| L + (v.max(lo).log10() - llo) / (lhi - llo) * (W - L - R);
    let y = |p: f64| H - B - p * (H - B - T);
    let n_total: usize = series.iter().map(|(_, s)| s.len()).sum();
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">Time to first token: {} ({n_total} requests)</text>
<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">time to first token (ms, log scale)</text>
<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">fraction of requests at or below</text>
"#,
        W / 2.0,
        esc(what),
        H - B,
        W - R,
        H - B,
        H - B,
        (L + W - R) / 2.0,
        H - 10.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0,
    );
    for v in log_ticks(lo, hi) {
        out.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{T}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">{3}</text>\n",
            x(v),
            H - B + 5.0,
            H - B + 18.0,
            ms_label(v)
        ));
    }
    for p in [0.0, 0.25, 0.5, 0.75, 0.9, 1.0] {
        out.push_str(&format!(
            "<line x1=\"{L}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#eee\"/><text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{p}</text>\n",
            y(p),
            W - R,
            L - 6.0,
            y(p) + 4.0
        ));
    }
    for (k, (name, samples)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let n = samples.len().max(1) as f64;
        let points: Vec<String> =
            samples.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(*v), y((i + 1) as f64 / n))).collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\">{} ({} requests)</text>\n",
            points.join(" "),
            L + 10.0,
            T + 14.0 + 16.0 * k as f64,
            esc(name),
            samples.len()
        ));
        if samples.is_empty() {
            continue;
        }
        for p in [0.5, 0.9, 0.99] {
            let v = super::percentile(samples, p);
            let (px, py) = (x(v), y(p));
            // Labels sit left of the point near the right edge, right of it elsewhere.
            let (dx, anchor) = if px > W - R - 120.0 { (-7.0, "end") } else { (7.0, "start") };
            out.push_str(&format!(
                "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3.5\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\" text-anchor=\"{anchor}\">p{} {} ms</text>\n",
                px + dx,
                py + 4.0 + 13.0 * k as f64,
                (p * 100.0).round() as u32,
                ms_label(v)
            ));
        }
    }
    out.push_str("</svg>\n");
    out
}
