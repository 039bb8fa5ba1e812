//! kvgate's config file: one YAML document → one typed tree, checked as a whole.
//!
//! [`Config::load`] reads and parses the file, resolves relative paths from the file's folder,
//! and [`Config::resolve`] checks everything a running kvgate would trip over later: addresses,
//! ports, duplicate names and models, role labels, and each pool's scheduler (compiled, so an
//! unknown plugin is caught here). Every error says what is wrong and where.

pub mod endpoints;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::routing::request::DEFAULT_MAX_BODY_BYTES;
use crate::routing::schedule::{Scheduler, SchedulerSpec};
use endpoints::{Claims, EndpointSpec, ResolvedEndpoint, first_use, load_endpoints_file};

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// ext_proc + gRPC health listener.
    #[serde(default = "default_grpc_addr")]
    pub grpc_addr: SocketAddr,
    /// Admin HTTP listener (`/metrics`, `/healthz`, `/readyz`, `/debug/*`).
    #[serde(default = "default_admin_addr")]
    pub admin_addr: SocketAddr,
    /// OpenAI reverse proxy listener; off when absent.
    #[serde(default)]
    pub proxy_addr: Option<SocketAddr>,
    /// Largest request body accepted, in bytes (default 32 MiB).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Request bytes held in memory at once, over every request (default 128 MiB); past it new
    /// body bytes are refused with 503 and `Retry-After`.
    #[serde(default = "default_max_buffered")]
    pub max_buffered_bytes: usize,
    /// How endpoints are scraped.
    #[serde(default)]
    pub scrape: ScrapeConfig,
    /// When endpoints leave and rejoin rotation.
    #[serde(default)]
    pub health: HealthConfig,
    /// How the reverse proxy talks to endpoints.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Bounds on the connections of the proxy and admin listeners.
    #[serde(default)]
    pub connections: ConnectionsConfig,
    /// The Envoy ext_proc endpoint picker on `grpc_addr`.
    #[serde(default)]
    pub extproc: ExtProcConfig,
    /// A second listener serving only gRPC health (the reference picker's charts probe `:9003`).
    #[serde(default)]
    pub health_addr: Option<SocketAddr>,
    /// Which request paths are routed, and how (both front-ends).
    #[serde(default)]
    pub paths: crate::gateway::paths::PathsConfig,
    /// The pools, each a set of endpoints serving some models.
    pub pools: Vec<PoolConfig>,
}

/// Metric scraping (applies to every pool).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeConfig {
    /// Time between scrapes of one endpoint, jittered ±20% (default 50).
    pub interval_ms: u64,
    /// Bound on one scrape (default 1000).
    pub timeout_ms: u64,
    /// Scraped load older than this counts as unknown, not idle (default 2000).
    pub stale_after_ms: u64,
    /// Largest `/metrics` body accepted (default 8 MiB).
    pub max_bytes: usize,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self { interval_ms: 50, timeout_ms: 1000, stale_after_ms: 2000, max_bytes: 8 << 20 }
    }
}

/// The reverse proxy's timeouts and retries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Bound on connecting to an endpoint (default 2000).
    pub connect_timeout_ms: u64,
    /// Bound on an endpoint's response headers after the request is sent (default 600000:
    /// a non-streaming answer only starts when it is complete).
    pub first_byte_timeout_ms: u64,
    /// Bound on silence between two chunks of a response (default 300000).
    pub idle_timeout_ms: u64,
    /// Endpoints tried per request at most: the decision's target, then its fallbacks (default 3).
    pub attempts: usize,
    /// Bound on a P/D prefill leg, from sending it to reading its answer (default 30000); past
    /// it the decode endpoint prefills locally.
    pub prefill_timeout_ms: u64,
    /// Retries (second and later attempts) in progress at once, in percent of the requests
    /// waiting for an endpoint's answer (default 50), so a sick fleet is not hammered...
    pub retry_budget_percent: u32,
    /// ...but always at least this many (default 10).
    pub min_retry_concurrency: u32,
}

