//! The config's sections other than listeners and pools: scraping, health, the proxy,
//! connections, admission, ext_proc and the path policy's patterns (`paths:`, applied by
//! `gateway::paths`), each with its defaults.

use std::path::PathBuf;

use serde::Deserialize;

use crate::routing::request::ApiKind;

/// Metric scraping (applies to every pool).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeConfig {
    /// Time between scrapes of one endpoint while its scraped load is what kvgate's own
    /// in-flight count explains, jittered by up to 20% (default 2000). kvgate's counts are
    /// current to the request, so scraped gauges only correct them; a real vLLM server spends
    /// about 7 ms of CPU on each exposition.
    pub interval_ms: u64,
    /// Time between scrapes while they are not explained: the endpoint's running + waiting
    /// requests differ from kvgate's in-flight count (other clients, a restart), or the last
    /// scrape failed (default 750; at most `interval_ms`). Together they keep a server's cost
    /// within 1% of a core.
    pub fast_interval_ms: u64,
    /// Bound on one scrape (default 1000). One unanswered by then is asked again at once on a
    /// new connection, within `health.unresponsive_ms` of the first question.
    pub timeout_ms: u64,
    /// Scraped load older than this counts as unknown, not idle (default: 2.5 × `interval_ms`,
    /// at least 5000).
    pub stale_after_ms: Option<u64>,
    /// Largest `/metrics` body accepted (default 8 MiB).
    pub max_bytes: usize,
}

impl ScrapeConfig {
    /// `stale_after_ms`, or its default.
    pub fn stale_after_ms(&self) -> u64 {
        self.stale_after_ms.unwrap_or_else(|| (self.interval_ms.saturating_mul(5) / 2).max(5000))
    }
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self { interval_ms: 2000, fast_interval_ms: 750, timeout_ms: 1000, stale_after_ms: None, max_bytes: 8 << 20 }
    }
}

/// The reverse proxy's timeouts and retries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Bound on connecting to an endpoint (default 2000).
    pub connect_timeout_ms: u64,
    /// Bound on an endpoint's response headers after the request is sent (default 300000). A
    /// non-streaming answer only starts when it is complete, and a 100k-token prompt on a loaded
    /// replica of a large model takes minutes (docs/configuration.md works it out); past the
    /// bound the request is tried on the next endpoint, redoing its prefill. A stopped endpoint
    /// does not wait for it: it is ejected as silent (`health.unresponsive_ms`) and what waits
    /// for its answer goes elsewhere.
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
            first_byte_timeout_ms: 300_000,
            idle_timeout_ms: 300_000,
            attempts: 3,
            prefill_timeout_ms: 30_000,
            retry_budget_percent: 50,
            min_retry_concurrency: 10,
        }
    }
}

