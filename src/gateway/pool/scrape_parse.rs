//! A Prometheus text parser that reads only the vLLM families routing needs.
//!
//! One pass over the text; lines of other families are skipped after comparing their name, so a
//! 100 KB exposition with hundreds of histogram buckets costs a few microseconds. A malformed
//! line of a family we read, or a response with none of the load gauges, is an error.

use std::collections::BTreeMap;

/// What one engine (one `engine` label value) reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct EngineScrape {
    /// `vllm:num_requests_running`.
    pub running: Option<f64>,
    /// `vllm:num_requests_waiting`.
    pub waiting: Option<f64>,
    /// `vllm:kv_cache_usage_perc` (or the older `vllm:gpu_cache_usage_perc`).
    pub kv_usage: Option<f64>,
    /// `block_size` label of `vllm:cache_config_info`.
    pub block_size: Option<u64>,
    /// `num_gpu_blocks` label of `vllm:cache_config_info`.
    pub num_gpu_blocks: Option<u64>,
}

/// The newest `vllm:lora_requests_info` series.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LoraScrape {
    /// `running_lora_adapters`.
    pub running: Vec<String>,
    /// `waiting_lora_adapters`.
    pub waiting: Vec<String>,
    /// `max_lora`.
    pub max_loras: u32,
    /// The series value (unix time of its last update).
    pub updated: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Scrape {
    /// Per `engine` label value (`""` when the series have no `engine` label).
    pub engines: BTreeMap<String, EngineScrape>,
    /// LoRA state, when the endpoint serves adapters.
    pub lora: Option<LoraScrape>,
}

impl Scrape {
    /// The engine for data-parallel rank `rank`: its own series if present, else the only one.
    pub(crate) fn engine(&self, rank: Option<u32>) -> Option<&EngineScrape> {
        if let Some(r) = rank
            && let Some(e) = self.engines.get(&r.to_string())
        {
            return Some(e);
        }
        match self.engines.len() {
            1 => self.engines.values().next(),
            _ => self.engines.get("0").or_else(|| self.engines.get("")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Running,
    Waiting,
    KvUsage,
    CacheConfig,
    Lora,
}

fn family(name: &str) -> Option<Family> {
    match name {
        "vllm:num_requests_running" => Some(Family::Running),
        "vllm:num_requests_waiting" => Some(Family::Waiting),
        "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => Some(Family::KvUsage),
        "vllm:cache_config_info" => Some(Family::CacheConfig),
        "vllm:lora_requests_info" => Some(Family::Lora),
        _ => None,
    }
}

/// Why a scrape gave no usable load.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ScrapeError {
    /// The endpoint could not be asked (connect, handshake, HTTP status, body).
    #[error("{0}")]
    Transport(String),
    /// No answer within the scrape's bound.
    #[error("timed out after {0:?}")]
    TimedOut(std::time::Duration),
    /// No answer at all: asked, asked again on a new connection, and still unanswered this long
    /// after the first question went out (at `asked_ms` on the pool's clock).
    #[error("no answer in {waited_ms} ms")]
    Silent {
        /// When the first question went out.
        asked_ms: u64,
        /// How long it went unanswered.
        waited_ms: u64,
    },
    /// A line of the exposition is not valid.
    #[error("line {line}: {detail}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// The exposition has no running/waiting series.
    #[error("no vllm:num_requests_running / vllm:num_requests_waiting series")]
    NoLoadSeries,
    /// A rank pinned by header is not among the engines the metrics report.
    #[error("the metrics show no engine \"{0}\"")]
    NoEngine(String),
}

/// A series' labels, in order.
type Labels<'a> = Vec<(&'a str, String)>;

/// Parses `{k="v",…}`, returning the labels and the rest of the line.
fn labels(s: &str) -> Result<(Labels<'_>, &str), &'static str> {
    let Some(mut rest) = s.strip_prefix('{') else { return Ok((Vec::new(), s)) };
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((out, r));
        }
        let (key, r) = rest.split_once('=').ok_or("label without `=`")?;
        let r = r.strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated escape"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        out.push((key.trim(), value));
        rest = &r[end + 1..];
    }
}

/// A sample's value; `None` for `NaN`, which the exposition format allows and which says the
/// value is unknown (the sample is read as absent, not as an error).
fn value(s: &str, line: usize) -> Result<Option<f64>, ScrapeError> {
    let bad = |detail: String| ScrapeError::Malformed { line, detail };
    let v = s.split_whitespace().next().ok_or_else(|| bad("no value".into()))?;
    let x: f64 = v.parse().map_err(|_| bad(format!("bad value `{v}`")))?;
    Ok((!x.is_nan()).then_some(x))
}

