//! kvgate's config file: one YAML document → one typed tree, checked as a whole.
//!
//! [`Config::load`] reads and parses the file, resolves relative paths from the file's folder,
//! and [`Config::resolve`] checks everything a running kvgate would trip over later: addresses,
//! ports, duplicate names and models, role labels, and each pool's scheduler (compiled, so an
//! unknown plugin is caught here). Every error says what is wrong and where.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::endpoint::{ROLE_LABEL, Role};
use crate::request::DEFAULT_MAX_BODY_BYTES;
use crate::schedule::{Scheduler, SchedulerSpec};

/// Data-parallel ranks one endpoint entry may declare (InferencePool `targetPorts` allows 8).
pub const MAX_RANK_PORTS: usize = 8;
/// Data-parallel ranks one port may front (`data_parallel_size`).
pub const MAX_HEADER_RANKS: u32 = 64;

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
    /// How endpoints are scraped.
    #[serde(default)]
    pub scrape: ScrapeConfig,
    /// When endpoints leave and rejoin rotation.
    #[serde(default)]
    pub health: HealthConfig,
    /// How the reverse proxy talks to endpoints.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// The Envoy ext_proc endpoint picker on `grpc_addr`.
    #[serde(default)]
    pub extproc: crate::extproc::ExtProcConfig,
    /// A second listener serving only gRPC health (the reference picker's charts probe `:9003`).
    #[serde(default)]
    pub health_addr: Option<SocketAddr>,
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
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 2000,
            first_byte_timeout_ms: 600_000,
            idle_timeout_ms: 300_000,
            attempts: 3,
            prefill_timeout_ms: 30_000,
        }
    }
}

/// Health judgement (applies to every pool).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Consecutive failed scrapes or requests that take an endpoint out of rotation (default 3).
    pub failure_threshold: u32,
    /// First time out of rotation before a probe (default 500); doubles per failed probe.
    pub backoff_ms: u64,
    /// Longest time out of rotation (default 30000).
    pub max_backoff_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { failure_threshold: 3, backoff_ms: 500, max_backoff_ms: 30_000 }
    }
}

fn default_grpc_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9002))
}

fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}

fn default_max_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

/// One pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool name (unique).
    pub name: String,
    /// Model names and LoRA adapters served; requests are routed to the pool by `model`.
    pub models: Vec<String>,
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
    pub admission: crate::route::Admission,
}

/// An endpoint entry, the same inline and in an endpoints file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// `ip`, `ip:port`, `[v6]:port`, `host` or `host:port`.
    pub address: String,
    /// Port, when `address` has none.
    #[serde(default)]
    pub port: Option<u16>,
    /// One port per data-parallel rank (port i = rank i), when `address` has none.
    #[serde(default)]
    pub ports: Option<Vec<u16>>,
    /// Data-parallel ranks behind one port (vLLM's internal load balancing): each rank is
    /// scored on its own (`engine` label of the metrics) and pinned with `X-data-parallel-rank`.
    #[serde(default)]
    pub data_parallel_size: Option<u32>,
    /// Labels, e.g. `llm-d.ai/role: prefill`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Where an endpoint lives: an IP, or a host name to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP address.
    Ip(IpAddr),
    /// A DNS name.
    Name(String),
}

/// One `host:port` endpoint from an entry (an entry with `ports` gives one per rank).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    /// Display name.
    pub name: String,
    /// Host.
    pub host: Host,
    /// Port.
    pub port: u16,
    /// Data-parallel rank, for entries with `ports` or `data_parallel_size`.
    pub rank: Option<u32>,
    /// The rank shares its port with the others and is pinned by header.
    pub rank_header: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl ResolvedEndpoint {
    /// The socket address, if the host is an IP.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match &self.host {
            Host::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            Host::Name(_) => None,
        }
    }
}