/// Bounds on the connections of every listener: proxy, admin, gRPC (ext_proc, picker API,
/// health, reflection) and `health_addr`; and on request bodies (the proxy's and the Envoy
/// picker's: their pace, and one client's share of `max_buffered_bytes`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsConfig {
    /// Time a connection may go without a request in flight before it is closed, whatever it
    /// sent: from its accept (a TLS handshake included) to its first request's headers, and
    /// from the end of each response to the next request — so also the idle timeout of a
    /// kept-alive HTTP/1 or HTTP/2 connection. HTTP/2 peers are pinged after as long without a
    /// frame, and closed if the ping is not answered within as long (default 30000).
    pub header_read_timeout_ms: u64,
    /// Connections open at once per listener; at the cap a new one closes the connection idle
    /// the longest (no request in flight), and is itself closed only when none is idle
    /// (default 4096, at most 1048576).
    pub max_connections: usize,
    /// The most of `max_connections` one client address (an IPv4 address, an IPv6 /64) may
    /// hold at once, in percent (default 50); at it, that client's own oldest idle connection
    /// makes room, or its new one is closed, so a client whose connections are all busy (streams
    /// it never ends) leaves the rest to others. Behind a load balancer that hides client
    /// addresses, set 100.
    pub max_connections_per_client_percent: u32,
    /// Longest wait for the next bytes of a request body; past it the request is a 408
    /// (default 30000).
    pub body_read_timeout_ms: u64,
    /// Least rate of a request body, bytes per second, held over every stretch of its time: a
    /// body may fall behind it by at most `body_rate_window_ms` worth of bytes, or it is a 408
    /// (default 1024; 0 turns it off).
    pub min_body_bytes_per_s: u64,
    /// How far behind `min_body_bytes_per_s` a body may fall, as time: its first window is its
    /// grace, and every stretch of `T` ms must bring at least `min_body_bytes_per_s × (T −
    /// body_rate_window_ms) / 1000` bytes (default 5000).
    pub body_rate_window_ms: u64,
    /// Longest time a request body may take in all, from its first byte read (proxy) or its
    /// request's headers (ext_proc); a body still arriving then is a 408 (default 300000: the
    /// default 32 MiB `max_body_bytes` at about 0.9 Mbit/s).
    pub body_timeout_ms: u64,
    /// The most of `max_buffered_bytes` one client address may hold at once, in percent
    /// (default 25); past it that client's bodies get 503 `overloaded` while others still get in.
    pub max_body_share_percent: u32,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 30_000,
            max_connections: 4096,
            max_connections_per_client_percent: 50,
            body_read_timeout_ms: 30_000,
            min_body_bytes_per_s: 1024,
            body_rate_window_ms: 5_000,
            body_timeout_ms: 300_000,
            max_body_share_percent: 25,
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
    /// Silence that takes an endpoint out of rotation at once (default 2000): a scrape unanswered
    /// after `scrape.timeout_ms`, asked again on a new connection, and still unanswered this
    /// long after the first question, with no byte of any response from the endpoint meanwhile —
    /// a stopped process (its kernel still accepts connections) or a wedged server. Requests
    /// waiting for its first byte then go to another endpoint, and its streams end. A value
    /// under `scrape.timeout_ms` acts as `scrape.timeout_ms` (no second question). With the
    /// default scrape interval, a stopped endpoint is out within 4.4 s.
    pub unresponsive_ms: u64,
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
        Self {
            failure_threshold: 3,
            unresponsive_ms: 2000,
            max_ejection_percent: 50,
            backoff_ms: 500,
            max_backoff_ms: 30_000,
        }
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
    pub(crate) fn problem(&self) -> Option<String> {
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
    /// more: an ordered fallback list for `override_host`). A cap over every pool: a pool whose
    /// picker sets `maxNumOfEndpoints` lists the smaller of the two; unset, the pool's
    /// `maxNumOfEndpoints` decides, and 1 when that is unset too.
    pub max_endpoints: Option<usize>,
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

/// kvgate's own picker API: who may call it, how long a picked decision waits for its reports,
/// and how much of the server one client, and the API as a whole, may hold.
///
/// Keys: `start_timeout_ms`, `report_timeout_ms`, `max_pending`, `max_pending_per_client`,
/// `max_watches`, `max_watches_per_client`, `admission_share`, `token`, `token_file`,
/// `require_client_cert`. A client is its peer IP address (an IPv6 client, its /64).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PickerApiConfig {
    /// A decision with no report at all this long after it was picked is released (its
    /// in-flight count ends): its caller is gone (default 1 minute).
    pub start_timeout_ms: u64,
    /// A decision with no report this long after its last one (and no final report) is
    /// released (default 10 minutes: longer than most generations take between their first
    /// token and their end).
    pub report_timeout_ms: u64,
    /// Decisions held for their reports at once; past it `Pick` fails with RESOURCE_EXHAUSTED.
    pub max_pending: usize,
    /// Decisions held for one client's reports at once; past it that client's `Pick` fails with
    /// RESOURCE_EXHAUSTED (default `max_pending / 8`, at least 1).
    pub max_pending_per_client: Option<usize>,
    /// `WatchEndpoints` streams open at once (default 256).
    pub max_watches: usize,
    /// `WatchEndpoints` streams one client may have open at once (default 32).
    pub max_watches_per_client: usize,
    /// The share of a pool's `admission.max_in_flight` that decisions held for the picker
    /// API's reports may take (default 0.5, rounded down): past it a `Pick` for the pool is
    /// refused as a saturated pool is (429 `saturated`), so unreported picks never push the
    /// proxy or Envoy into 429. Held decisions still count as the endpoints' load.
    pub admission_share: f64,
    /// The bearer token every `kvgate.v1.Picker` call must carry (`authorization: Bearer
    /// <token>`), given inline; or see `token_file`.
    pub token: Option<Secret>,
    /// A file holding the bearer token (surrounding whitespace ignored), as a Kubernetes Secret
    /// is mounted; re-read every second, so a rotated Secret takes effect without a restart (a
    /// read that fails keeps the last good token, and is logged).
    pub token_file: Option<PathBuf>,
    /// Refuse picker API calls (UNAUTHENTICATED) from clients without a TLS certificate that
    /// `extproc.tls.client_ca_path` verified (default false; it needs that CA, and the config
    /// is refused without it). ext_proc and gRPC health never ask for one.
    pub require_client_cert: bool,
}

