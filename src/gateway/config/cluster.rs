//! `cluster:`: the peer replicas a kvgate shares what it learns with, how it finds them, and the
//! token they prove themselves with.

use std::path::PathBuf;

use serde::Deserialize;

use super::sections::Secret;

/// Peer replicas: each follows every other over its gRPC listener (`kvgate.v1.Cluster`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The peers' gRPC addresses (`host:port`); this replica's own may be among them (it
    /// recognises itself and skips it), so every replica can share one list.
    pub peers: Vec<String>,
    /// A DNS name whose addresses are the peers (a headless Service's name), with the gRPC
    /// port: `kvgate-peers.default.svc.cluster.local:9002`; looked up every `dns_interval_ms`.
    pub dns: Option<String>,
    /// How often `dns` is looked up again (default 5 s).
    pub dns_interval_ms: u64,
    /// The token every peer call carries (`authorization: Bearer <token>`), inline; or see
    /// `token_file`. One of them is required.
    pub token: Option<Secret>,
    /// A file holding the token (as a Kubernetes Secret is mounted), re-read every second.
    pub token_file: Option<PathBuf>,
    /// How long changes are batched before they go to the peers (default 50 ms).
    pub sync_interval_ms: u64,
    /// How long a starting replica waits for a peer's snapshot before it is ready without one
    /// (default 10 s; at most 10 s).
    pub join_timeout_ms: u64,
    /// How long a peer's in-flight counts are kept after it was last heard (default 10 s).
    pub lease_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            dns: None,
            dns_interval_ms: 5_000,
            token: None,
            token_file: None,
            sync_interval_ms: 50,
            join_timeout_ms: 10_000,
            lease_ms: 10_000,
        }
    }
}

/// Peers named at most in a static list.
pub const MAX_PEERS: usize = 64;

impl ClusterConfig {
    /// What is wrong with the section, as `(key, message)`.
    pub(crate) fn problem(&self) -> Option<(&'static str, String)> {
        if self.peers.is_empty() && self.dns.is_none() {
            return Some(("cluster", "name the peers: `peers: [host:port, …]` or `dns: name:port`".into()));
        }
        if self.peers.len() > MAX_PEERS {
            return Some(("cluster.peers", format!("at most {MAX_PEERS} peers; got {}", self.peers.len())));
        }
        if let Some(bad) = self.peers.iter().find(|p| !has_port(p)) {
            return Some(("cluster.peers", format!("`{bad}` is not `host:port`")));
        }
        if let Some(d) = self.dns.as_deref().filter(|d| !has_port(d)) {
            return Some(("cluster.dns", format!("`{d}` is not `name:port`")));
        }
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => return Some(("cluster.token", "give `token` or `token_file`, not both".into())),
            (None, None) => {
                return Some(("cluster.token", "peers must prove who they are: set `token` or `token_file`".into()));
            }
            (Some(t), None) if t.expose().trim().is_empty() => {
                return Some(("cluster.token", "must not be empty".into()));
            }
            _ => {}
        }
        let within = |v: u64, lo: u64, hi: u64| (lo..=hi).contains(&v);
        if !within(self.sync_interval_ms, 1, 1_000) {
            return Some(("cluster.sync_interval_ms", format!("1 to 1000; got {}", self.sync_interval_ms)));
        }
        if !within(self.join_timeout_ms, 0, 10_000) {
            return Some(("cluster.join_timeout_ms", format!("0 to 10000; got {}", self.join_timeout_ms)));
        }
        if !within(self.lease_ms, 3_000, 60_000) {
            // Counts are renewed every second: a lease must outlive a few renewals.
            return Some(("cluster.lease_ms", format!("3000 to 60000; got {}", self.lease_ms)));
        }
        if !within(self.dns_interval_ms, 100, 600_000) {
            return Some(("cluster.dns_interval_ms", format!("100 to 600000; got {}", self.dns_interval_ms)));
        }
        None
    }
}

/// Whether `s` is `host:port` with a port number.
fn has_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(yaml: &str) -> Option<&'static str> {
        let c: ClusterConfig = serde_saphyr::from_str(yaml).expect("parses");
        c.problem().map(|p| p.0)
    }

    #[test]
    fn peers_and_a_token_are_required_and_checked() {
        assert_eq!(with("{token: t}"), Some("cluster"));
        assert_eq!(with("{peers: ['10.0.0.1:9002']}"), Some("cluster.token"));
        assert_eq!(with("{peers: ['10.0.0.1'], token: t}"), Some("cluster.peers"));
        assert_eq!(with("{dns: 'peers.svc', token: t}"), Some("cluster.dns"));
        assert_eq!(with("{peers: ['a:1'], token: t, token_file: /x}"), Some("cluster.token"));
        assert_eq!(with("{peers: ['a:1'], token: ' '}"), Some("cluster.token"));
        assert_eq!(with("{peers: ['a:1'], token: t, join_timeout_ms: 20000}"), Some("cluster.join_timeout_ms"));
        assert_eq!(with("{peers: ['a:1'], token: t, sync_interval_ms: 0}"), Some("cluster.sync_interval_ms"));
        assert_eq!(with("{peers: ['10.0.0.1:9002', 'kvgate-1.kvgate:9002'], token: t}"), None);
        assert_eq!(with("{dns: 'kvgate-peers.default.svc:9002', token_file: /run/token}"), None);
    }
}
