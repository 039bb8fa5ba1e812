//! The reference endpoint picker's own routing cases, replayed against kvgate's ext_proc server
//! over gRPC on loopback: the Gateway API Inference Extension's hermetic picker cases (three
//! endpoints with pinned waiting queues, KV-cache usage and running adapters) and its
//! lightweight picker's subset-hint table.
//!
//! Every endpoint is a `kvgate sim` whose load families are pinned with `--fake-metrics`, and a
//! case starts only once kvgate's `/debug/endpoints` shows the pinned values scraped and a dry
//! run on `/debug/explain` sees them in the snapshot the scheduler reads. The reference's pod-0,
//! pod-1 and pod-2 are `fleet.pod(0)`, `pod(1)` and `pod(2)`.
//!
//! Two translations. The reference rewrote a requested model (`sql-lora`) to its adapter
//! (`sql-lora-1fdg2`) through an InferenceModel object; kvgate has no such objects, so the body
//! names the adapter itself. Its sheddable objective is a body `priority` below 0 here, which is
//! how kvgate tells a sheddable request.
//!
//! The scheduler. The shedding and subset cases run on kvgate's default profile. The others
//! do not come out as the reference's under it: it has no LoRA scorer, and its
//! `no-hit-lru-scorer` rotates cold requests over the endpoints in a fixed order, which
//! outweighs the small queue and KV differences those cases turn on (the first cold request
//! goes to pod 0). So they configure the pool with the reference harness's own
//! EndpointPickerConfig, [`REFERENCE_SCHEDULER`].

use super::*;

use std::net::SocketAddr;

use crate::common::Sim;
use crate::common::extproc_msg::{SUBSET_KEY, request_headers_in_value_field, string, string_list, subset_hint_with};
use envoy_types::pb::envoy::config::core::v3::Metadata;

/// kvgate's default profile (a pool without a `scheduler` section).
const DEFAULT_PROFILE: &str = "";

/// The scheduler of the reference picker's hermetic test harness: queue, KV-cache, prefix and
/// LoRA-affinity scorers at weight 1 (its max-score picker is kvgate's default too).
const REFERENCE_SCHEDULER: &str = "
    scheduler:
      plugins:
        - type: queue-scorer
        - type: kv-cache-utilization-scorer
        - type: prefix-cache-scorer
        - type: lora-affinity-scorer
      schedulingProfiles:
        - name: default
          plugins:
            - pluginRef: queue-scorer
            - pluginRef: kv-cache-utilization-scorer
            - pluginRef: prefix-cache-scorer
            - pluginRef: lora-affinity-scorer";

/// The adapters of the cases; every endpoint serves both, as every pod of the reference's pool
/// could load them. Which ones are running differs per endpoint.
const SQL_LORA: &str = "sql-lora-1fdg2";
const SHEDDABLE_LORA: &str = "sql-lora-1fdg3";

/// What one endpoint's `/metrics` reports.
#[derive(Debug, Clone, Copy)]
struct Pinned {
    waiting: u32,
    kv_usage: f64,
    /// Adapters with running requests, comma-separated.
    running: &'static str,
}

fn pinned(waiting: u32, kv_usage: f64, running: &'static str) -> Pinned {
    Pinned { waiting, kv_usage, running }
}

/// Simulated endpoints behind one kvgate.
struct Fleet {
    sims: Vec<Sim>,
    kv: kvgate::tools::serve::Server,
}