impl Default for PickerApiConfig {
    fn default() -> Self {
        Self {
            start_timeout_ms: 60_000,
            report_timeout_ms: 600_000,
            max_pending: 65_536,
            max_pending_per_client: None,
            max_watches: 256,
            max_watches_per_client: 32,
            admission_share: 0.5,
            token: None,
            token_file: None,
            require_client_cert: false,
        }
    }
}

impl PickerApiConfig {
    /// `max_pending_per_client`, or its default: an eighth of `max_pending`.
    pub fn pending_per_client(&self) -> usize {
        self.max_pending_per_client.unwrap_or(self.max_pending / 8).max(1)
    }

    /// Whether calls must prove who makes them: a token, or a client certificate.
    pub fn authenticates(&self) -> bool {
        self.token.is_some() || self.token_file.is_some() || self.require_client_cert
    }

    /// What is wrong with the section beyond its bounds, as `(key, message)`.
    pub(crate) fn problem(&self) -> Option<(&'static str, String)> {
        if self.token.is_some() && self.token_file.is_some() {
            return Some(("picker_api.token", "give `token` or `token_file`, not both".into()));
        }
        if self.token.as_ref().is_some_and(|t| t.expose().trim().is_empty()) {
            return Some(("picker_api.token", "must not be empty".into()));
        }
        if self.pending_per_client() > self.max_pending {
            let message = format!("at most max_pending ({}); got {}", self.max_pending, self.pending_per_client());
            return Some(("picker_api.max_pending_per_client", message));
        }
        if self.max_watches_per_client > self.max_watches {
            let message = format!("at most max_watches ({}); got {}", self.max_watches, self.max_watches_per_client);
            return Some(("picker_api.max_watches_per_client", message));
        }
        None
    }
}

/// A secret given in the config: its value never shows in logs or debug output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A PEM certificate (chain) and its private key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert_path: PathBuf,
    /// Private key (PEM).
    pub key_path: PathBuf,
    /// CA bundle (PEM) that verifies client certificates, when clients present one; a listener
    /// with it asks for them but still serves clients without (see
    /// `picker_api.require_client_cert`).
    #[serde(default)]
    pub client_ca_path: Option<PathBuf>,
}

impl Default for ExtProcConfig {
    fn default() -> Self {
        Self {
            max_endpoints: None,
            request_body_mode: BodyMode::FullDuplexStreamed,
            response_body_mode: BodyMode::FullDuplexStreamed,
            max_message_bytes: 64 << 20,
            conformance_test_filter: false,
            tls: None,
            self_signed_tls: false,
        }
    }
}

/// A pool's `kv_events`: following its endpoints' KV-event publishers (with `tokenizer`, the
/// precise prefix index). Either `port` (kvgate connects to every endpoint) or `bind` (the
/// engines connect to kvgate).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KvEventsSpec {
    /// Connect to each endpoint's publisher at `tcp://<endpoint ip>:<port + rank>` (vLLM
    /// started with `"endpoint": "tcp://*:<port>"`).
    #[serde(default)]
    pub port: Option<u16>,
    /// Bind one SUB socket here (`tcp://0.0.0.0:5557`); engines connect to it (vLLM started
    /// with `"endpoint": "tcp://<kvgate>:5557"`) and batches are attributed by their topic
    /// `kv@<ip:port>@<model>` and data-parallel rank.
    #[serde(default)]
    pub bind: Option<String>,
    /// Subscription filter: topics starting with this (default: every topic).
    #[serde(default)]
    pub topic: String,
    /// The engines' replay sockets, at `tcp://<endpoint ip>:<replay_port + rank>`; lost
    /// batches are asked for again there.
    #[serde(default)]
    pub replay_port: Option<u16>,
    /// An endpoint whose answered requests have waited this long without any event is matched
    /// approximately until events arrive again (default 5000).
    #[serde(default = "default_events_stale_ms")]
    pub stale_after_ms: u64,
}

