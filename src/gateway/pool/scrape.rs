//! The scrape loop of one endpoint: `/metrics` every interval (jittered), `/v1/models` now and
//! then, each bounded in time and size, results handed to the pool. A dead or garbled endpoint
//! only ever costs its own task.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};

use super::scrape_parse::{self, ScrapeError};
use super::{AbortOnDrop, WeakPool};

/// The `name[]` filter of the families routing reads.
/// (`name[]=vllm:…`, percent-encoded.)
const SCRAPED_FAMILIES: &str = "name%5B%5D=vllm%3Anum_requests_running&name%5B%5D=vllm%3Anum_requests_waiting\
    &name%5B%5D=vllm%3Akv_cache_usage_perc&name%5B%5D=vllm%3Agpu_cache_usage_perc\
    &name%5B%5D=vllm%3Acache_config_info&name%5B%5D=vllm%3Alora_requests_info";

/// Adapters (entries with a `parent`) from a `/v1/models` body.
pub(crate) fn adapters_of(models_json: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(models_json) else { return Vec::new() };
    v["data"]
        .as_array()
        .map(|data| {
            data.iter()
                .filter(|m| m.get("parent").is_some_and(|p| !p.is_null()))
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn transport(message: String) -> ScrapeError {
    ScrapeError::Transport(message)
}

/// One endpoint's own keep-alive connection: a scraper asks one question at a time, so it
/// needs no connection pool (and none of its lookups and locks, twenty times a second).
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    _driver: AbortOnDrop,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Self, ScrapeError> {
        let stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|e| transport(format!("connect failed: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| transport(format!("handshake failed: {e}")))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender, _driver: AbortOnDrop(driver) })
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

/// A GET on the scraper's connection (opened or reopened as needed), bounded by `timeout`.
async fn get(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    max_bytes: usize,
) -> Result<String, ScrapeError> {
    let work = async {
        if conn.is_none() {
            *conn = Some(Conn::open(addr).await?);
        }
        match conn.as_mut() {
            Some(c) => c.get(addr, path, max_bytes).await,
            None => Err(transport("no connection".into())),
        }
    };
    let result = tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(transport(format!("timed out after {timeout:?}"))));
    if result.is_err() {
        // Never reuse a connection that failed or may still carry an unread answer.
        *conn = None;
    }
    result
}

/// Scrapes one endpoint until its pool drops it.
pub(super) async fn run(pool: WeakPool, serial: u64, addr: SocketAddr) {
    // Ask only for the families routing reads: prometheus_client (vLLM's exporter) honours
    // `name[]`, which cuts a busy server's exposition from tens of kilobytes to one; a server
    // that ignores it still answers with everything.
    let metrics_path = format!("/metrics?{SCRAPED_FAMILIES}");
    let mut conn: Option<Conn> = None;
    let mut next_models = Instant::now();
    loop {
        let Some(inner) = pool.upgrade() else { return };
        let s = inner.settings.clone();
        drop(inner);
        let result = get(&mut conn, addr, &metrics_path, s.scrape_timeout, s.max_scrape_bytes)
            .await
            .and_then(|text| scrape_parse::parse(&text));
        let adapters = if result.is_ok() && Instant::now() >= next_models {
            next_models = Instant::now() + s.models_refresh;
            get(&mut conn, addr, "/v1/models", s.scrape_timeout, s.max_scrape_bytes).await.ok().map(|b| adapters_of(&b))
        } else {
            None
        };
        let Some(inner) = pool.upgrade() else { return };
        let wait = inner.on_scrape(serial, result, adapters);
        drop(inner);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_from_models() {
        let body = r#"{"object":"list","data":[{"id":"base","parent":null},{"id":"sql","parent":"base"},{"id":"x"}]}"#;
        assert_eq!(adapters_of(body), ["sql"]);
        assert!(adapters_of("garbage").is_empty());
    }
}
