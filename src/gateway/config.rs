//! kvgate's config file: one YAML document → one typed tree, checked as a whole.
//!
//! [`Config::load`] reads and parses the file, resolves relative paths from the file's folder,
//! and [`Config::resolve`] checks everything a running kvgate would trip over later: addresses,
//! ports, duplicate names and models, role labels, and each pool's scheduler (compiled, so an
//! unknown plugin is caught here). Every error says what is wrong and where.

mod bounds;
pub mod cluster;
pub mod endpoints;
pub mod flow;
mod inference_pool;
mod located;
mod pool_check;
use pool_check::check_pool;
pub mod read;
mod sections;
mod warnings;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::routing::request::DEFAULT_MAX_BODY_BYTES;
use crate::routing::schedule::{Scheduler, SchedulerSpec};
use crate::routing::tokenize::PromptTokenizer;
use endpoints::{Claims, EndpointSpec, ResolvedEndpoint, first_use, load_endpoints_file};
pub use inference_pool::{
    INFERENCE_POOL_GROUP, InferencePoolRef, is_dns_label, is_dns_subdomain, is_label_key, is_label_value,
};
use located::Lines;
use read::{CONFIG_LIMIT, FileError};
pub use sections::{
    Admission, BodyMode, ConnectionsConfig, ExtProcConfig, HealthConfig, KvEventsSpec, MAX_ATTEMPTS, PathsConfig,
    PickerApiConfig, ProxyConfig, ScrapeConfig, Secret, TlsFiles, bind_address, pattern_parts,
};

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
    /// Bounds on the connections of the proxy and admin listeners, and on request bodies.
    #[serde(default)]
    pub connections: ConnectionsConfig,
    /// The Envoy ext_proc endpoint picker on `grpc_addr`.
    #[serde(default)]
    pub extproc: ExtProcConfig,
    /// kvgate's own picker API (`kvgate.v1.Picker`) on `grpc_addr`.
    #[serde(default)]
    pub picker_api: PickerApiConfig,
    /// A second listener serving only gRPC health (the reference picker's charts probe `:9003`).
    #[serde(default)]
    pub health_addr: Option<SocketAddr>,
    /// Which request paths are routed, and how (every front-end).
    #[serde(default)]
    pub paths: PathsConfig,
    /// Flow control for every pool (a pool's own section overrides it key by key).
    #[serde(default)]
    pub flow_control: Option<flow::FlowControlConfig>,
    /// The priority of each objective (`x-llm-d-inference-objective`), for every pool.
    #[serde(default)]
    pub objectives: Vec<flow::ObjectiveSpec>,
    /// Peer replicas sharing what they learn (off when absent: a replica on its own).
    #[serde(default)]
    pub cluster: Option<cluster::ClusterConfig>,
    /// The pools, each a set of endpoints serving some models.
    pub pools: Vec<PoolConfig>,
    /// Where each setting is in the file, for warnings.
    #[serde(skip)]
    lines: Lines,
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

/// The default of a pool's `endpoints_file_max_bytes`.
pub const DEFAULT_ENDPOINTS_FILE_MAX_BYTES: u64 = 4 << 20;

fn default_endpoints_file_max_bytes() -> u64 {
    DEFAULT_ENDPOINTS_FILE_MAX_BYTES
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
    /// The largest `endpoints_file` read, in bytes (default 4 MiB); a larger one is refused.
    #[serde(default = "default_endpoints_file_max_bytes")]
    pub endpoints_file_max_bytes: u64,
    /// The scheduler, in EndpointPickerConfig shape; the default scheduler when absent.
    #[serde(default)]
    pub scheduler: Option<SchedulerSpec>,
    /// Admission limits (429 beyond them); none by default.
    #[serde(default)]
    pub admission: Admission,
    /// The model's Hugging Face tokenizer folder (`tokenizer.json`, and `tokenizer_config.json`
    /// and/or `chat_template.jinja`), for the precise prefix index.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Follow the endpoints' KV events (needs `tokenizer`): exact prefix matches.
    #[serde(default)]
    pub kv_events: Option<KvEventsSpec>,
    /// Flow control for this pool, over the global section.
    #[serde(default)]
    pub flow_control: Option<flow::FlowControlConfig>,
    /// This pool's objectives, over the global ones.
    #[serde(default)]
    pub objectives: Vec<flow::ObjectiveSpec>,
}

