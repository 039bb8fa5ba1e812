//! Endpoint entries — the same inline in the config and in an endpoints file — and their
//! resolution into one [`ResolvedEndpoint`] per `host:port` (and per data-parallel rank).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;

use super::located::Lines;
use super::read::{Limit, read_text};
use super::{ConfigError, parse_yaml};
use crate::routing::endpoint::{ROLE_LABEL, Role};

/// Data-parallel ranks one endpoint entry may declare (InferencePool `targetPorts` allows 8).
pub const MAX_RANK_PORTS: usize = 8;
/// Data-parallel ranks one port may front (`data_parallel_size`).
pub const MAX_HEADER_RANKS: u32 = 64;

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

/// Why an endpoint entry is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EntryError(String);

fn bad(message: impl Into<String>) -> EntryError {
    EntryError(message.into())
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
    pub fn resolve(&self) -> Result<Vec<ResolvedEndpoint>, EntryError> {
        let (host, addr_port) = parse_address(&self.address)?;
        let ports: Vec<(u16, Option<u32>)> = match (addr_port, self.port, &self.ports) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(bad(format!("`{}` already has a port; drop `port`/`ports`", self.address)));
            }
            (_, Some(_), Some(_)) => return Err(bad("give `port` or `ports`, not both")),
            (Some(p), None, None) | (None, Some(p), None) => vec![(p, None)],
            (None, None, Some(ps)) => {
                if ps.is_empty() || ps.len() > MAX_RANK_PORTS {
                    return Err(bad(format!("`ports` needs 1 to {MAX_RANK_PORTS} ports, got {}", ps.len())));
                }
                let mut seen = HashSet::new();
                if let Some(d) = ps.iter().find(|p| !seen.insert(**p)) {
                    return Err(bad(format!("port {d} appears twice in `ports`")));
                }
                ps.iter().enumerate().map(|(rank, &p)| (p, Some(rank as u32))).collect()
            }
            (None, None, None) => {
                return Err(bad(format!("`{}` has no port; add `:port`, `port` or `ports`", self.address)));
            }
        };
        if let Some(p) = ports.iter().find(|(p, _)| *p == 0) {
            return Err(bad(format!("port {} is not a valid port", p.0)));
        }
        let ports = match self.data_parallel_size {
            None => ports,
            Some(_) if self.ports.is_some() => {
                return Err(bad("give `ports` (one port per rank) or `data_parallel_size` (ranks behind one port), \
                            not both"));
            }
            Some(n) if n == 0 || n > MAX_HEADER_RANKS => {
                return Err(bad(format!("`data_parallel_size` must be 1 to {MAX_HEADER_RANKS}, got {n}")));
            }
            Some(n) => (0..n).map(|r| (ports[0].0, Some(r))).collect(),
        };
        let rank_header = self.data_parallel_size.is_some();
        if let Some(v) = self.labels.get(ROLE_LABEL).filter(|v| Role::from_label(v).is_none()) {
            return Err(bad(format!("label `{ROLE_LABEL}: {v}` is not a role; use prefill, decode or both")));
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
fn parse_address(addr: &str) -> Result<(Host, Option<u16>), EntryError> {
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
            let port = p.parse::<u16>().map_err(|_| bad(format!("`{addr}`: `{p}` is not a port number")))?;
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
        return Err(bad(format!("`{addr}` is not an IP, ip:port or host name")));
    }
    Ok((Host::Name(name.to_owned()), port))
}

/// The document of an endpoints file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointsFile {
    endpoints: Vec<EndpointSpec>,
}

/// A document that is not a kvgate config but holds endpoints, told apart by its top level
/// alone (a config has `pools`, never `endpoints`, and is never a list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointsDocument {
    /// A mapping whose only key is `endpoints`: an endpoints file.
    File,
    /// A list at the top level: endpoint entries, but not under `endpoints:`.
    BareList,
}