impl Fleet {
    /// Starts one simulator per `pins` entry (on `hosts[k]`, a loopback address), each reporting
    /// its pinned load and serving both adapters, and kvgate over them with `pool` added to
    /// the pool's entry and `top` to the file; returns once every pinned value is scraped.
    async fn start(pins: &[Option<Pinned>], hosts: &[&str], pool: &str, top: &str) -> Self {
        let mut builder = gateway(MODEL).config(top).pool(pool);
        for (pin, host) in pins.iter().zip(hosts) {
            let mut flags = vec!["--host", host, "--time-scale", "0", "--enable-lora", "--max-loras", "4"];
            let adapters =
                [format!("{SQL_LORA}=/adapters/{SQL_LORA}"), format!("{SHEDDABLE_LORA}=/adapters/{SHEDDABLE_LORA}")];
            flags.push("--lora-modules");
            flags.extend(adapters.iter().map(String::as_str));
            let fake = pin.map(|p| {
                json!({"waiting-requests": p.waiting, "kv-cache-usage": p.kv_usage,
                       "loras": [{"running": p.running, "waiting": "", "timestamp": 1_700_000_000}]})
                .to_string()
            });
            if let Some(f) = &fake {
                flags.extend(["--fake-metrics", f.as_str()]);
            }
            builder = builder.sim(&flags);
        }
        let common::Fleet { sims, kv, .. } = builder.start_without_waiting().await;
        let fleet = Self { sims, kv };
        fleet.wait_ready(pins).await;
        fleet
    }

    /// `ip:port` of endpoint `k`.
    fn pod(&self, k: usize) -> SocketAddr {
        self.sims[k].addrs[0]
    }

    /// Waits until kvgate shows every endpoint scraped with its pinned queue and KV usage (the
    /// LoRA series come in the same scrape) and its adapters listed, and then until the
    /// snapshot the scheduler reads, published a few milliseconds after the scrape, has them
    /// too: a dry run on `/debug/explain` finds every endpoint serving an adapter and scores
    /// it with its pinned KV usage.
    async fn wait_ready(&self, pins: &[Option<Pinned>]) {
        let admin = format!("http://{}", self.kv.admin_addr);
        let find = |list: &serde_json::Value, k: usize| {
            let addr = self.pod(k).to_string();
            list.as_array().and_then(|es| es.iter().find(|e| e["address"] == addr.as_str())).cloned()
        };
        let kv_usage = |k: usize| pins[k].map_or(0.0, |p| p.kv_usage);
        let scraped = |v: &serde_json::Value| {
            (0..pins.len()).all(|k| {
                find(&v["pools"][0]["endpoints"], k).is_some_and(|e| {
                    let load = pins[k].is_none_or(|p| e["waiting"] == p.waiting);
                    let kv = e["kv_cache_usage"].as_f64().is_some_and(|x| (x - kv_usage(k)).abs() < 1e-9);
                    e["stale"] == false && e["adapters"].as_array().is_some_and(|a| a.len() == 2) && load && kv
                })
            })
        };
        let debug = format!("{admin}/debug/endpoints");
        let ok = eventually(10, || async { scraped(&get_json(&debug).await) }).await;
        assert!(ok, "pinned load scraped: {}", get_json(&debug).await);
        let explain = format!("{admin}/debug/explain?path=/v1/completions");
        let probe = json!({"model": SQL_LORA, "prompt": "probe"});
        let published = |v: &serde_json::Value| {
            (0..pins.len()).all(|k| {
                find(&v["explanation"]["endpoints"], k).is_some_and(|e| {
                    let kv_score = e["scores"].as_array().and_then(|ss| {
                        ss.iter().find(|s| s["scorer"] == "kv-cache-utilization-scorer").and_then(|s| s["raw"].as_f64())
                    });
                    e["filtered_by"].is_null() && kv_score.is_some_and(|x| (x - (1.0 - kv_usage(k))).abs() < 1e-9)
                })
            })
        };
        let ok = eventually(10, || async { published(&common::post(&explain, &probe).await.1) }).await;
        assert!(ok, "pinned load published: {}", common::post(&explain, &probe).await.1);
    }
}

/// How the request reaches kvgate.
#[derive(Debug, Clone, Copy)]
struct Wire {
    /// The request body mode Envoy announces.
    mode: BodySendMode,
    /// Header values in `raw_value` (as Envoy sends them) or in the older `value` field.
    raw: bool,
    /// Body messages.
    chunks: usize,
}

/// FULL_DUPLEX_STREAMED, values in `raw_value`, the body in one message.
const ENVOY: Wire = Wire { mode: BodySendMode::FullDuplexStreamed, raw: true, chunks: 1 };

