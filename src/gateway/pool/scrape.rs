//! The scrape loop of one endpoint: `/metrics` every interval (jittered), `/v1/models` now and
//! then, each bounded in time and size, results handed to the pool. A dead or garbled endpoint
//! only ever costs its own task.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};

use super::scrape_parse::{self, ScrapeError};
use super::{PoolSettings, WeakPool, now_ms};
use crate::gateway::tasks::{Task, Tasks};

/// The `name[]` filter of the families routing reads.
/// (`name[]=vllm:…`, percent-encoded.)
const SCRAPED_FAMILIES: &str = "name%5B%5D=vllm%3Anum_requests_running&name%5B%5D=vllm%3Anum_requests_waiting\
    &name%5B%5D=vllm%3Akv_cache_usage_perc&name%5B%5D=vllm%3Agpu_cache_usage_perc\
    &name%5B%5D=vllm%3Acache_config_info&name%5B%5D=vllm%3Alora_requests_info";

/// What an endpoint's `/v1/models` lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Served {
    /// Base models (entries without a `parent`).
    pub(crate) bases: Vec<String>,
    /// LoRA adapters (entries with a `parent`).
    pub(crate) adapters: Vec<String>,
    /// The `max_model_len` each entry reports (vLLM's extension of OpenAI's model object).
    pub(crate) max_model_len: Vec<(String, u64)>,
}

/// The models of a `/v1/models` body; `None` when it is not a model list.
pub(crate) fn served_of(models_json: &str) -> Option<Served> {
    let v = serde_json::from_str::<serde_json::Value>(models_json).ok()?;
    let mut out = Served::default();
    for m in v["data"].as_array()? {
        let Some(id) = m["id"].as_str().filter(|id| !id.is_empty()) else { continue };
        let list = if m.get("parent").is_some_and(|p| !p.is_null()) { &mut out.adapters } else { &mut out.bases };
        list.push(id.to_owned());
        if let Some(len) = m["max_model_len"].as_u64() {
            out.max_model_len.push((id.to_owned(), len));
        }
    }
    Some(out)
}

fn transport(message: String) -> ScrapeError {
    ScrapeError::Transport(message)
}

/// One endpoint's own keep-alive connection: a scraper asks one question at a time, so it
/// needs no connection pool (and none of its lookups and locks, twenty times a second).
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    _driver: Task,
}

