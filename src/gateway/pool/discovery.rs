//! Discovery: turns a pool's config (static endpoints, an endpoints file, host names) into the
//! pool's endpoint set, and keeps it current.
//!
//! The endpoints file is checked every 250 ms (modification time and size, then content); a
//! change that parses replaces the set, one that does not — or one that would leave the pool
//! with no endpoint at all — is logged and ignored, keeping the last good set. Host names are
//! resolved again every 5 s; a name with several addresses (a headless Kubernetes service)
//! gives one endpoint per address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use super::Pool;
use crate::gateway::config::SourceKind;
use crate::gateway::config::endpoints::{Claims, Host, ResolvedEndpoint, first_use, load_endpoints_file};

/// Where a pool's endpoints come from, for `/debug/endpoints` and `check-config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SourceStatus {
    /// `static`, `file`, `dns` or `kubernetes`.
    pub kind: SourceKind,
    /// The file, or the InferencePool (`namespace/name`, `group/v1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Whether the source has been read in full (Kubernetes: the pool and its pods listed).
    pub synced: bool,
    /// The source's last problem, while it lasts (Kubernetes: API errors, a malformed pool).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Objects the source skipped as malformed, and why (Kubernetes: pods, by name).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

const FILE_POLL: Duration = Duration::from_millis(250);
const DNS_REFRESH: Duration = Duration::from_secs(5);

/// Resolves entries' host names to IPs through DNS (one entry per address; failures are logged
/// and skipped).
pub(crate) async fn resolve(entries: &[ResolvedEndpoint]) -> Vec<ResolvedEndpoint> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let addrs: Vec<SocketAddr> = match &e.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, e.port)],
            Host::Name(name) => match tokio::net::lookup_host((name.as_str(), e.port)).await {
                Ok(it) => {
                    let mut v: Vec<SocketAddr> = it.collect();
                    v.sort();
                    v.dedup();
                    v
                }
                Err(err) => {
                    tracing::warn!(endpoint = %e, error = %err, "cannot resolve endpoint host; skipping it");
                    Vec::new()
                }
            },
        };
        let many = addrs.len() > 1;
        for addr in addrs {
            let name = if many { format!("{}@{addr}", e.name) } else { e.name.clone() };
            out.push(ResolvedEndpoint { name, host: Host::Ip(addr.ip()), port: addr.port(), ..e.clone() });
        }
    }
    out
}

/// Keeps `pool`'s endpoints (from a source of `kind`) in line with `fixed` entries and the
/// optional endpoints file.
pub(crate) async fn run(pool: Pool, kind: SourceKind, fixed: Vec<ResolvedEndpoint>, file: Option<PathBuf>) {
    let from = file.as_ref().map(|f| f.display().to_string());
    pool.set_source(SourceStatus { kind, from, synced: true, ..SourceStatus::default() });
    let mut file_entries: Vec<ResolvedEndpoint> = Vec::new();
    let mut file_stamp: Option<(SystemTime, u64)> = None;
    let mut last_dns = Instant::now();
    let mut current: Option<Vec<ResolvedEndpoint>> = None;
    let needs_dns = |entries: &[ResolvedEndpoint]| entries.iter().any(|e| matches!(e.host, Host::Name(_)));
    loop {
        let mut changed = current.is_none();
        if let Some(path) = &file {
            let stamp = std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
            if stamp != file_stamp {
                file_stamp = stamp;
                match load_endpoints_file(path) {
                    // Emptying a pool that has endpoints by an edit is more likely a mistake
                    // (a truncated write, a bad template) than a wish to refuse every request.
                    Ok(entries) if entries.is_empty() && fixed.is_empty() && !file_entries.is_empty() => {
                        tracing::error!(pool = pool.name(), file = %path.display(), "endpoints file lists no endpoint; keeping the last good endpoint set (list at least one endpoint, or remove the pool)");
                    }
                    Ok(entries) => {
                        if entries != file_entries {
                            tracing::info!(pool = pool.name(), file = %path.display(), endpoints = entries.len(), "endpoints file loaded");
                            file_entries = entries;
                            changed = true;
                        }
                    }
                    Err(e) => {
                        tracing::error!(pool = pool.name(), error = %e, "endpoints file rejected; keeping the last good endpoint set")
                    }
                }
            }
        }
        // A file entry may not take the host:port of a fixed one.
        let mut seen = Claims::new();
        let all: Vec<ResolvedEndpoint> = fixed
            .iter()
            .chain(&file_entries)
            .filter(|r| {
                let ok = first_use(&mut seen, r);
                if !ok && changed {
                    tracing::warn!(pool = pool.name(), endpoint = %r, "endpoint listed both in the config and in the endpoints file; the file's entry is ignored");
                }
                ok
            })
            .cloned()
            .collect();
        if needs_dns(&all) && last_dns.elapsed() >= DNS_REFRESH {
            last_dns = Instant::now();
            changed = true;
        }
        if changed {
            let endpoints = resolve(&all).await;
            if current.as_ref() != Some(&endpoints) {
                pool.set_endpoints(endpoints.clone());
                current = Some(endpoints);
            }
        }
        if file.is_none() && !needs_dns(&all) {
            return;
        }
        tokio::time::sleep(FILE_POLL).await;
    }
}
