//! The scrape loop of one endpoint: `/metrics` every interval (jittered), `/v1/models` now and
//! then, each bounded in time and size, results handed to the pool. A dead or garbled endpoint
//! only ever costs its own task.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};

use super::{HttpClient, WeakPool, scrape_parse};

/// GETs `url`, returning the body as text if it is a 200 within `timeout` and `max_bytes`.
pub async fn fetch(client: &HttpClient, url: &str, timeout: Duration, max_bytes: usize) -> Result<String, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad url {url}: {e}"))?;
    let work = async {
        let resp = client.get(uri).await.map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| format!("reading the body failed: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_owned())
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| format!("timed out after {timeout:?}"))?
}

/// Adapters (entries with a `parent`) from a `/v1/models` body.
pub fn adapters_of(models_json: &str) -> Vec<String> {
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

/// Scrapes one endpoint until its pool drops it.
pub(super) async fn run(pool: WeakPool, serial: u64, addr: SocketAddr) {
    let metrics_url = format!("http://{addr}/metrics");
    let models_url = format!("http://{addr}/v1/models");
    let mut next_models = Instant::now();
    loop {
        let Some(inner) = pool.upgrade() else { return };
        let s = inner.settings.clone();
        let client = inner.client.clone();
        drop(inner);
        let result = fetch(&client, &metrics_url, s.scrape_timeout, s.max_scrape_bytes)
            .await
            .and_then(|text| scrape_parse::parse(&text));
        let adapters = if result.is_ok() && Instant::now() >= next_models {
            next_models = Instant::now() + s.models_refresh;
            fetch(&client, &models_url, s.scrape_timeout, s.max_scrape_bytes).await.ok().map(|b| adapters_of(&b))
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