/// Parses an exposition, keeping only the families routing reads.
pub(crate) fn parse(text: &str) -> Result<Scrape, ScrapeError> {
    let mut out = Scrape::default();
    let mut lora_best = f64::NEG_INFINITY;
    for (n, line) in text.lines().enumerate() {
        if !line.starts_with("vllm:") {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let Some(fam) = family(&line[..name_end]) else { continue };
        let err = |detail: String| ScrapeError::Malformed { line: n + 1, detail };
        let (labels, rest) = labels(&line[name_end..]).map_err(|e| err(e.into()))?;
        let Some(v) = value(rest, n + 1)? else { continue };
        let label = |k: &str| labels.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_str());
        let engine = label("engine").unwrap_or("").to_owned();
        let gauge = |v: f64| if v < 0.0 { Err(err(format!("negative value {v}"))) } else { Ok(v) };
        match fam {
            Family::Running => out.engines.entry(engine).or_default().running = Some(gauge(v)?),
            Family::Waiting => out.engines.entry(engine).or_default().waiting = Some(gauge(v)?),
            Family::KvUsage => out.engines.entry(engine).or_default().kv_usage = Some(gauge(v)?.min(1.0)),
            Family::CacheConfig => {
                let num = |k: &str| label(k).and_then(|s| s.parse::<u64>().ok());
                let e = out.engines.entry(engine).or_default();
                e.block_size = num("block_size");
                e.num_gpu_blocks = num("num_gpu_blocks");
            }
            Family::Lora if v >= lora_best => {
                lora_best = v;
                let list = |k: &str| -> Vec<String> {
                    label(k)
                        .unwrap_or("")
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                };
                out.lora = Some(LoraScrape {
                    running: list("running_lora_adapters"),
                    waiting: list("waiting_lora_adapters"),
                    max_loras: label("max_lora").and_then(|m| m.parse().ok()).unwrap_or(0),
                    updated: v,
                });
            }
            Family::Lora => {}
        }
    }
    if !out.engines.values().any(|e| e.running.is_some() && e.waiting.is_some()) {
        return Err(ScrapeError::NoLoadSeries);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4375
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1.523584e+06
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_cpu_blocks="None",num_gpu_blocks="29067"} 1.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora,chat-lora",waiting_lora_adapters=""} 1.7395575723949368e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.6e+09
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.04",model_name="m"} 210.0
"#;

    #[test]
    fn reads_the_routing_families() {
        let s = parse(SAMPLE).expect("parses");
        let e = s.engine(None).expect("engine 0");
        assert_eq!((e.running, e.waiting, e.kv_usage), (Some(12.0), Some(3.0), Some(0.4375)));
        assert_eq!((e.block_size, e.num_gpu_blocks), (Some(16), Some(29067)));
        let l = s.lora.expect("lora");
        assert_eq!(l.running, ["sql-lora", "chat-lora"], "the newest series wins");
        assert!(l.waiting.is_empty());
        assert_eq!(l.max_loras, 4);
    }

    #[test]
    fn older_names_ranks_and_label_order() {
        let text = "vllm:num_requests_running{model_name=\"m\",engine=\"1\"} 2\n\
                    vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 5 1700000000000\n\
                    vllm:gpu_cache_usage_perc{engine=\"1\"} 1.5\n\
                    vllm:num_requests_running{engine=\"0\"} 7\n\
                    vllm:num_requests_waiting{engine=\"0\"} 0\n";
        let s = parse(text).expect("parses");
        let e1 = s.engine(Some(1)).expect("rank 1");
        assert_eq!((e1.running, e1.waiting, e1.kv_usage), (Some(2.0), Some(5.0), Some(1.0)));
        assert_eq!(s.engine(Some(0)).and_then(|e| e.running), Some(7.0));
        assert_eq!(s.engine(None).and_then(|e| e.running), Some(7.0), "no rank: engine 0");
        let unlabeled = parse("vllm:num_requests_running 1\nvllm:num_requests_waiting 2\n").expect("parses");
        assert_eq!(unlabeled.engine(Some(3)).and_then(|e| e.waiting), Some(2.0));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let check = |text: &str| assert!(parse(text).is_err(), "{text:?} parsed");
        check("");
        check("<html>502 Bad Gateway</html>");
        check("vllm:num_requests_running{engine=\"0\"} twelve\nvllm:num_requests_waiting 1\n");
        check("vllm:num_requests_running{engine=\"0} 1\n");
        check("vllm:num_requests_running{engine=\"0\"} NaN\nvllm:num_requests_waiting 1\n");
        // NaN is a valid sample meaning "unknown": read as absent, so a NaN load series leaves
        // the endpoint without load (an error above), while a NaN elsewhere is no error.
        let nan_kv = parse("vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc NaN\n")
            .expect("a NaN KV usage sample is valid");
        assert_eq!(nan_kv.engine(None).map(|e| (e.running, e.kv_usage)), Some((Some(1.0), None)));
        check("vllm:num_requests_running -1\nvllm:num_requests_waiting 1\n");
        check("vllm:num_requests_running{engine=\"0\"} 1\n"); // truncated: no waiting
        check("vllm:num_requests_running{engine=\"0\"} 1\nvllm:num_requests_waiting{engine=");
        // Arbitrary bytes never panic.
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..2000 {
            let len = rng.usize(0..200);
            let s: String =
                (0..len).map(|_| *rng.choice(b"vllm:_num{}=\",\\ 0.1e\n#abc").expect("alphabet") as char).collect();
            let _ = parse(&s);
        }
    }

    proptest::proptest! {
        /// `/metrics` bodies are untrusted: exposition-shaped text never makes the parser panic,
        /// and what it accepts has non-negative, finite-or-capped load figures.
        #[test]
        fn exposition_shaped_text_never_panics(
            lines in proptest::collection::vec(
                r#"(vllm:(num_requests_running|num_requests_waiting|kv_cache_usage_perc|cache_config_info|lora_requests_info)|# HELP x|junk)(\{((engine|block_size|num_gpu_blocks|max_lora|running_lora_adapters)="[0-9a-z,\\"]{0,6}",?){0,3}\}?)? ?(-?[0-9]{0,3}(\.[0-9]{0,2})?|NaN|\+Inf|-Inf|x)?( [0-9]{0,13})?"#,
                0..12,
            ),
        ) {
            let text = lines.join("\n");
            if let Ok(s) = parse(&text) {
                for e in s.engines.values() {
                    proptest::prop_assert!(e.running.is_none_or(|v| v >= 0.0));
                    proptest::prop_assert!(e.waiting.is_none_or(|v| v >= 0.0));
                    proptest::prop_assert!(e.kv_usage.is_none_or(|v| (0.0..=1.0).contains(&v)));
                }
            }
        }
    }
}