/// What kvgate answered: the destination list, or the status of an immediate response.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Routed(Vec<SocketAddr>),
    Refused(u16),
}

/// The completions body of the reference cases.
fn completion(model: &str, prompt: &str, priority: Option<i64>) -> Vec<u8> {
    let mut v = json!({"max_tokens": 100, "model": model, "prompt": prompt, "temperature": 0});
    if let Some(p) = priority {
        v["priority"] = json!(p);
    }
    v.to_string().into_bytes()
}

/// The request headers of the reference cases, with the values where `raw` says.
fn reference_headers(raw: bool) -> ProcessingRequest {
    let pairs = [(":method", "POST"), (":path", "/v1/completions"), ("content-type", "application/json")];
    if raw { request_headers(&pairs, false) } else { request_headers_in_value_field(&pairs, false) }
}

/// Sends one request the way Envoy does and reads kvgate's answer, checking the wire contract
/// on the way: a pick is in the header and in `envoy.lb` metadata alike, and in full duplex
/// mode the body comes back byte for byte after it.
async fn send(fleet: &Fleet, body: &[u8], wire: Wire, hint: Option<Metadata>) -> Answer {
    let mut s = Stream::open(fleet.kv.grpc_addr).await;
    let announced = ProtocolConfiguration { request_body_mode: wire.mode as i32, ..Default::default() };
    s.send(ProcessingRequest {
        protocol_config: Some(announced),
        metadata_context: hint,
        ..reference_headers(wire.raw)
    })
    .await;
    if wire.mode == BodySendMode::Buffered {
        // Buffered: the headers are answered at once, without a pick.
        let r = s.recv().await;
        assert!(matches!(r.response, Some(Resp::RequestHeaders(_))) && destination(&r).is_none(), "{r:?}");
    }
    let part = body.len().div_ceil(wire.chunks.max(1)).max(1);
    for chunk in request_body_chunks(body, part) {
        s.send(chunk).await;
    }
    let r = s.recv().await;
    if let Some(Resp::ImmediateResponse(ir)) = &r.response {
        return Answer::Refused(ir.status.as_ref().map_or(0, |st| st.code as u16));
    }
    let dest = destination(&r).expect("a destination header");
    assert_eq!(metadata_destination(&r).as_deref(), Some(dest.as_str()), "header and metadata agree");
    let common = match (&r.response, wire.mode) {
        (Some(Resp::RequestBody(b)), BodySendMode::Buffered) => b.response.as_ref(),
        (Some(Resp::RequestHeaders(h)), BodySendMode::FullDuplexStreamed) => h.response.as_ref(),
        (other, mode) => panic!("in {mode:?} mode the pick came in {other:?}"),
    };
    assert!(common.is_some_and(|c| c.clear_route_cache), "the route cache is cleared");
    if wire.mode == BodySendMode::FullDuplexStreamed {
        let mut echoed = Vec::new();
        loop {
            let (chunk, eos) = streamed_body(&s.recv().await).expect("a body chunk");
            echoed.extend(chunk);
            if eos {
                break;
            }
        }
        assert_eq!(echoed, body, "the body comes back unchanged");
    }
    Answer::Routed(dest.split(',').map(|a| a.parse().expect("ip:port")).collect())
}

/// One replayed routing case: endpoints pinned as the reference pinned its pods, the pool on
/// `scheduler`, one request; `want` is the pod kvgate must pick.
async fn check(pins: [Pinned; 3], scheduler: &str, body: Vec<u8>, wire: Wire, want: usize) {
    let fleet = Fleet::start(&pins.map(Some), &["127.0.0.1"; 3], scheduler, "").await;
    let answer = send(&fleet, &body, wire, None).await;
    assert_eq!(answer, Answer::Routed(vec![fleet.pod(want)]), "pod {want} expected");
}

// --- Routing cases ("select … " in the reference's table) ---