/// Endpoints one proxied request may try at most (`proxy.attempts`).
pub const MAX_ATTEMPTS: usize = 10;

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 2000,
            first_byte_timeout_ms: 600_000,
            idle_timeout_ms: 300_000,
            attempts: 3,
            prefill_timeout_ms: 30_000,
            retry_budget_percent: 50,
            min_retry_concurrency: 10,
        }
    }
}

/// Bounds on each HTTP listener's connections (proxy, admin).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsConfig {
    /// Time a connection may take to send a request's headers, counted from when it is ready
    /// for the next one — so also the idle timeout of a kept-alive connection (default 30000).
    pub header_read_timeout_ms: u64,
    /// Connections open at once per listener; past it new ones are closed (default 4096).
    pub max_connections: usize,
    /// Longest wait for the next bytes of a request body; past it the request is a 408
    /// (default 30000).
    pub body_read_timeout_ms: u64,
    /// Least average rate of a request body, bytes per second, once it has taken 5 s: a body
    /// slower than that is a 408 (default 1024; 0 turns it off).
    pub min_body_bytes_per_s: u64,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 30_000,
            max_connections: 4096,
            body_read_timeout_ms: 30_000,
            min_body_bytes_per_s: 1024,
        }
    }
}

/// Health judgement (applies to every pool).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Consecutive failures to reach an endpoint (scrapes, connects) that take it out of
    /// rotation (default 3). 5xx answers and requests that time out waiting for an answer never
    /// do by themselves: they count towards its error rate (see `max_ejection_percent`).
    pub failure_threshold: u32,
    /// An endpoint whose error rate is well above its pool's is ejected, but no more than this
    /// percentage of the pool is ever out of rotation that way (default 50: in the 2–8 endpoint
    /// pools vLLM fleets run, Envoy's 10% would round down to never ejecting anything).
    pub max_ejection_percent: u32,
    /// Time out of rotation before a probe (default 500); doubles with each ejection that
    /// follows soon after a recovery, so a flapping endpoint is held out longer.
    pub backoff_ms: u64,
    /// Longest time out of rotation (default 30000).
    pub max_backoff_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { failure_threshold: 3, max_ejection_percent: 50, backoff_ms: 500, max_backoff_ms: 30_000 }
    }
}

/// A pool's admission limits: beyond them requests get 429 before any endpoint is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admission {
    /// kvgate's requests in flight to the pool at most.
    pub max_in_flight: Option<u64>,
    /// Requests waiting in the pool's endpoint queues (scraped) at most.
    pub max_queued: Option<u64>,
    /// Sheddable requests (negative `priority`) are refused this fraction below the limits
    /// (default 0.2), so they go first when the pool fills up.
    pub sheddable_headroom: Option<f64>,
}

impl Admission {
    /// What is wrong with these limits, if anything.
    fn problem(&self) -> Option<String> {
        if self.max_in_flight == Some(0) || self.max_queued == Some(0) {
            return Some("max_in_flight and max_queued must be at least 1 when given".into());
        }
        match self.sheddable_headroom {
            Some(h) if !(0.0..=1.0).contains(&h) => {
                Some(format!("sheddable_headroom is a fraction of the limits, 0 to 1; got {h}"))
            }
            _ => None,
        }
    }
}

/// Which body mode to assume when Envoy does not announce it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BodyMode {
    /// `FULL_DUPLEX_STREAMED`.
    FullDuplexStreamed,
    /// `BUFFERED`.
    Buffered,
    /// `STREAMED` (responses only).
    Streamed,
    /// `NONE` (responses only).
    None,
}

/// The Envoy ext_proc endpoint picker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtProcConfig {
    /// Endpoints written to the destination (1: one `ip:port`, which ORIGINAL_DST clusters need;
    /// more: an ordered fallback list for `override_host`).
    pub max_endpoints: usize,
    /// Request body mode assumed when Envoy's first message does not say.
    pub request_body_mode: BodyMode,
    /// Response body mode assumed when Envoy's first message does not say.
    pub response_body_mode: BodyMode,
    /// Largest gRPC message accepted or sent (default 64 MiB).
    pub max_message_bytes: usize,
    /// Obey `test-epp-endpoint-selection` (for the upstream conformance suite only).
    pub conformance_test_filter: bool,
    /// Serve gRPC over TLS with this certificate and key (PEM files).
    pub tls: Option<TlsFiles>,
    /// Without `tls`, serve gRPC over TLS with a self-signed certificate made at start (what
    /// the reference picker does by default; gateways then skip verification).
    pub self_signed_tls: bool,
}