/// Where a pool's endpoints come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Listed in the config.
    #[default]
    Static,
    /// An endpoints file, watched.
    File,
    /// Host names, resolved again and again.
    Dns,
    /// A Kubernetes InferencePool and its pods.
    Kubernetes,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Static => "static",
            Self::File => "file",
            Self::Dns => "dns",
            Self::Kubernetes => "kubernetes",
        })
    }
}

impl ResolvedPool {
    /// Where the endpoints come from.
    pub fn source_kind(&self) -> SourceKind {
        if self.inference_pool.is_some() {
            SourceKind::Kubernetes
        } else if self.endpoints_file.is_some() {
            SourceKind::File
        } else if self.endpoints.iter().any(|e| matches!(e.host, endpoints::Host::Name(_))) {
            SourceKind::Dns
        } else {
            SourceKind::Static
        }
    }
}

/// A config error: the file, where in it, and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, or was refused (not a regular file, too large).
    #[error(transparent)]
    File(#[from] FileError),
    /// The file is not valid.
    #[error("{path}{}: {at}: {message}", line.map_or(String::new(), |l| format!(":{l}")))]
    Invalid {
        /// The file.
        path: String,
        /// The line of `at`, when known.
        line: Option<u64>,
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
    /// The largest endpoints file read.
    pub endpoints_file_max_bytes: u64,
    /// The compiled scheduler.
    pub scheduler: Scheduler,
    /// Admission limits.
    pub admission: Admission,
    /// Flow control.
    pub flow: flow::FlowSettings,
    /// Objectives and their priorities (the pool's over the global ones).
    pub objectives: Vec<(String, i64)>,
    /// The precise prefix index's set-up, when the pool follows KV events and its tokenizer
    /// loaded.
    pub precise: Option<PreciseSetup>,
    /// What is doubtful but not wrong (check-config prints these; serve logs them).
    pub warnings: Vec<String>,
}

/// A precise pool's tokenizer and event subscription.
#[derive(Debug, Clone)]
pub struct PreciseSetup {
    /// The model's tokenizer.
    pub tokenizer: PromptTokenizer,
    /// Its folder.
    pub tokenizer_dir: PathBuf,
    /// How to meet the publishers.
    pub kv_events: KvEventsSpec,
    /// Tokens per block until events say (`precise-prefix-cache-producer`'s `blockSize`).
    pub block_size: u32,
}

/// Loads a Hugging Face tokenizer folder: `tokenizer.json`, and `tokenizer_config.json` and
/// `chat_template.jinja` when present.
pub fn load_tokenizer(dir: &Path) -> Result<PromptTokenizer, String> {
    let read = |name: &str| std::fs::read(dir.join(name));
    let json = read("tokenizer.json").map_err(|e| format!("{}: {e}", dir.join("tokenizer.json").display()))?;
    let config = match read("tokenizer_config.json") {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{}: {e}", dir.join("tokenizer_config.json").display())),
    };
    let template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{}: {e}", dir.join("chat_template.jinja").display())),
    };
    PromptTokenizer::from_parts(&json, config.as_deref(), template.as_deref())
        .map_err(|e| format!("{}: {e}", dir.display()))
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
        Self::from_yaml(&read::read_text(path, CONFIG_LIMIT)?, path)
    }

    /// Parses config text as if read from `path`.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let lines = Lines::of(text);
        let mut cfg: Self = parse_yaml(text).map_err(|(at, message)| ConfigError::Invalid {
            path: path.display().to_string(),
            line: lines.get(&at),
            at,
            message,
        })?;
        cfg.lines = lines;
        let base = path.parent().unwrap_or(Path::new(""));
        if let Some(tls) = cfg.extproc.tls.as_mut() {
            for p in [&mut tls.cert_path, &mut tls.key_path].into_iter().chain(tls.client_ca_path.as_mut()) {
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
        let invalid = |at: String, message: String| ConfigError::Invalid {
            path: path.display().to_string(),
            line: self.lines.get(&at),
            at,
            message,
        };
        self.check_sections(&invalid)?;
        let mut names = HashSet::new();
        let mut model_owner: BTreeMap<&str, &str> = BTreeMap::new();
        let mut out = Vec::with_capacity(self.pools.len());
        for (i, pool) in self.pools.iter().enumerate() {
            let at = |field: &str| format!("pools[{i}].{field}");
            check_pool(pool, &at, &mut names, &mut model_owner, &invalid)?;
            let (endpoints, file_endpoints) = pool_endpoints(pool, &at, &invalid)?;
            let scheduler = match &pool.scheduler {
                None if pool.kv_events.is_some() => Scheduler::default_precise(),
                None => Scheduler::default_config(),
                Some(spec) => Scheduler::from_spec(spec)
                    .map_err(|e| invalid(format!("pools[{i}].scheduler.{}", e.at), e.message))?,
            };
            let mut warnings = self.ignored_settings(i, pool, &scheduler, path);
            let precise = precise_setup(pool, &scheduler, &at, &invalid, &mut warnings)?;
            out.push(ResolvedPool {
                name: pool.name.clone(),
                models: pool.models.clone(),
                endpoints,
                inference_pool: pool.inference_pool.clone(),
                file_endpoints,
                endpoints_file: pool.endpoints_file.clone(),
                endpoints_file_max_bytes: pool.endpoints_file_max_bytes,
                scheduler,
                admission: pool.admission,
                flow: flow::FlowSettings::resolve_within(
                    self.flow_control.as_ref(),
                    pool.flow_control.as_ref(),
                    self.max_buffered_bytes as u64,
                ),
                objectives: self
                    .objectives
                    .iter()
                    .chain(&pool.objectives)
                    .map(|o| (o.name.clone(), o.priority))
                    .collect(),
                precise,
                warnings,
            });
        }
        Ok(out)
    }

    /// Why the `cluster` section cannot be served as the gRPC listener is set (checked again at
    /// start, as flags may turn TLS on after the file was checked).
    pub fn cluster_over_tls(&self) -> Option<&'static str> {
        (self.cluster.is_some() && (self.extproc.tls.is_some() || self.extproc.self_signed_tls)).then_some(
            "replicas follow each other in plaintext gRPC, so `cluster` cannot be used with `extproc.tls` or self-signed TLS yet",
        )
    }

    /// Checks the sections shared by every pool: limits, listeners, proxy, health.
    fn check_sections(&self, invalid: &Invalid<'_>) -> Result<(), ConfigError> {
        if self.pools.is_empty() {
            return Err(invalid("pools".into(), "at least one pool is needed".into()));
        }
        if let Some((at, message)) = self.paths.problem() {
            return Err(invalid(at.into(), message));
        }
        // Every timeout and size, each against its bounds (`bounds.rs`).
        if let Some((at, message)) = self.out_of_bounds() {
            return Err(invalid(at, message));
        }
        if let Some((key, message)) = self.flow_control.as_ref().and_then(flow::FlowControlConfig::problem) {
            return Err(invalid(format!("flow_control.{key}"), message));
        }
        if let Some(message) = flow::objectives_problem(&self.objectives) {
            return Err(invalid("objectives".into(), message));
        }
        if let Some((at, message)) = self.picker_api.problem() {
            return Err(invalid(at.into(), message));
        }
        if let Some((at, message)) = self.cluster.as_ref().and_then(cluster::ClusterConfig::problem) {
            return Err(invalid(at.into(), message));
        }
        if let Some(message) = self.cluster_over_tls() {
            return Err(invalid("cluster".into(), message.into()));
        }
        if self.extproc.max_endpoints == Some(0) {
            return Err(invalid("extproc.max_endpoints".into(), "must be at least 1".into()));
        }
        if self.proxy.attempts == 0 {
            return Err(invalid("proxy.attempts".into(), "must be at least 1".into()));
        }
        let client_ca = self.extproc.tls.as_ref().is_some_and(|t| t.client_ca_path.is_some());
        if self.picker_api.require_client_cert && !client_ca {
            return Err(invalid(
                "picker_api.require_client_cert".into(),
                "needs extproc.tls.client_ca_path: the CA that verifies the clients' certificates".into(),
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
        Ok(())
    }
}

/// Builds a [`ConfigError::Invalid`] of the config file from a field and a message.
pub(super) type Invalid<'a> = dyn Fn(String, String) -> ConfigError + 'a;

/// A pool's endpoints: those listed in the config, and those of its `endpoints_file`; each
/// endpoint at most once.
fn pool_endpoints(
    pool: &PoolConfig,
    at: &dyn Fn(&str) -> String,
    invalid: &Invalid<'_>,
) -> Result<(Vec<ResolvedEndpoint>, Vec<ResolvedEndpoint>), ConfigError> {
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
        let loaded = match load_endpoints_file(f, pool.endpoints_file_max_bytes) {
            // Not read at all: said at the setting that names the file.
            Err(ConfigError::File(e)) => return Err(invalid(at("endpoints_file"), e.to_string())),
            loaded => loaded?,
        };
        for r in loaded {
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
    Ok((endpoints, file_endpoints))
}

/// What a precise pool needs (its tokenizer, KV-event feed and block size), or `None` with a
/// warning saying why the pool matches approximately.
fn precise_setup(
    pool: &PoolConfig,
    scheduler: &Scheduler,
    at: &dyn Fn(&str) -> String,
    invalid: &Invalid<'_>,
    warnings: &mut Vec<String>,
) -> Result<Option<PreciseSetup>, ConfigError> {
    Ok(match (&pool.kv_events, &pool.tokenizer, scheduler.precise_producer()) {
        (None, _, Some(_)) => {
            return Err(invalid(
                at("scheduler"),
                "`precise-prefix-cache-producer` needs the pool's `kv_events` and `tokenizer`".into(),
            ));
        }
        (Some(_), None, _) => {
            return Err(invalid(
                at("kv_events"),
                "following KV events needs the model's `tokenizer` folder: kvgate computes prefix keys from token ids"
                    .into(),
            ));
        }
        (Some(ev), Some(_), _) if ev.problem().is_some() => {
            return Err(invalid(at("kv_events"), ev.problem().unwrap_or_default()));
        }
        (Some(_), Some(_), None) => {
            warnings.push("`kv_events` is set but the scheduler names no `precise-prefix-cache-producer`: matches stay approximate".to_owned());
            None
        }
        (Some(ev), Some(dir), Some(block_size)) => match load_tokenizer(dir) {
            Ok(tokenizer) => {
                if !tokenizer.has_chat_template() {
                    warnings.push(format!(
                        "tokenizer {} has no chat template: chat requests are matched approximately",
                        dir.display()
                    ));
                }
                Some(PreciseSetup { tokenizer, tokenizer_dir: dir.clone(), kv_events: ev.clone(), block_size })
            }
            Err(e) => {
                warnings.push(format!("the tokenizer cannot be loaded ({e}): the pool matches approximately"));
                None
            }
        },
        (None, Some(dir), None) => {
            warnings.push(format!("`tokenizer` {} is used only with `kv_events`", dir.display()));
            None
        }
        (None, None, None) => None,
    })
}

#[cfg(test)]
mod tests;
