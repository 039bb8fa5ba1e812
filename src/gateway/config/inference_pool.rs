//! Kubernetes names in the config: an `InferencePool` reference and the checks of the names
//! Kubernetes accepts (object, namespace and label names), and the config `--pool-name` builds.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{Admission, Config, PoolConfig, parse_yaml};

/// The group of the Gateway API Inference Extension's `InferencePool` (version `v1`).
pub const INFERENCE_POOL_GROUP: &str = "inference.networking.k8s.io";

/// An `InferencePool` to source a pool's endpoints from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InferencePoolRef {
    /// The InferencePool's name.
    pub name: String,
    /// Its namespace; kvgate's own (from the service-account mount or the kubeconfig) when
    /// absent.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Its API group (default `inference.networking.k8s.io`), version `v1`.
    #[serde(default)]
    pub group: Option<String>,
}

impl InferencePoolRef {
    /// The API group, defaulted.
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or(INFERENCE_POOL_GROUP)
    }

    /// What is wrong with the reference, as `(field, message)`.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if !is_dns_subdomain(&self.name) {
            return Some((
                "name",
                format!(
                    "`{}` is not a Kubernetes object name (lower-case letters, digits, '-' and '.', at most 253)",
                    self.name
                ),
            ));
        }
        if let Some(ns) = self.namespace.as_deref().filter(|ns| !is_dns_label(ns)) {
            return Some((
                "namespace",
                format!("`{ns}` is not a Kubernetes namespace name (lower-case letters, digits and '-', at most 63)"),
            ));
        }
        if let Some(g) = self.group.as_deref().filter(|g| !is_dns_subdomain(g)) {
            return Some(("group", format!("`{g}` is not an API group name")));
        }
        None
    }
}

/// A DNS-1123 label: what Kubernetes accepts as a namespace name.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 subdomain: what Kubernetes accepts as most object names.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric (or empty).
pub fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric())
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a non-empty label value.
pub fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    !name.is_empty()
        && is_label_value(name)
        && prefix.is_none_or(|p| is_dns_subdomain(p) && p.split('.').all(is_dns_label))
}

impl Config {
    /// The config `kvgate serve --pool-name` runs with when given no file: the default
    /// listeners (and gRPC health alone on `:9003`, where the reference picker's probes look)
    /// and no pool yet ([`Config::follow_inference_pool`] adds it).
    pub fn for_inference_pool() -> Self {
        let mut cfg: Self = parse_yaml("pools: []").unwrap_or_else(|_| unreachable!("a valid document"));
        cfg.health_addr = Some(SocketAddr::from(([0, 0, 0, 0], 9003)));
        cfg
    }

    /// Sources the config's one pool from InferencePool `r` (`--pool-name`): a config with no
    /// pool gets one named after the InferencePool; a config with one pool keeps its models,
    /// scheduler and admission, and may not list endpoints of its own.
    pub fn follow_inference_pool(&mut self, r: InferencePoolRef) -> Result<(), String> {
        if let Some((field, message)) = r.problem() {
            return Err(format!("{field}: {message}"));
        }
        match self.pools.as_mut_slice() {
            [] => self.pools.push(PoolConfig {
                name: r.name.clone(),
                models: Vec::new(),
                inference_pool: Some(r),
                endpoints: Vec::new(),
                endpoints_file: None,
                endpoints_file_max_bytes: super::DEFAULT_ENDPOINTS_FILE_MAX_BYTES,
                scheduler: None,
                admission: Admission::default(),
                tokenizer: None,
                kv_events: None,
                flow_control: None,
                objectives: Vec::new(),
            }),
            [pool] if !pool.endpoints.is_empty() || pool.endpoints_file.is_some() => {
                return Err(format!(
                    "pool `{}` lists its own endpoints; with --pool-name its endpoints come from the InferencePool",
                    pool.name
                ));
            }
            [pool] => pool.inference_pool = Some(r),
            pools => {
                return Err(format!(
                    "the config has {} pools; --pool-name sources a config's one pool (use `inference_pool:` per pool instead)",
                    pools.len()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        for ok in ["app", "llm-d.ai/role", "a.b/c_d-e", "x"] {
            assert!(is_label_key(ok), "{ok}");
        }
        for bad in ["", "/x", "a/", "-a", "a b", "A_/x", "a=b"] {
            assert!(!is_label_key(bad), "{bad}");
        }
        assert!(is_label_value("") && is_label_value("v1.2_x") && !is_label_value("a,b") && !is_label_value("-a"));
    }
}