/// A PEM certificate (chain) and its private key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert_path: PathBuf,
    /// Private key (PEM).
    pub key_path: PathBuf,
}

impl Default for ExtProcConfig {
    fn default() -> Self {
        Self {
            max_endpoints: 1,
            request_body_mode: BodyMode::FullDuplexStreamed,
            response_body_mode: BodyMode::FullDuplexStreamed,
            max_message_bytes: 64 << 20,
            conformance_test_filter: false,
            tls: None,
            self_signed_tls: false,
        }
    }
}

fn default_grpc_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9002))
}

fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}

fn default_max_buffered() -> usize {
    DEFAULT_MAX_BUFFERED_BYTES
}

/// The default of `max_buffered_bytes`.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 128 << 20;

fn default_max_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

/// One pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool name (unique).
    pub name: String,
    /// Model names and LoRA adapters served; requests are routed to the pool by `model`. A
    /// pool sourced from an `inference_pool` may leave it empty: its models are then the ones
    /// its endpoints list on `/v1/models`.
    #[serde(default)]
    pub models: Vec<String>,
    /// The Kubernetes `InferencePool` whose Ready pods are the endpoints (instead of
    /// `endpoints` and `endpoints_file`).
    #[serde(default)]
    pub inference_pool: Option<InferencePoolRef>,
    /// Static endpoints.
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// A YAML or JSON file with `endpoints: [...]`, reloaded when it changes.
    #[serde(default)]
    pub endpoints_file: Option<PathBuf>,
    /// The scheduler, in EndpointPickerConfig shape; the default scheduler when absent.
    #[serde(default)]
    pub scheduler: Option<SchedulerSpec>,
    /// Admission limits (429 beyond them); none by default.
    #[serde(default)]
    pub admission: Admission,
}

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

impl ResolvedPool {
    /// Where the endpoints come from: `kubernetes`, `file`, `dns` (a host name to resolve) or
    /// `static`.
    pub fn source_kind(&self) -> &'static str {
        if self.inference_pool.is_some() {
            "kubernetes"
        } else if self.endpoints_file.is_some() {
            "file"
        } else if self.endpoints.iter().any(|e| matches!(e.host, endpoints::Host::Name(_))) {
            "dns"
        } else {
            "static"
        }
    }
}

/// A config error: the file, where in it, and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{path}: {at}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// Where in the file (a path such as `pools[0].endpoints[1].address`).
        at: String,
        /// What is wrong.
        message: String,
    },
}

/// A pool with its endpoints resolved and scheduler compiled.
#[derive(Debug)]
pub struct ResolvedPool {
    /// Pool name.
    pub name: String,
    /// Models served.
    pub models: Vec<String>,
    /// Static endpoints.
    pub endpoints: Vec<ResolvedEndpoint>,
    /// The InferencePool the endpoints come from, instead of the others.
    pub inference_pool: Option<InferencePoolRef>,
    /// The endpoints file's entries when it was checked (discovery keeps reading it).
    pub file_endpoints: Vec<ResolvedEndpoint>,
    /// Endpoints file (absolute, or relative to the working directory).
    pub endpoints_file: Option<PathBuf>,
    /// The compiled scheduler.
    pub scheduler: Scheduler,
    /// Admission limits.
    pub admission: Admission,
}

/// Parses YAML into `T`, reporting the path of the first bad field.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, (String, String)> {
    let mut at = String::new();
    let parsed = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
            at = e.path().to_string();
            e.into_inner()
        })
    });
    parsed.map_err(|e| {
        let msg = e.to_string();
        let msg = msg.strip_prefix("error: ").unwrap_or(&msg).to_owned();
        (if at.is_empty() || at == "." { "(document)".to_owned() } else { at }, msg)
    })
}