impl fmt::Display for ResolvedEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl EndpointSpec {
    /// The endpoints this entry stands for.
    pub fn resolve(&self) -> Result<Vec<ResolvedEndpoint>, String> {
        let (host, addr_port) = parse_address(&self.address)?;
        let ports: Vec<(u16, Option<u32>)> = match (addr_port, self.port, &self.ports) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(format!("`{}` already has a port; drop `port`/`ports`", self.address));
            }
            (_, Some(_), Some(_)) => return Err("give `port` or `ports`, not both".into()),
            (Some(p), None, None) | (None, Some(p), None) => vec![(p, None)],
            (None, None, Some(ps)) => {
                if ps.is_empty() || ps.len() > MAX_RANK_PORTS {
                    return Err(format!("`ports` needs 1 to {MAX_RANK_PORTS} ports, got {}", ps.len()));
                }
                let mut seen = HashSet::new();
                if let Some(d) = ps.iter().find(|p| !seen.insert(**p)) {
                    return Err(format!("port {d} appears twice in `ports`"));
                }
                ps.iter().enumerate().map(|(rank, &p)| (p, Some(rank as u32))).collect()
            }
            (None, None, None) => {
                return Err(format!("`{}` has no port; add `:port`, `port` or `ports`", self.address));
            }
        };
        if let Some(p) = ports.iter().find(|(p, _)| *p == 0) {
            return Err(format!("port {} is not a valid port", p.0));
        }
        let ports = match self.data_parallel_size {
            None => ports,
            Some(_) if self.ports.is_some() => {
                return Err("give `ports` (one port per rank) or `data_parallel_size` (ranks behind one port), \
                            not both"
                    .into());
            }
            Some(n) if n == 0 || n > MAX_HEADER_RANKS => {
                return Err(format!("`data_parallel_size` must be 1 to {MAX_HEADER_RANKS}, got {n}"));
            }
            Some(n) => (0..n).map(|r| (ports[0].0, Some(r))).collect(),
        };
        let rank_header = self.data_parallel_size.is_some();
        if let Some(v) = self.labels.get(ROLE_LABEL).filter(|v| Role::from_label(v).is_none()) {
            return Err(format!("label `{ROLE_LABEL}: {v}` is not a role; use prefill, decode or both"));
        }
        Ok(ports
            .into_iter()
            .map(|(port, rank)| {
                let mut e = ResolvedEndpoint {
                    name: String::new(),
                    host: host.clone(),
                    port,
                    rank,
                    rank_header,
                    labels: self.labels.clone(),
                };
                e.name = match (&self.name, rank) {
                    (Some(n), None) => n.clone(),
                    (Some(n), Some(r)) => format!("{n}-rank-{r}"),
                    (None, Some(r)) if rank_header => format!("{e}-rank-{r}"),
                    (None, _) => e.to_string(),
                };
                e
            })
            .collect())
    }
}

/// The `host:port`s claimed so far, and whether by ranks behind one port.
pub type Claims = std::collections::HashMap<(Host, u16), bool>;

/// Whether `r` may be added: its `host:port` is not yet taken by another entry. The ranks of one
/// `data_parallel_size` entry share theirs: rank 0 claims it, the others follow it.
pub fn first_use(seen: &mut Claims, r: &ResolvedEndpoint) -> bool {
    let key = (r.host.clone(), r.port);
    if r.rank_header && r.rank.is_some_and(|k| k > 0) {
        return seen.get(&key) == Some(&true);
    }
    if seen.contains_key(&key) {
        return false;
    }
    seen.insert(key, r.rank_header);
    true
}