fn default_events_stale_ms() -> u64 {
    5000
}

impl KvEventsSpec {
    /// What is wrong with the section, if anything.
    pub fn problem(&self) -> Option<String> {
        match (&self.port, &self.bind) {
            (Some(_), Some(_)) => {
                return Some("give `port` (kvgate connects) or `bind` (engines connect), not both".into());
            }
            (None, None) => {
                return Some(
                    "needs `port` (kvgate connects to each endpoint) or `bind` (engines connect to kvgate)".into(),
                );
            }
            _ => {}
        }
        if let Some(b) = &self.bind
            && bind_address(b).is_none()
        {
            return Some(format!("`bind` must be tcp://<ip>:<port>, got `{b}`"));
        }
        if self.port == Some(0) || self.replay_port == Some(0) {
            return Some("`port` and `replay_port` must not be 0".into());
        }
        if self.stale_after_ms == 0 {
            return Some("`stale_after_ms` must be at least 1".into());
        }
        None
    }
}

/// The address of a `tcp://ip:port` endpoint (`*` for every interface).
pub fn bind_address(endpoint: &str) -> Option<std::net::SocketAddr> {
    let rest = endpoint.strip_prefix("tcp://")?;
    let rest = rest.replacen('*', "0.0.0.0", 1);
    rest.parse().ok()
}

/// The `paths:` section of the config. A pattern is a path (`/tokenize`), or a prefix ending in
/// `*` (`/v1/audio/*`); a trailing `/` and the query string are ignored when matching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// API paths placed by their prompt (default: the four kvgate parses).
    pub prompt: Vec<String>,
    /// Paths sent to an endpoint of their JSON body's `model`, by load alone (default: the
    /// serving APIs a vLLM server has besides those: `/tokenize`, `/detokenize`, scoring,
    /// reranking, pooling and classification).
    pub model: Vec<String>,
    /// Paths refused even when a pattern above matches them (default: none).
    pub refuse: Vec<String>,
}

impl Default for PathsConfig {
    fn default() -> Self {
        let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        Self {
            prompt: ApiKind::ALL.iter().map(|a| a.path().to_owned()).collect(),
            model: own(&[
                "/tokenize",
                "/detokenize",
                "/v1/score",
                "/score",
                "/v1/rerank",
                "/v2/rerank",
                "/rerank",
                "/pooling",
                "/classify",
            ]),
            refuse: Vec::new(),
        }
    }
}

impl PathsConfig {
    /// What is wrong with the patterns, as `(field, message)`; `None` when they compile.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if let Some(p) = self.prompt.iter().find(|p| p.contains('*') || ApiKind::from_path(p).is_none()) {
            let known: Vec<&str> = ApiKind::ALL.iter().map(|a| a.path()).collect();
            let message = format!("kvgate parses the prompt of {} only; `{p}` is none of them", known.join(", "));
            return Some(("paths.prompt", message));
        }
        [("paths.model", &self.model), ("paths.refuse", &self.refuse)]
            .into_iter()
            .find_map(|(field, list)| list.iter().find_map(|p| pattern_parts(p).err()).map(|m| (field, m)))
    }
}

/// A path pattern's path and whether it is a prefix (`/p/*`), or what is wrong with it.
pub fn pattern_parts(text: &str) -> Result<(&str, bool), String> {
    if !text.starts_with('/') {
        return Err(format!("`{text}` is not a path; patterns start with `/`"));
    }
    let (body, prefix) = match text.strip_suffix('*') {
        Some(p) => (p, true),
        None => (text, false),
    };
    if body.contains(['*', '?', '#']) {
        return Err(format!("`{text}`: only a trailing `*` is a wildcard, and no query part is matched"));
    }
    Ok((body, prefix))
}