impl Conn {
    async fn open(addr: SocketAddr, owner: &Tasks) -> Result<Self, ScrapeError> {
        let stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|e| transport(format!("connect failed: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| transport(format!("handshake failed: {e}")))?;
        let driver = owner.spawn("scrape connection", async move {
            let _ = conn.await;
        });
        Ok(Self { sender, _driver: driver })
    }

    /// GETs `path`; the body as text if it is a 200 within `max_bytes`.
    async fn get(&mut self, addr: SocketAddr, path: &str, max_bytes: usize) -> Result<String, ScrapeError> {
        self.sender.ready().await.map_err(|e| transport(format!("connection lost: {e}")))?;
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Empty::new())
            .map_err(|e| transport(format!("bad request: {e}")))?;
        let resp = self.sender.send_request(req).await.map_err(|e| transport(format!("request failed: {e}")))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| transport(format!("reading the body failed: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(transport(format!("HTTP {status}")));
        }
        String::from_utf8(body.to_vec()).map_err(|_| transport("the body is not UTF-8".into()))
    }
}

/// A GET on the scraper's connection (opened or reopened as needed, its driver spawned through
/// `owner`), bounded by `timeout`.
async fn get(
    conn: &mut Option<Conn>,
    owner: &Tasks,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    max_bytes: usize,
) -> Result<String, ScrapeError> {
    let work = async {
        if conn.is_none() {
            *conn = Some(Conn::open(addr, owner).await?);
        }
        match conn.as_mut() {
            Some(c) => c.get(addr, path, max_bytes).await,
            None => Err(transport("no connection".into())),
        }
    };
    let result = tokio::time::timeout(timeout, work).await.unwrap_or(Err(ScrapeError::TimedOut(timeout)));
    if result.is_err() {
        // Never reuse a connection that failed or may still carry an unread answer.
        *conn = None;
    }
    result
}

/// A question to the endpoint, told apart from silence: one unanswered within the scrape's bound
/// is asked again on a new connection (the kept-alive one may be half-open: a new one to a
/// server that is gone is refused at once), within what is left of `unresponsive` since the
/// first went out; still unanswered, the endpoint is [`ScrapeError::Silent`].
async fn ask(
    conn: &mut Option<Conn>,
    owner: &Tasks,
    addr: SocketAddr,
    path: &str,
    s: &PoolSettings,
) -> Result<String, ScrapeError> {
    let (asked, asked_ms) = (Instant::now(), now_ms());
    let first = get(conn, owner, addr, path, s.scrape_timeout, s.max_scrape_bytes).await;
    let Err(ScrapeError::TimedOut(_)) = first else { return first };
    let left = s.unresponsive.saturating_sub(asked.elapsed());
    let again = if left.is_zero() { first } else { get(conn, owner, addr, path, left, s.max_scrape_bytes).await };
    match again {
        Err(ScrapeError::TimedOut(_)) => {
            Err(ScrapeError::Silent { asked_ms, waited_ms: asked.elapsed().as_millis() as u64 })
        }
        answer => answer,
    }
}

/// Time until the next scrape round. Every endpoint's scraper wakes on the same rounds, so a
/// hundred scrapes cost one wake-up of the runtime rather than a hundred; each round is shifted
/// by up to 20% of the interval, by an amount that differs per round and per kvgate process, so
/// replicas of kvgate do not scrape in lockstep.
pub(super) fn next_round(interval: Duration, now: u64) -> Duration {
    static SEED: OnceLock<u64> = OnceLock::new();
    let seed = *SEED.get_or_init(|| fastrand::u64(..));
    let step = (interval.as_millis() as u64).max(1);
    let round = now / step + 1;
    let jitter = xxhash_rust::xxh3::xxh3_64_with_seed(&round.to_le_bytes(), seed) % (step / 5).max(1);
    Duration::from_millis(round * step + jitter - now)
}

/// Whether a scraped engine's load is what kvgate has in flight there (`own` requests): its
/// running + waiting requests within 2 or a quarter. Otherwise someone else loads it, or it
/// restarted, and it is scraped faster until they agree again.
pub(super) fn explained(engine: &scrape_parse::EngineScrape, own: u64) -> bool {
    let scraped = engine.running.unwrap_or(0.0) + engine.waiting.unwrap_or(0.0);
    let own = own as f64;
    (scraped - own).abs() <= (own / 4.0).max(2.0)
}

/// Scrapes one endpoint until its pool drops it; its connection's driver is spawned through
/// `owner`.
pub(super) async fn run(pool: WeakPool, serial: u64, addr: SocketAddr, owner: Tasks) {
    // Ask only for the families routing reads: prometheus_client (vLLM's exporter) honours
    // `name[]`, which cuts a busy server's exposition from tens of kilobytes to one; a server
    // that ignores it still answers with everything.
    let metrics_path = format!("/metrics?{SCRAPED_FAMILIES}");
    let mut conn: Option<Conn> = None;
    let mut next_models = Instant::now();
    // After a failed model list: 1 s, doubling up to `models_refresh` (a server that refuses
    // `/v1/models`, behind an API key say, is not asked twenty times a second).
    let mut models_backoff = Duration::from_secs(1);
    loop {
        let Some(inner) = pool.upgrade() else { return };
        let s = inner.settings.clone();
        drop(inner);
        let mut result =
            ask(&mut conn, &owner, addr, &metrics_path, &s).await.and_then(|text| scrape_parse::parse(&text));
        // A model list that cannot be read is asked for again soon: a pool that learns its
        // models from its endpoints has no other way to know them.
        let served = if result.is_ok() && Instant::now() >= next_models {
            let served = match ask(&mut conn, &owner, addr, "/v1/models", &s).await {
                // Silent since the metrics' answer: as silent as a scrape that went unanswered.
                Err(silent @ ScrapeError::Silent { .. }) => {
                    result = Err(silent);
                    None
                }
                answer => answer.ok().and_then(|b| served_of(&b)),
            };
            if served.is_some() {
                next_models = Instant::now() + s.models_refresh;
                models_backoff = Duration::from_secs(1);
            } else {
                next_models = Instant::now() + models_backoff.min(s.models_refresh);
                models_backoff = (models_backoff * 2).min(s.models_refresh);
            }
            served
        } else {
            None
        };
        let Some(inner) = pool.upgrade() else { return };
        let wait = inner.on_scrape(serial, result, served);
        drop(inner);
        tokio::time::sleep(wait).await;
    }
}

/// One endpoint's `vllm:cache_config_info` `(block_size, num_gpu_blocks)`, asked once (for
/// `kvgate check-config`).
pub async fn cache_config(addr: SocketAddr, rank: Option<u32>) -> Result<(Option<u64>, Option<u64>), String> {
    let (mut conn, owner) = (None, Tasks::new());
    let path = format!("/metrics?{SCRAPED_FAMILIES}");
    let text = get(&mut conn, &owner, addr, &path, Duration::from_secs(2), 8 << 20).await.map_err(|e| e.to_string())?;
    let scrape = scrape_parse::parse(&text).map_err(|e| e.to_string())?;
    let engine = scrape.engine(rank).cloned().unwrap_or_default();
    Ok((engine.block_size, engine.num_gpu_blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_and_adapters_from_models() {
        let body = r#"{"object":"list","data":[{"id":"base","parent":null,"max_model_len":4096},{"id":"sql","parent":"base"},{"id":"x"},{"id":""},{"id":3}]}"#;
        let served = served_of(body).expect("a model list");
        assert_eq!(served.adapters, ["sql"]);
        assert_eq!(served.bases, ["base", "x"]);
        assert_eq!(served.max_model_len, [("base".to_owned(), 4096)]);
        assert_eq!(served_of("garbage"), None);
        assert_eq!(served_of(r#"{"data":{}}"#), None);
    }
}