/// "select lower queue and kv cache, no active lora": pod 1 has the shortest queue and the
/// least KV usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_queue_and_kv_cache_win_without_adapters() {
    let pins = [pinned(3, 0.2, ""), pinned(0, 0.1, ""), pinned(10, 0.2, "")];
    check(pins, REFERENCE_SCHEDULER, completion(MODEL, "test1", None), ENVOY, 1).await;
}

/// The same case in BUFFERED mode: the headers are answered at once and the pick rides on the
/// body's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_mode_gives_the_pick_on_the_body_answer() {
    let pins = [pinned(3, 0.2, ""), pinned(0, 0.1, ""), pinned(10, 0.2, "")];
    let buffered = Wire { mode: BodySendMode::Buffered, ..ENVOY };
    check(pins, REFERENCE_SCHEDULER, completion(MODEL, "test1", None), buffered, 1).await;
}

/// "select active lora, low queue": pod 1 runs the adapter, has no queue and the least KV usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_adapter_and_a_short_queue_win() {
    let pins = [pinned(0, 0.2, "foo,bar"), pinned(0, 0.1, "foo,sql-lora-1fdg2"), pinned(10, 0.2, "foo,bar")];
    check(pins, REFERENCE_SCHEDULER, completion(SQL_LORA, "test2", None), ENVOY, 1).await;
}

/// "select no lora despite active model, avoid excessive queue size": pod 1 runs the adapter
/// but has 200 requests waiting; pod 2, with the shortest queue and room for the adapter, wins.
/// Room counts: every endpoint takes 4 adapters at once (`--max-loras 4`), so the LoRA scorer
/// gives pods 0 and 2, with fewer running, 0.8 of what pod 1 gets for running it. Were each
/// limited to the one adapter (vLLM's default), pod 1's adapter and lower KV usage would
/// outweigh its queue under these weights, and it would be picked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_affinity_gives_way_to_an_excessive_queue() {
    let pins = [pinned(10, 0.2, "foo,bar"), pinned(200, 0.1, "foo,sql-lora-1fdg2"), pinned(6, 0.2, "foo")];
    check(pins, REFERENCE_SCHEDULER, completion(SQL_LORA, "test3", None), ENVOY, 2).await;
}

// --- Shedding ("noncritical …" in the reference's table) ---

/// Every endpoint runs the sheddable adapter, and each is past a threshold of the reference's
/// (queue 6 > 5, KV 0.85 and 0.9 > 0.8).
fn past_thresholds() -> [Pinned; 3] {
    [
        pinned(6, 0.2, "foo,bar,sql-lora-1fdg3"),
        pinned(0, 0.85, "foo,sql-lora-1fdg3"),
        pinned(10, 0.9, "foo,sql-lora-1fdg3"),
    ]
}

/// "noncritical and all models past threshold, shed request". The reference answers 429.
/// kvgate sheds only under admission limits a pool sets (`admission:`), and none are set by
/// default: the request is routed, to pod 0 (the best queue and KV usage taken together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sheddable_request_is_routed_where_the_reference_sheds_it() {
    check(past_thresholds(), DEFAULT_PROFILE, completion(SHEDDABLE_LORA, "test4", Some(-1)), ENVOY, 0).await;
}

/// The same endpoints with admission limits: the sheddable request is refused with 429 as the
/// reference refuses it, while a critical one is still routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_limits_shed_the_sheddable_request() {
    // 16 requests wait in all: under the limit of 20, at the sheddable limit (20 × 0.8 = 16).
    let pool = "\n    admission: {max_queued: 20}";
    let fleet = Fleet::start(&past_thresholds().map(Some), &["127.0.0.1"; 3], pool, "").await;
    let critical = send(&fleet, &completion(SHEDDABLE_LORA, "test4", None), ENVOY, None).await;
    assert_eq!(critical, Answer::Routed(vec![fleet.pod(0)]));
    let sheddable = send(&fleet, &completion(SHEDDABLE_LORA, "test4", Some(-1)), ENVOY, None).await;
    assert_eq!(sheddable, Answer::Refused(429));
}