impl Config {
    /// Reads and parses a config file (relative paths in it resolve from its folder).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_yaml(&text, path)
    }

    /// Parses config text as if read from `path`.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Self = parse_yaml(text).map_err(|(at, message)| ConfigError::Invalid {
            path: path.display().to_string(),
            at,
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        if let Some(tls) = cfg.extproc.tls.as_mut() {
            for p in [&mut tls.cert_path, &mut tls.key_path] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        for pool in &mut cfg.pools {
            if let Some(f) = pool.endpoints_file.as_mut().filter(|f| f.is_relative()) {
                *f = base.join(&*f);
            }
        }
        Ok(cfg)
    }

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
                scheduler: None,
                admission: Admission::default(),
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

    /// Two listeners on one port (the same address, or one of them on every address), as
    /// `(field, message)` of the second; port 0 (any free port) never clashes.
    fn listener_clash(&self) -> Option<(&'static str, String)> {
        let listeners = [
            ("grpc_addr", Some(self.grpc_addr)),
            ("admin_addr", Some(self.admin_addr)),
            ("proxy_addr", self.proxy_addr),
            ("health_addr", self.health_addr),
        ];
        let bound: Vec<(&'static str, SocketAddr)> =
            listeners.into_iter().filter_map(|(name, a)| Some((name, a?))).filter(|(_, a)| a.port() != 0).collect();
        for (k, (name, a)) in bound.iter().enumerate() {
            let overlaps = |b: &SocketAddr| {
                b.port() == a.port() && (b.ip() == a.ip() || b.ip().is_unspecified() || a.ip().is_unspecified())
            };
            if let Some((other, b)) = bound[..k].iter().find(|(_, b)| overlaps(b)) {
                return Some((name, format!("{a} is also `{other}` ({b}); each listener needs its own port")));
            }
        }
        None
    }

    /// Checks the whole config and compiles each pool's scheduler.
    pub fn resolve(&self, path: &Path) -> Result<Vec<ResolvedPool>, ConfigError> {
        let invalid =
            |at: String, message: String| ConfigError::Invalid { path: path.display().to_string(), at, message };
        if self.pools.is_empty() {
            return Err(invalid("pools".into(), "at least one pool is needed".into()));
        }
        if let Err((at, message)) = crate::gateway::paths::PathPolicy::new(&self.paths) {
            return Err(invalid(at.into(), message));
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes".into(), "must be at least 1".into()));
        }
        if self.max_buffered_bytes == 0 {
            return Err(invalid("max_buffered_bytes".into(), "must be at least 1".into()));
        }
        if self.scrape.interval_ms == 0 || self.scrape.timeout_ms == 0 || self.scrape.max_bytes == 0 {
            return Err(invalid("scrape".into(), "interval_ms, timeout_ms and max_bytes must be at least 1".into()));
        }
        if self.extproc.max_endpoints == 0 || self.extproc.max_message_bytes < 1024 {
            return Err(invalid(
                "extproc".into(),
                "max_endpoints must be at least 1 and max_message_bytes at least 1024".into(),
            ));
        }
        if self.proxy.attempts == 0 || self.proxy.connect_timeout_ms == 0 || self.proxy.prefill_timeout_ms == 0 {
            return Err(invalid(
                "proxy".into(),
                "attempts, connect_timeout_ms and prefill_timeout_ms must be at least 1".into(),
            ));
        }
        let c = &self.connections;
        if c.header_read_timeout_ms == 0 || c.max_connections == 0 || c.body_read_timeout_ms == 0 {
            return Err(invalid(
                "connections".into(),
                "header_read_timeout_ms, body_read_timeout_ms and max_connections must be at least 1".into(),
            ));
        }
        const DAY_MS: u64 = 86_400_000;
        if c.header_read_timeout_ms > DAY_MS || c.body_read_timeout_ms > DAY_MS {
            return Err(invalid(
                "connections".into(),
                format!("header_read_timeout_ms and body_read_timeout_ms are at most a day ({DAY_MS})"),
            ));
        }
        if self.proxy.retry_budget_percent > 100 {
            return Err(invalid("proxy.retry_budget_percent".into(), "a percentage: 0 to 100".into()));
        }
        if self.proxy.attempts > MAX_ATTEMPTS {
            return Err(invalid(
                "proxy.attempts".into(),
                format!("at most {MAX_ATTEMPTS}, got {}", self.proxy.attempts),
            ));
        }
        if let Some((at, message)) = self.listener_clash() {
            return Err(invalid(at.into(), message));
        }
        if self.health.max_ejection_percent > 100 {
            return Err(invalid("health.max_ejection_percent".into(), "a percentage: 0 to 100".into()));
        }
        if self.health.failure_threshold == 0 || self.health.backoff_ms > self.health.max_backoff_ms {
            return Err(invalid(
                "health".into(),
                "failure_threshold must be at least 1 and backoff_ms at most max_backoff_ms".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut model_owner: BTreeMap<&str, &str> = BTreeMap::new();
        let mut out = Vec::with_capacity(self.pools.len());
        for (i, pool) in self.pools.iter().enumerate() {
            let at = |field: &str| format!("pools[{i}].{field}");
            if pool.name.trim().is_empty() {
                return Err(invalid(at("name"), "a pool needs a name".into()));
            }
            if !names.insert(pool.name.as_str()) {
                return Err(invalid(at("name"), format!("two pools are named `{}`", pool.name)));
            }
            if let Some(r) = &pool.inference_pool {
                if !pool.endpoints.is_empty() || pool.endpoints_file.is_some() {
                    return Err(invalid(
                        at("inference_pool"),
                        "a pool's endpoints come from `inference_pool` or from `endpoints`/`endpoints_file`, not both"
                            .into(),
                    ));
                }
                if let Some((field, message)) = r.problem() {
                    return Err(invalid(at(&format!("inference_pool.{field}")), message));
                }
            } else if pool.models.is_empty() {
                return Err(invalid(
                    at("models"),
                    "a pool must serve at least one model (only an `inference_pool` pool may learn them from its endpoints)"
                        .into(),
                ));
            }
            for (m, model) in pool.models.iter().enumerate() {
                if model.is_empty() {
                    return Err(invalid(at(&format!("models[{m}]")), "empty model name".into()));
                }
                if let Some(other) = model_owner.insert(model, &pool.name) {
                    return Err(invalid(
                        at(&format!("models[{m}]")),
                        format!("model `{model}` is also served by pool `{other}`; each model routes to one pool"),
                    ));
                }
            }
            if let Some(message) = pool.admission.problem() {
                return Err(invalid(at("admission"), message));
            }
            let mut endpoints = Vec::new();
            let mut file_endpoints = Vec::new();
            let mut seen = Claims::new();
            for (j, e) in pool.endpoints.iter().enumerate() {
                let eat = at(&format!("endpoints[{j}]"));
                for r in e.resolve().map_err(|m| invalid(eat.clone(), m.to_string()))? {
                    if !first_use(&mut seen, &r) {
                        return Err(invalid(eat, format!("endpoint {r} is listed twice")));
                    }
                    endpoints.push(r);
                }
            }
            if let Some(f) = &pool.endpoints_file {
                if !f.is_file() {
                    return Err(invalid(at("endpoints_file"), format!("{} is not a file", f.display())));
                }
                for r in load_endpoints_file(f)? {
                    if !first_use(&mut seen, &r) {
                        return Err(invalid(at("endpoints_file"), format!("endpoint {r} is listed twice")));
                    }
                    file_endpoints.push(r);
                }
            } else if endpoints.is_empty() && pool.inference_pool.is_none() {
                return Err(invalid(
                    at("endpoints"),
                    "a pool needs `endpoints`, an `endpoints_file` or an `inference_pool`".into(),
                ));
            }
            let scheduler = match &pool.scheduler {
                None => Scheduler::default_config(),
                Some(spec) => Scheduler::from_spec(spec)
                    .map_err(|e| invalid(format!("pools[{i}].scheduler.{}", e.at), e.message))?,
            };
            out.push(ResolvedPool {
                name: pool.name.clone(),
                models: pool.models.clone(),
                endpoints,
                inference_pool: pool.inference_pool.clone(),
                file_endpoints,
                endpoints_file: pool.endpoints_file.clone(),
                scheduler,
                admission: pool.admission,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
