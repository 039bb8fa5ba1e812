//! `kvgate check-config`: validates a config file and describes what kvgate would run from it —
//! listeners, each pool's resolved endpoints and scheduler, and warnings about settings that
//! change nothing or disagree with the endpoints. Given an endpoints file instead of a config, it
//! says so and validates it as one. The report is text for stdout; the binary only prints it.

use std::fmt::Write as _;
use std::path::Path;

use crate::gateway::config::cluster::ClusterConfig;
use crate::gateway::config::endpoints::{EndpointsDocument, ResolvedEndpoint, load_endpoints_file};
use crate::gateway::config::read::{CONFIG_LIMIT, read_text};
use crate::gateway::config::{Config, ConfigError, DEFAULT_ENDPOINTS_FILE_MAX_BYTES, ResolvedPool};
use crate::routing::endpoint::Role;

/// What makes `check-config` fail: the message it prints after `error: `.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The config does not load, parse or validate.
    #[error(transparent)]
    Config(ConfigError),
    /// An endpoints file (its only key is `endpoints`) that does not load.
    #[error("{source}\n({file} {what}: it was checked as one)", what = ENDPOINTS_FILE)]
    EndpointsFile {
        /// The file, as given.
        file: String,
        /// Why it does not load.
        source: ConfigError,
    },
    /// A bare list of endpoints, not under `endpoints:`.
    #[error(
        "{0}: {what}, but its entries are not under `endpoints:`; an endpoints file reads \
         `endpoints: [{{address: ...}}, ...]`",
        what = ENDPOINTS_FILE
    )]
    BareList(String),
}

/// How `check-config` names a file of endpoints given where a config was expected.
const ENDPOINTS_FILE: &str = "looks like an endpoints file (a list of endpoints), not a kvgate config";

/// Checks `file` (a config, or an endpoints file) and returns the report for stdout.
pub fn check_config(file: &Path) -> Result<String, CheckError> {
    // Read as a config is (a file that is not one is refused by `Config::load` below).
    let document = read_text(file, CONFIG_LIMIT).ok().and_then(|text| EndpointsDocument::of(&text));
    if let Some(document) = document {
        return check_endpoints_file(file, document);
    }
    let cfg = Config::load(file).map_err(CheckError::Config)?;
    let pools = cfg.resolve(file).map_err(CheckError::Config)?;
    let mut out = String::new();
    let mut warnings = Vec::new();
    let _ = writeln!(out, "{}: OK", file.display());
    let _ = writeln!(
        out,
        "listeners: grpc {}, admin {}, proxy {}",
        cfg.grpc_addr,
        cfg.admin_addr,
        cfg.proxy_addr.map_or("off".to_owned(), |a| a.to_string())
    );
    let _ = writeln!(out, "{}", describe_cluster(cfg.cluster.as_ref()));
    for pool in &pools {
        describe_pool(&mut out, pool);
        if let Some(p) = &pool.precise {
            for w in block_size_warnings(pool, p.block_size) {
                warnings.push(format!("pool `{}`: {w}", pool.name));
            }
        }
        for w in &pool.warnings {
            warnings.push(format!("pool `{}`: {w}", pool.name));
        }
    }
    for w in &warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    Ok(out)
}

/// How the replica finds its peers, and what it shares with them.
fn describe_cluster(c: Option<&ClusterConfig>) -> String {
    let Some(c) = c else { return "cluster: off (this replica shares nothing with others)".to_owned() };
    let mut found = Vec::new();
    if !c.peers.is_empty() {
        found.push(format!("the list {} (this replica skips itself)", c.peers.join(", ")));
    }
    if let Some(d) = &c.dns {
        found.push(format!("the addresses of DNS name {d}, looked up every {} ms", c.dns_interval_ms));
    }
    let token = if c.token_file.is_some() { "the token file" } else { "the inline token" };
    format!(
        "cluster: peers from {}; authenticated by {token}; changes sent every {} ms, a silent peer's \
         counts kept {} ms, ready after a peer's snapshot (at most {} ms)",
        found.join(" and "),
        c.sync_interval_ms,
        c.lease_ms,
        c.join_timeout_ms
    )
}

/// One pool's part of the report: its models, endpoint sources and endpoints, scheduler and, in
/// a precise pool, its KV events and tokenizer.
fn describe_pool(out: &mut String, pool: &ResolvedPool) {
    let models =
        if pool.models.is_empty() { "the models its endpoints list".to_owned() } else { pool.models.join(", ") };
    let _ = writeln!(out, "\npool `{}` serves {models}", pool.name);
    let _ = writeln!(out, "  endpoints from: {}", pool.source_kind());
    if let Some(r) = &pool.inference_pool {
        let ns = r.namespace.as_deref().unwrap_or("kvgate's own namespace");
        let _ = writeln!(
            out,
            "  InferencePool {}/{} ({}/v1): its Ready pods, one endpoint per targetPorts entry",
            ns,
            r.name,
            r.group()
        );
    }
    for e in &pool.endpoints {
        let _ = writeln!(out, "  {}", endpoint_line(e));
    }
    if let Some(f) = &pool.endpoints_file {
        let _ = writeln!(out, "  endpoints file {} (now {} endpoints):", f.display(), pool.file_endpoints.len());
        for e in &pool.file_endpoints {
            let _ = writeln!(out, "    endpoint {e} ({}) role {}", e.name, Role::of_labels(&e.labels));
        }
    }
    for line in pool.scheduler.to_string().lines() {
        let _ = writeln!(out, "  {line}");
    }
    describe_flow(out, pool);
    if let Some(p) = &pool.precise {
        let ev = &p.kv_events;
        let how = match (&ev.port, &ev.bind) {
            (Some(port), _) => format!("connects to each endpoint's publisher at tcp://<ip>:{port}+rank"),
            (_, Some(b)) => format!("binds {b} for the engines to connect (topic kv@<ip:port>@<model>)"),
            _ => String::new(),
        };
        let replay = ev.replay_port.map_or("no replay socket".to_owned(), |r| format!("replays from <ip>:{r}+rank"));
        let _ = writeln!(out, "  KV events: {how}; topic filter `{}`; {replay}", ev.topic);
        let _ = writeln!(
            out,
            "  tokenizer {} (chat template: {})",
            p.tokenizer_dir.display(),
            if p.tokenizer.has_chat_template() { "yes" } else { "no" }
        );
    }
}