/// Splits an address into host and optional port.
fn parse_address(addr: &str) -> Result<(Host, Option<u16>), String> {
    let addr = addr.trim();
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok((Host::Ip(sa.ip()), Some(sa.port())));
    }
    let bare = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(addr);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok((Host::Ip(ip), None));
    }
    let (name, port) = match addr.rsplit_once(':') {
        Some((n, p)) => {
            let port = p.parse::<u16>().map_err(|_| format!("`{addr}`: `{p}` is not a port number"))?;
            (n, Some(port))
        }
        None => (addr, None),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !valid {
        return Err(format!("`{addr}` is not an IP, ip:port or host name"));
    }
    Ok((Host::Name(name.to_owned()), port))
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
    /// The endpoints file's entries when it was checked (discovery keeps reading it).
    pub file_endpoints: Vec<ResolvedEndpoint>,
    /// Endpoints file (absolute, or relative to the working directory).
    pub endpoints_file: Option<PathBuf>,
    /// The compiled scheduler.
    pub scheduler: Scheduler,
    /// Admission limits.
    pub admission: crate::route::Admission,
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

/// The document of an endpoints file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointsFile {
    endpoints: Vec<EndpointSpec>,
}

/// Reads an endpoints file (YAML or JSON: `endpoints: [...]`) and resolves its entries.
pub fn load_endpoints_file(path: &Path) -> Result<Vec<ResolvedEndpoint>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    let invalid = |at: String, message: String| ConfigError::Invalid { path: path.display().to_string(), at, message };
    let file: EndpointsFile = parse_yaml(&text).map_err(|(at, m)| invalid(at, m))?;
    let mut out = Vec::new();
    let mut seen = Claims::new();
    for (j, e) in file.endpoints.iter().enumerate() {
        for r in e.resolve().map_err(|m| invalid(format!("endpoints[{j}]"), m))? {
            if !first_use(&mut seen, &r) {
                return Err(invalid(format!("endpoints[{j}]"), format!("endpoint {r} is listed twice")));
            }
            out.push(r);
        }
    }
    Ok(out)
}

impl Config {
    /// The pool settings these sections describe.
    pub fn pool_settings(&self) -> crate::pool::PoolSettings {
        use std::time::Duration;
        crate::pool::PoolSettings {
            scrape_interval: Duration::from_millis(self.scrape.interval_ms),
            scrape_timeout: Duration::from_millis(self.scrape.timeout_ms),
            stale_after: Duration::from_millis(self.scrape.stale_after_ms),
            max_scrape_bytes: self.scrape.max_bytes,
            failure_threshold: self.health.failure_threshold,
            initial_backoff: Duration::from_millis(self.health.backoff_ms),
            max_backoff: Duration::from_millis(self.health.max_backoff_ms),
            ..crate::pool::PoolSettings::default()
        }
    }

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