/// "noncritical, but one server has capacity, do not shed": pod 0 (queue 4, KV 0.2) has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sheddable_request_goes_where_there_is_room() {
    let mut pins = past_thresholds();
    pins[0].waiting = 4;
    check(pins, DEFAULT_PROFILE, completion(SHEDDABLE_LORA, "test5", Some(-1)), ENVOY, 0).await;
}

/// "body sent over multiple requests, noncritical, but one server has capacity, do not shed":
/// the body split in two messages, header values in `value` as the reference sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_split_over_messages_with_values_in_value() {
    let mut pins = past_thresholds();
    pins[0].waiting = 4;
    let split = Wire { raw: false, chunks: 2, ..ENVOY };
    check(pins, DEFAULT_PROFILE, completion(SHEDDABLE_LORA, "test6", Some(-1)), split, 0).await;
}

// --- Subset hints (the lightweight picker's table) ---

/// One subset case: endpoint 0 on 127.0.0.2, endpoints 1 and 2 on 127.0.0.3 (two ports of one
/// IP), kvgate's default profile, every eligible endpoint written to the destination. `make`
/// builds the hint from the fleet's addresses; `want` lists the eligible endpoints, or is
/// empty for a 503.
async fn check_subset(make: impl FnOnce(&Fleet) -> Option<Metadata>, want: &[usize]) {
    let fleet = Fleet::start(
        &[None; 3],
        &["127.0.0.2", "127.0.0.3", "127.0.0.3"],
        DEFAULT_PROFILE,
        "extproc: {max_endpoints: 3}",
    )
    .await;
    let body = completion(MODEL, "hi", None);
    let answer = match send(&fleet, &body, ENVOY, make(&fleet)).await {
        Answer::Routed(mut addrs) => {
            addrs.sort();
            Answer::Routed(addrs)
        }
        refused => refused,
    };
    let mut want: Vec<SocketAddr> = want.iter().map(|&k| fleet.pod(k)).collect();
    want.sort();
    let want = if want.is_empty() { Answer::Refused(503) } else { Answer::Routed(want) };
    assert_eq!(answer, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_list_of_one_endpoint() {
    check_subset(|f| Some(subset_hint_with(SUBSET_KEY, string_list(&[f.pod(2).to_string()]))), &[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_comma_separated_string() {
    check_subset(|f| Some(subset_hint_with(SUBSET_KEY, string(&format!("{},{}", f.pod(0), f.pod(2))))), &[0, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_string_with_whitespace_and_empty_items() {
    check_subset(
        |f| Some(subset_hint_with(SUBSET_KEY, string(&format!("  {} ,  ,  {}  ", f.pod(0), f.pod(2))))),
        &[0, 2],
    )
    .await;
}

/// A bare IP stands for every port of that IP: both endpoints on 127.0.0.3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_bare_ip_is_every_port_of_it() {
    check_subset(|_| Some(subset_hint_with(SUBSET_KEY, string_list(&["127.0.0.3"]))), &[1, 2]).await;
}

/// A list item holding several entries is split as the string form is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_list_item_with_commas_is_split() {
    check_subset(
        |f| Some(subset_hint_with(SUBSET_KEY, string_list(&[format!("{}, {}", f.pod(0), f.pod(2))]))),
        &[0, 2],
    )
    .await;
}

/// An empty list names no endpoint: 503, not the whole pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_empty_list_is_503() {
    check_subset(|_| Some(subset_hint_with(SUBSET_KEY, string_list::<&str>(&[]))), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_matching_no_endpoint_is_503() {
    check_subset(|_| Some(subset_hint_with(SUBSET_KEY, string("192.168.1.1:8080"))), &[]).await;
}

/// The hint's namespace without its key restricts nothing, nor does no metadata at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_key_absent_is_the_whole_pool() {
    check_subset(|_| Some(subset_hint_with("some-other-key", string("val"))), &[0, 1, 2]).await;
    check_subset(|_| None, &[0, 1, 2]).await;
}