/// The pool's flow control and objectives, as `check-config` prints them.
fn describe_flow(out: &mut String, pool: &ResolvedPool) {
    let f = &pool.flow;
    if f.enabled {
        let bound = |set: Option<u64>, learned: &str| set.map_or_else(|| learned.to_owned(), |n| n.to_string());
        let _ = writeln!(
            out,
            "  flow control: on; gate {:?}; TTL {} ms; queue at most {} requests / {} bytes ({} / {} per band); {:?} within a flow",
            f.gate,
            f.ttl.as_millis(),
            f.max_requests,
            f.max_bytes,
            f.max_requests_per_band,
            f.max_bytes_per_band,
            f.ordering,
        );
        let _ = writeln!(
            out,
            "    per endpoint: requests {}, prefill tokens {}, scraped waiting {}; lower bands leave {}% of each bound and of the endpoints (free of prefill) to a busy higher one",
            bound(f.max_requests_per_endpoint, "learned from its scrapes"),
            bound(
                f.max_prefill_tokens_per_endpoint,
                &format!("its learned rate × {} ms", f.prefill_window.as_millis())
            ),
            f.max_waiting_per_endpoint,
            f.headroom_percent,
        );
    } else {
        let _ = writeln!(out, "  flow control: off (requests go to the endpoints' own queues)");
    }
    if !pool.objectives.is_empty() {
        let list: Vec<String> = pool.objectives.iter().map(|(n, p)| format!("{n} → {p}")).collect();
        let _ = writeln!(out, "  objectives: {}", list.join(", "));
    }
}

/// `check-config` on a file of endpoints rather than a config: says so, and validates it as the
/// endpoints file a pool's `endpoints_file` names.
fn check_endpoints_file(file: &Path, document: EndpointsDocument) -> Result<String, CheckError> {
    let endpoints = match document {
        EndpointsDocument::File => load_endpoints_file(file, DEFAULT_ENDPOINTS_FILE_MAX_BYTES)
            .map_err(|source| CheckError::EndpointsFile { file: file.display().to_string(), source })?,
        EndpointsDocument::BareList => return Err(CheckError::BareList(file.display().to_string())),
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK as an endpoints file (a list of endpoints), not a kvgate config", file.display());
    let _ = writeln!(out, "reference it from a pool's `endpoints_file` setting; kvgate re-reads it on every change");
    let _ = writeln!(out, "\n{} endpoints:", endpoints.len());
    for e in &endpoints {
        let _ = writeln!(out, "  {}", endpoint_line(e));
    }
    Ok(out)
}

/// `endpoint ADDRESS (NAME) role ROLE rank N`, as `check-config` lists a resolved endpoint.
fn endpoint_line(e: &ResolvedEndpoint) -> String {
    let rank = match e.rank {
        Some(r) if e.rank_header => format!(" rank {r} (pinned with X-data-parallel-rank)"),
        Some(r) => format!(" rank {r}"),
        None => String::new(),
    };
    let role = Role::of_labels(&e.labels);
    let name = if e.name == e.to_string() { String::new() } else { format!(" ({})", e.name) };
    format!("endpoint {e}{name} role {role}{rank}")
}

/// Asks a precise pool's listed endpoints for their `vllm:cache_config_info` (2 s each) and
/// says where its block size disagrees with the scheduler's.
fn block_size_warnings(pool: &ResolvedPool, block_size: u32) -> Vec<String> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return Vec::new() };
    let endpoints: Vec<_> = pool.endpoints.iter().chain(&pool.file_endpoints).collect();
    rt.block_on(async {
        let mut out = Vec::new();
        for e in endpoints {
            let Some(addr) = e.socket_addr() else { continue };
            match crate::gateway::pool::scrape::cache_config(addr, e.rank).await {
                Ok((Some(bs), _)) if bs != u64::from(block_size) => out.push(format!(
                    "endpoint {e} reports block_size {bs} in vllm:cache_config_info, but the precise index starts from {block_size} \
                     (set `blockSize: {bs}` on precise-prefix-cache-producer; events will say so too)"
                )),
                Ok(_) => {}
                Err(err) => out.push(format!("endpoint {e}: cannot read its vllm:cache_config_info ({err})")),
            }
        }
        out
    })
}