    /// Checks the whole config and compiles each pool's scheduler.
    pub fn resolve(&self, path: &Path) -> Result<Vec<ResolvedPool>, ConfigError> {
        let invalid =
            |at: String, message: String| ConfigError::Invalid { path: path.display().to_string(), at, message };
        if self.pools.is_empty() {
            return Err(invalid("pools".into(), "at least one pool is needed".into()));
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes".into(), "must be at least 1".into()));
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
            if pool.models.is_empty() {
                return Err(invalid(at("models"), "a pool must serve at least one model".into()));
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
            let mut endpoints = Vec::new();
            let mut file_endpoints = Vec::new();
            let mut seen = Claims::new();
            for (j, e) in pool.endpoints.iter().enumerate() {
                let eat = at(&format!("endpoints[{j}]"));
                for r in e.resolve().map_err(|m| invalid(eat.clone(), m))? {
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
            } else if endpoints.is_empty() {
                return Err(invalid(at("endpoints"), "a pool needs `endpoints` or an `endpoints_file`".into()));
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
mod tests {
    use super::*;

    fn check_endpoint(yaml: &str, want: Result<&[&str], &str>) {
        let spec: EndpointSpec = parse_yaml(yaml).unwrap_or_else(|e| panic!("{yaml}: {e:?}"));
        match (spec.resolve(), want) {
            (Ok(got), Ok(want)) => {
                let got: Vec<String> = got.iter().map(|e| e.to_string()).collect();
                assert_eq!(got, want, "{yaml}");
            }
            (Err(e), Err(needle)) => assert!(e.contains(needle), "{yaml}: `{e}` lacks `{needle}`"),
            (got, want) => panic!("{yaml}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn endpoint_addresses() {
        check_endpoint("{address: 10.0.0.1:8000}", Ok(&["10.0.0.1:8000"]));
        check_endpoint("{address: 10.0.0.1, port: 8000}", Ok(&["10.0.0.1:8000"]));
        check_endpoint("{address: 10.0.0.1, ports: [8000, 8001]}", Ok(&["10.0.0.1:8000", "10.0.0.1:8001"]));
        check_endpoint("{address: '[fd00::1]:8000'}", Ok(&["[fd00::1]:8000"]));
        check_endpoint("{address: 'fd00::1', port: 9}", Ok(&["[fd00::1]:9"]));
        check_endpoint("{address: vllm-0.vllm.svc:8000}", Ok(&["vllm-0.vllm.svc:8000"]));
        check_endpoint("{address: 10.0.0.1}", Err("has no port"));
        check_endpoint("{address: 10.0.0.1:80, port: 81}", Err("already has a port"));
        check_endpoint("{address: 10.0.0.1, port: 1, ports: [2]}", Err("not both"));
        check_endpoint("{address: 10.0.0.1, ports: []}", Err("1 to 8"));
        check_endpoint("{address: 10.0.0.1, ports: [1,2,3,4,5,6,7,8,9]}", Err("1 to 8"));
        check_endpoint("{address: 10.0.0.1, ports: [1, 1]}", Err("twice"));
        check_endpoint("{address: 10.0.0.1, ports: [1, 2], data_parallel_size: 2}", Err("not both"));
        check_endpoint("{address: '10.0.0.1:8000', data_parallel_size: 0}", Err("1 to 64"));
        check_endpoint("{address: '10.0.0.1:8000', data_parallel_size: 65}", Err("1 to 64"));
        check_endpoint("{address: 10.0.0.1, data_parallel_size: 2}", Err("no port"));
        check_endpoint("{address: 'bad host:80'}", Err("not an IP"));
        check_endpoint("{address: 'host:http'}", Err("not a port number"));
        check_endpoint("{address: 10.0.0.1:0}", Err("not a valid port"));
        check_endpoint("{address: 10.0.0.1:1, labels: {llm-d.ai/role: chef}}", Err("not a role"));
    }

    #[test]
    fn ranks_and_names() {
        let spec: EndpointSpec = parse_yaml("{name: moe, address: 10.0.0.5, ports: [8000, 8001]}").expect("parses");
        let r = spec.resolve().expect("resolves");
        assert_eq!(r[1].rank, Some(1));
        assert_eq!(r[1].name, "moe-rank-1");
        assert!(!r[1].rank_header);
        let spec: EndpointSpec = parse_yaml("{address: '10.0.0.5:8000', data_parallel_size: 4}").expect("parses");
        let r = spec.resolve().expect("resolves");
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|e| e.port == 8000 && e.rank_header));
        assert_eq!(r.iter().map(|e| e.rank).collect::<Vec<_>>(), [Some(0), Some(1), Some(2), Some(3)]);
        assert_eq!(r[3].name, "10.0.0.5:8000-rank-3");
    }

    fn check_config(yaml: &str, want: Result<usize, (&str, &str)>) {
        let path = Path::new("/etc/kvgate/test.yaml");
        let got = Config::from_yaml(yaml, path).and_then(|c| c.resolve(path));
        match (got, want) {
            (Ok(pools), Ok(n)) => assert_eq!(pools.len(), n),
            (Err(ConfigError::Invalid { at, message, .. }), Err((want_at, needle))) => {
                assert_eq!(at, want_at, "{yaml}: {message}");
                assert!(message.contains(needle), "{yaml}: `{message}` lacks `{needle}`");
            }
            (got, want) => panic!("{yaml}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn config_errors_name_the_place() {
        let ok = "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}]";
        check_config(ok, Ok(1));
        check_config("pools: []", Err(("pools", "at least one")));
        check_config(
            "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1', colour: red}]}]",
            Err(("pools[0].endpoints[0].colour", "unknown field `colour`")),
        );
        check_config("bogus: 1\npools: []", Err(("bogus", "unknown field `bogus`")));
        check_config(
            "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}, {name: a, models: [n], endpoints: [{address: '127.0.0.1:2'}]}]",
            Err(("pools[1].name", "two pools")),
        );
        check_config(
            "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}, {name: b, models: [m], endpoints: [{address: '127.0.0.1:2'}]}]",
            Err(("pools[1].models[0]", "also served by pool `a`")),
        );
        check_config(
            "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}, {address: '127.0.0.1', port: 1}]}]",
            Err(("pools[0].endpoints[1]", "listed twice")),
        );
        check_config(
            "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1', data_parallel_size: 2}, {address: '127.0.0.1:1'}]}]",
            Err(("pools[0].endpoints[1]", "listed twice")),
        );
        check_config(
            "pools: [{name: a, models: [m], endpoints: [{address: 127.0.0.1, ports: [1, 2]}, {address: '127.0.0.1:2', data_parallel_size: 2}]}]",
            Err(("pools[0].endpoints[1]", "listed twice")),
        );
        check_config(
            "proxy: {prefill_timeout_ms: 0}\npools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}]",
            Err(("proxy", "prefill_timeout_ms")),
        );
        check_config("pools: [{name: a, models: [m]}]", Err(("pools[0].endpoints", "needs `endpoints`")));
        check_config(
            "pools: [{name: a, models: [m], endpoints_file: nowhere.yaml}]",
            Err(("pools[0].endpoints_file", "/etc/kvgate/nowhere.yaml is not a file")),
        );
        check_config(
            "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}], scheduler: {plugins: [{type: nope}]}}]",
            Err(("pools[0].scheduler.plugins[0].type", "valid types")),
        );
        check_config("grpc_addr: nope\npools: []", Err(("grpc_addr", "")));
    }

    #[test]
    fn endpoints_files() {
        let dir = std::env::temp_dir().join(format!("kvgate-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write");
            p
        };
        let json = write(
            "eps.json",
            r#"{"endpoints": [{"address": "10.1.0.1:8000"}, {"address": "10.1.0.2", "ports": [1, 2]}]}"#,
        );
        let got: Vec<String> = load_endpoints_file(&json).expect("loads").iter().map(|e| e.to_string()).collect();
        assert_eq!(got, ["10.1.0.1:8000", "10.1.0.2:1", "10.1.0.2:2"]);
        let bad = write("bad.yaml", "endpoints: [{address: 10.1.0.1}]");
        let e = load_endpoints_file(&bad).expect_err("no port");
        assert!(e.to_string().contains("endpoints[0]: `10.1.0.1` has no port"), "{e}");
        let twice =
            write("twice.yaml", "endpoints: [{address: '10.1.0.1:1', data_parallel_size: 2}, {address: '10.1.0.1:1'}]");
        let e = load_endpoints_file(&twice).expect_err("one server, two ways");
        assert!(e.to_string().contains("endpoints[1]") && e.to_string().contains("listed twice"), "{e}");
        let ranks = write("ranks.yaml", "endpoints: [{address: '10.1.0.1:1', data_parallel_size: 3}]");
        assert_eq!(load_endpoints_file(&ranks).expect("ranks share their port").len(), 3);
        let cfg_path = dir.join("kvgate.yaml");
        let cfg = Config::from_yaml(
            "pools: [{name: a, models: [m], endpoints: [{address: '10.1.0.1:8000'}], endpoints_file: eps.json}]",
            &cfg_path,
        )
        .expect("parses");
        let e = cfg.resolve(&cfg_path).expect_err("duplicate across inline and file");
        assert!(e.to_string().contains("listed twice"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