impl EndpointsDocument {
    /// What `text` is, if it is one of these; `None` for anything else (a config, or a
    /// document too broken to tell).
    pub fn of(text: &str) -> Option<Self> {
        use serde::de::IgnoredAny;
        if let Ok(top) = parse_yaml::<BTreeMap<String, IgnoredAny>>(text) {
            return (top.len() == 1 && top.contains_key("endpoints")).then_some(Self::File);
        }
        parse_yaml::<Vec<IgnoredAny>>(text).ok().filter(|l| !l.is_empty()).map(|_| Self::BareList)
    }
}

/// Reads an endpoints file (YAML or JSON: `endpoints: [...]`) of at most `max_bytes` (a pool's
/// `endpoints_file_max_bytes`) and resolves its entries. Only a regular file is read (see
/// [`read_text`]); blocking: run it off an async runtime.
pub fn load_endpoints_file(path: &Path, max_bytes: u64) -> Result<Vec<ResolvedEndpoint>, ConfigError> {
    let text = read_text(path, Limit { bytes: max_bytes, set_by: "`endpoints_file_max_bytes`" })?;
    let lines = Lines::of(&text);
    let invalid = |at: String, message: String| ConfigError::Invalid {
        path: path.display().to_string(),
        line: lines.get(&at),
        at,
        message,
    };
    let file: EndpointsFile = parse_yaml(&text).map_err(|(at, m)| invalid(at, m))?;
    let mut out = Vec::new();
    let mut seen = Claims::new();
    for (j, e) in file.endpoints.iter().enumerate() {
        for r in e.resolve().map_err(|m| invalid(format!("endpoints[{j}]"), m.to_string()))? {
            if !first_use(&mut seen, &r) {
                return Err(invalid(format!("endpoints[{j}]"), format!("endpoint {r} is listed twice")));
            }
            out.push(r);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::config::{Config, DEFAULT_ENDPOINTS_FILE_MAX_BYTES as MAX};

    fn check_endpoint(yaml: &str, want: Result<&[&str], &str>) {
        let spec: EndpointSpec = parse_yaml(yaml).unwrap_or_else(|e| panic!("{yaml}: {e:?}"));
        match (spec.resolve(), want) {
            (Ok(got), Ok(want)) => {
                let got: Vec<String> = got.iter().map(|e| e.to_string()).collect();
                assert_eq!(got, want, "{yaml}");
            }
            (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{yaml}: `{e}` lacks `{needle}`"),
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

    #[test]
    fn endpoints_documents() {
        let check = |text: &str, want: Option<EndpointsDocument>| {
            assert_eq!(EndpointsDocument::of(text), want, "{text}");
        };
        check("endpoints: [{address: '10.0.0.1:8000'}]", Some(EndpointsDocument::File));
        check(r#"{"endpoints": []}"#, Some(EndpointsDocument::File));
        check("- {address: '10.0.0.1:8000'}\n- {address: '10.0.0.2:8000'}\n", Some(EndpointsDocument::BareList));
        check("pools: [{name: a, models: [m], endpoints: [{address: '10.0.0.1:8000'}]}]", None);
        check("endpoints: []\npools: []", None);
        check("admin_addr: 127.0.0.1:9090", None);
        check("pools: [ {name: a\n", None);
        check("", None);
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
        let got: Vec<String> = load_endpoints_file(&json, MAX).expect("loads").iter().map(|e| e.to_string()).collect();
        assert_eq!(got, ["10.1.0.1:8000", "10.1.0.2:1", "10.1.0.2:2"]);
        let bad = write("bad.yaml", "endpoints: [{address: 10.1.0.1}]");
        let e = load_endpoints_file(&bad, MAX).expect_err("no port");
        assert!(e.to_string().contains("endpoints[0]: `10.1.0.1` has no port"), "{e}");
        let twice =
            write("twice.yaml", "endpoints: [{address: '10.1.0.1:1', data_parallel_size: 2}, {address: '10.1.0.1:1'}]");
        let e = load_endpoints_file(&twice, MAX).expect_err("one server, two ways");
        assert!(e.to_string().contains("endpoints[1]") && e.to_string().contains("listed twice"), "{e}");
        let ranks = write("ranks.yaml", "endpoints: [{address: '10.1.0.1:1', data_parallel_size: 3}]");
        assert_eq!(load_endpoints_file(&ranks, MAX).expect("ranks share their port").len(), 3);
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
