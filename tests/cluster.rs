//! Replicas sharing what they learn (`cluster:`): real kvgate servers on loopback following each
//! other over their gRPC listeners, in front of the same simulators. A decision on one steers
//! the other; requests in flight through one count on the other and leave with it; a replica
//! that starts late takes a peer's snapshot before it is ready; a wrong token is refused.
#![allow(clippy::disallowed_methods)] // the test's own clients run as plain tokio tasks

mod common;

use std::time::Duration;

use common::{Sim, client, eventually, free_port, get_json, start_kvgate, start_sim};
use kvgate::front::picker::pb::FollowRequest;
use kvgate::front::picker::pb::cluster_client::ClusterClient;
use kvgate::tools::serve::Server;
use serde_json::{Value, json};

const MODEL: &str = "cluster-model";
const TOKEN: &str = "s3cret-cluster-token";

/// Two simulators; `slow`: in real time (a request of `max_tokens: n` takes about n × 10 ms).
async fn sims(slow: bool) -> Vec<Sim> {
    let flags: &[&str] =
        if slow { &["--served-model-name", MODEL] } else { &["--served-model-name", MODEL, "--time-scale", "0"] };
    vec![start_sim(flags).await, start_sim(flags).await]
}

/// A replica on gRPC port `grpc` whose peers are `peers` (gRPC ports), with `token`.
async fn replica(sims: &[Sim], grpc: u16, peers: &[u16], token: &str) -> Server {
    replica_with(sims, grpc, peers, token, "").await
}

/// [`replica`] with more keys for its pool (`, admission: {…}`).
async fn replica_with(sims: &[Sim], grpc: u16, peers: &[u16], token: &str, pool: &str) -> Server {
    let endpoints: Vec<String> = sims.iter().map(|s| format!("{{address: '{}'}}", s.addrs[0])).collect();
    let peers: Vec<String> = peers.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
    let yaml = format!(
        "grpc_addr: 127.0.0.1:{grpc}\nadmin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\n\
         cluster: {{peers: [{}], token: {token}, lease_ms: 3000, join_timeout_ms: 5000}}\n\
         pools:\n  - {{name: p, models: [{MODEL}], endpoints: [{}]{pool}}}\n",
        peers.join(", "),
        endpoints.join(", ")
    );
    start_kvgate(&yaml).await
}

fn admin(s: &Server) -> String {
    format!("http://{}", s.admin_addr)
}

async fn ready(s: &Server) -> bool {
    client().get(format!("{}/readyz", admin(s))).send().await.is_ok_and(|r| r.status() == 200)
}

/// Peers `s` has heard within their lease.
async fn peers(s: &Server) -> usize {
    get_json(&format!("{}/debug/cluster", admin(s))).await["peers"].as_array().map_or(0, Vec::len)
}

/// A completion body whose prompt starts with `tag` (so each has its own prefix).
fn body(tag: &str, max_tokens: u32) -> Value {
    json!({"model": MODEL, "prompt": format!("{tag} {}", "the same long story again ".repeat(40)), "max_tokens": max_tokens})
}

/// What `s` would decide for `b`: the target's address and the prompt blocks it holds.
async fn explain(s: &Server, b: &Value) -> (String, u64) {
    let r = client()
        .post(format!("{}/debug/explain?path=/v1/completions", admin(s)))
        .json(b)
        .send()
        .await
        .expect("explain answers");
    let v: Value = r.json().await.expect("JSON");
    let t = &v["decision"]["targets"][0];
    (t["address"].as_str().unwrap_or_default().to_owned(), t["matched_blocks"].as_u64().unwrap_or(0))
}

async fn send(s: &Server, b: &Value) -> u16 {
    let url = format!("http://{}/v1/completions", s.proxy_addr.expect("a proxy"));
    let r = client().post(url).json(b).send().await.expect("an answer");
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    status
}

/// Requests in flight on each endpoint as `s` counts them, by address.
async fn in_flight(s: &Server) -> Vec<(String, u64)> {
    let v = get_json(&format!("{}/debug/endpoints", admin(s))).await;
    v["pools"][0]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["address"].as_str().unwrap_or_default().to_owned(), e["in_flight_requests"].as_u64().unwrap_or(0)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_on_one_replica_steers_the_other() {
    let sims = sims(false).await;
    let (ga, gb) = (free_port(), free_port());
    // Both list both: each finds itself in the list and skips it.
    let a = replica(&sims, ga, &[ga, gb], TOKEN).await;
    let b = replica(&sims, gb, &[ga, gb], TOKEN).await;
    assert!(eventually(10, || async { peers(&a).await == 1 && peers(&b).await == 1 }).await, "each follows the other");
    assert!(ready(&a).await && ready(&b).await);
    for i in 0..6 {
        let prompt = body(&format!("conversation-{i}"), 2);
        assert_eq!(send(&a, &prompt).await, 200);
        let (target, matched) = explain(&a, &prompt).await;
        assert!(matched > 0, "replica a holds its own decision");
        // Within a bound, replica b would send it to the same endpoint, for its prefix.
        let same = eventually(5, || async { explain(&b, &prompt).await == (target.clone(), matched) }).await;
        assert!(same, "b decides as a did: {:?} vs {:?}", explain(&b, &prompt).await, (target, matched));
    }
    // What a learned from the responses, b learned too, without serving any.
    let samples = |s: &Server| {
        let url = format!("{}/debug/endpoints", admin(s));
        async move { get_json(&url).await["pools"][0]["bytes_per_token"]["samples"].as_u64().unwrap_or(0) }
    };
    assert!(samples(&a).await >= 6);
    let learned = eventually(5, || async { samples(&b).await == samples(&a).await }).await;
    assert!(learned, "b learned bytes per token from a's responses: {} vs {}", samples(&b).await, samples(&a).await);
    // And each endpoint's TTFT model from a's streamed responses.
    let mut streamed = body("streamed", 2);
    streamed["stream"] = json!(true);
    assert_eq!(send(&a, &streamed).await, 200);
    let ttft = |s: &Server| {
        let url = format!("{}/debug/endpoints", admin(s));
        async move {
            let v = get_json(&url).await;
            let e = v["pools"][0]["endpoints"].as_array().cloned().unwrap_or_default();
            e.iter().map(|e| e["ttft_model"]["samples"].as_u64().unwrap_or(0)).collect::<Vec<_>>()
        }
    };
    assert!(
        eventually(5, || async { ttft(&a).await.iter().sum::<u64>() == 1 }).await,
        "a learned: {:?}",
        ttft(&a).await
    );
    let same = eventually(5, || async { ttft(&b).await == ttft(&a).await }).await;
    assert!(same, "b's TTFT models learned as a's: {:?} vs {:?}", ttft(&b).await, ttft(&a).await);
    let cluster = get_json(&format!("{}/debug/cluster", admin(&b))).await;
    assert_eq!(cluster["enabled"], true);
    assert!(cluster["peers"][0]["snapshot_age_ms"].is_u64(), "b took a's snapshot: {cluster}");
    let m = common::metrics(&admin(&b)).await;
    let applied = common::metric(&m, "kvgate_cluster_deltas_applied_total", &[("kind", "placements")]);
    assert!(applied.is_some_and(|n| n >= 6.0), "placements applied: {applied:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_count_on_every_replica_and_leave_with_a_dead_one() {
    let sims = sims(true).await;
    let (ga, gb) = (free_port(), free_port());
    let a = replica(&sims, ga, &[gb], TOKEN).await;
    let b = replica(&sims, gb, &[ga], TOKEN).await;
    assert!(eventually(10, || async { peers(&a).await == 1 && peers(&b).await == 1 }).await, "each follows the other");
    let proxy = a.proxy_addr.expect("a proxy");
    let long = tokio::spawn(async move {
        let url = format!("http://{proxy}/v1/completions");
        let _ = client().post(url).json(&body("long", 1500)).send().await.map(|r| r.status().as_u16());
    });
    let total = |v: Vec<(String, u64)>| v.iter().map(|(_, n)| n).sum::<u64>();
    assert!(eventually(5, || async { total(in_flight(&a).await) == 1 }).await);
    // b counts a's request on the same endpoint, within a bound.
    let seen = eventually(2, || async { in_flight(&b).await == in_flight(&a).await }).await;
    assert!(seen, "b counts a's request: {:?} vs {:?}", in_flight(&b).await, in_flight(&a).await);
    // a goes away with the request in flight: its count leaves b within the lease.
    drop(a);
    long.abort();
    assert!(eventually(5, || async { total(in_flight(&b).await) == 0 }).await, "{:?}", in_flight(&b).await);
    assert!(eventually(5, || async { peers(&b).await == 0 }).await, "a's lease ran out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_starts_late_takes_a_snapshot_before_it_is_ready() {
    let sims = sims(false).await;
    let (ga, gb) = (free_port(), free_port());
    // a alone: its peer is not up, so it is ready without a snapshot.
    let a = replica(&sims, ga, &[gb], TOKEN).await;
    assert!(eventually(5, || async { ready(&a).await }).await, "a is ready alone");
    let prompts: Vec<Value> = (0..5).map(|i| body(&format!("early-{i}"), 2)).collect();
    let mut decided = Vec::new();
    for p in &prompts {
        assert_eq!(send(&a, p).await, 200);
        decided.push(explain(&a, p).await);
    }
    let b = replica(&sims, gb, &[ga], TOKEN).await;
    assert!(eventually(5, || async { ready(&b).await }).await, "b joins");
    // Ready means the snapshot is in: b decides as a did at once, with a's index whole and
    // what a learned of the prompts' size.
    for (p, want) in prompts.iter().zip(&decided) {
        assert_eq!(&explain(&b, p).await, want);
    }
    let state = |s: &Server| {
        let url = format!("{}/debug/endpoints", admin(s));
        async move {
            let v = get_json(&url).await;
            let blocks: u64 = v["pools"][0]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["prefix_blocks"].as_u64())
                .sum();
            (blocks, v["pools"][0]["bytes_per_token"]["value"].as_f64())
        }
    };
    let ((blocks_b, bpt_b), (blocks_a, bpt_a)) = (state(&b).await, state(&a).await);
    assert_eq!(blocks_b, blocks_a, "b's index is a's");
    // (A response that ended while the snapshot was taken may be learned twice: within 1%.)
    let (bpt_a, bpt_b) = (bpt_a.expect("a's"), bpt_b.expect("b's"));
    assert!(bpt_a != 4.0 && (bpt_b - bpt_a).abs() < 0.01 * bpt_a, "b's bytes per token {bpt_b} is a's {bpt_a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_token_is_refused() {
    let sims = sims(false).await;
    let (ga, gb) = (free_port(), free_port());
    let a = replica(&sims, ga, &[gb], TOKEN).await;
    let b = replica(&sims, gb, &[ga], "not-the-token").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((peers(&a).await, peers(&b).await), (0, 0), "neither follows the other");
    let mut c = ClusterClient::connect(format!("http://127.0.0.1:{ga}")).await.expect("connects");
    let mut req = tonic::Request::new(FollowRequest { replica: "someone".into() });
    req.metadata_mut().insert("authorization", "Bearer wrong".parse().expect("ascii"));
    let err = c.follow(req).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = c.follow(FollowRequest { replica: "someone".into() }).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_sent_to_another_replica_reaches_the_one_that_decided() {
    use kvgate::front::picker::pb;
    use kvgate::front::picker::pb::picker_client::PickerClient;
    let sims = sims(false).await;
    let (ga, gb) = (free_port(), free_port());
    let a = replica(&sims, ga, &[gb], TOKEN).await;
    let b = replica(&sims, gb, &[ga], TOKEN).await;
    assert!(eventually(10, || async { peers(&a).await == 1 && peers(&b).await == 1 }).await, "each follows the other");
    let mut on_a = PickerClient::connect(format!("http://127.0.0.1:{ga}")).await.expect("connects");
    let mut on_b = PickerClient::connect(format!("http://127.0.0.1:{gb}")).await.expect("connects");
    let pick = pb::PickRequest {
        path: "/v1/completions".into(),
        input: Some(pb::pick_request::Input::Body(body("picked", 2).to_string().into_bytes())),
        ..Default::default()
    };
    let decided = match on_a.pick(pick).await.expect("pick answers").into_inner().result {
        Some(pb::pick_response::Result::Decision(d)) => d,
        other => panic!("no decision: {other:?}"),
    };
    let total = |v: Vec<(String, u64)>| v.iter().map(|(_, n)| n).sum::<u64>();
    assert_eq!(total(in_flight(&a).await), 1, "the pick counts in flight on a");
    // Both reports go to b, which did not decide: a applies them.
    let first = pb::ReportRequest {
        decision_id: decided.decision_id.clone(),
        first_token: Some(pb::FirstToken { status: 200, streaming: true }),
        ..Default::default()
    };
    assert!(!on_b.report(first).await.expect("forwarded").into_inner().ended);
    let end = pb::ReportRequest {
        decision_id: decided.decision_id.clone(),
        end: Some(pb::report_request::End::Finished(pb::Finished { status: 200, usage: None, response_bytes: 10 })),
        ..Default::default()
    };
    assert!(on_b.report(end.clone()).await.expect("forwarded").into_inner().ended, "the decision ended on a");
    assert!(eventually(2, || async { total(in_flight(&a).await) == 0 }).await, "a released it");
    // The owner's own verdict comes back: the decision is over.
    let again = on_b.report(end).await.expect_err("over");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    // An id of no known replica is unknown.
    let stranger = pb::ReportRequest { decision_id: "0badc0de-1-00".into(), ..Default::default() };
    assert_eq!(on_b.report(stranger).await.expect_err("unknown").code(), tonic::Code::NotFound);
}

/// A `kvgate serve` child process on fixed loopback ports.
struct Process {
    child: std::process::Child,
    admin: String,
    proxy: String,
}

impl Process {
    /// Starts `kvgate serve` over `sims` with peers at `peers` (gRPC ports), on gRPC port `grpc`.
    fn start(sims: &[Sim], grpc: u16, peers: &[u16]) -> Self {
        let (admin, proxy) = (free_port(), free_port());
        let endpoints: Vec<String> = sims.iter().map(|s| format!("{{address: '{}'}}", s.addrs[0])).collect();
        let peers: Vec<String> = peers.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        let yaml = format!(
            "grpc_addr: 127.0.0.1:{grpc}\nadmin_addr: 127.0.0.1:{admin}\nproxy_addr: 127.0.0.1:{proxy}\n\
             cluster: {{peers: [{}], token: {TOKEN}, lease_ms: 3000, join_timeout_ms: 5000}}\n\
             pools:\n  - name: p\n    models: [{MODEL}]\n    endpoints: [{}]\n",
            peers.join(", "),
            endpoints.join(", ")
        );
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster");
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join(format!("replica-{grpc}.yaml"));
        std::fs::write(&path, yaml).expect("config written");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kvgate serve starts");
        Self { child, admin: format!("http://127.0.0.1:{admin}"), proxy: format!("http://127.0.0.1:{proxy}") }
    }

    async fn ready(&self) -> bool {
        client().get(format!("{}/readyz", self.admin)).send().await.is_ok_and(|r| r.status() == 200)
    }

    async fn cluster(&self) -> Value {
        client().get(format!("{}/debug/cluster", self.admin)).send().await.expect("answers").json().await.expect("JSON")
    }

    async fn peers(&self) -> usize {
        self.cluster().await["peers"].as_array().map_or(0, Vec::len)
    }

    async fn explain(&self, b: &Value) -> (String, u64) {
        let url = format!("{}/debug/explain?path=/v1/completions", self.admin);
        let v: Value = client().post(url).json(b).send().await.expect("explain").json().await.expect("JSON");
        let t = &v["decision"]["targets"][0];
        (t["address"].as_str().unwrap_or_default().to_owned(), t["matched_blocks"].as_u64().unwrap_or(0))
    }

    async fn send(&self, b: &Value) -> u16 {
        let r = client().post(format!("{}/v1/completions", self.proxy)).json(b).send().await.expect("an answer");
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        status
    }

    fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill").args([signal, &self.child.id().to_string()]).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill {signal}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A stopped process is let go first, so nothing of it outlives the test.
        let _ = std::process::Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three replicas as processes: a decision on any is seen on the others; one that stops
/// answering (SIGSTOP: a partition, as its peers see it) drops out within its lease while the
/// other two go on sharing, and rejoins when it answers again, its decisions seen once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replica_processes_share_and_a_partition_heals() {
    let sims = sims(false).await;
    let ports = [free_port(), free_port(), free_port()];
    let tier: Vec<Process> = ports.iter().map(|&g| Process::start(&sims, g, &ports)).collect();
    let all_ready = eventually(20, || async {
        for p in &tier {
            if !p.ready().await || p.peers().await != 2 {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        all_ready,
        "three replicas, each with two peers: {:?}",
        futures_util::future::join_all(tier.iter().map(Process::cluster)).await
    );
    // Seen by all from any.
    let seen_everywhere = |b: Value, from: usize| {
        let tier = &tier;
        async move {
            assert_eq!(tier[from].send(&b).await, 200);
            let want = tier[from].explain(&b).await;
            assert!(want.1 > 0);
            eventually(5, || async {
                for p in tier {
                    if p.explain(&b).await != want {
                        return false;
                    }
                }
                true
            })
            .await
        }
    };
    for from in 0..3 {
        assert!(
            seen_everywhere(body(&format!("from-{from}"), 2), from).await,
            "a decision on replica {from} seen by all"
        );
    }
    // Replica 2 stops answering: the others forget it within its lease and go on.
    tier[2].signal("-STOP");
    let gone = eventually(15, || async { tier[0].peers().await == 1 && tier[1].peers().await == 1 }).await;
    assert!(gone, "the silent replica drops out: {} {}", tier[0].cluster().await, tier[1].cluster().await);
    let b = body("during-the-partition", 2);
    assert_eq!(tier[0].send(&b).await, 200);
    let want = tier[0].explain(&b).await;
    assert!(eventually(5, || async { tier[1].explain(&b).await == want }).await, "the other two still share");
    // It answers again: it rejoins, and what it decides is seen again.
    tier[2].signal("-CONT");
    let back = eventually(20, || async {
        tier[0].peers().await == 2 && tier[1].peers().await == 2 && tier[2].peers().await == 2
    })
    .await;
    assert!(back, "the partition heals: {} {}", tier[0].cluster().await, tier[2].cluster().await);
    assert!(seen_everywhere(body("after-the-heal", 2), 2).await, "its decisions are seen again");
    // What replica 0 decided during the partition reached replica 2 with its new snapshot.
    assert!(eventually(5, || async { tier[2].explain(&b).await == want }).await, "the healed replica has the rest");
}

/// A pool's admission limit means the same over two replicas as over one: what one replica has
/// in flight fills the limit on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_counts_the_whole_tier() {
    let sims = sims(true).await;
    let (ga, gb) = (free_port(), free_port());
    let limit = ", admission: {max_in_flight: 1}";
    let a = replica_with(&sims, ga, &[gb], TOKEN, limit).await;
    let b = replica_with(&sims, gb, &[ga], TOKEN, limit).await;
    assert!(eventually(10, || async { peers(&a).await == 1 && peers(&b).await == 1 }).await, "each follows the other");
    let proxy = a.proxy_addr.expect("a proxy");
    let long = tokio::spawn(async move {
        let url = format!("http://{proxy}/v1/completions");
        client().post(url).json(&body("long", 300)).send().await.map(|r| r.status().as_u16()).ok()
    });
    let total = |v: Vec<(String, u64)>| v.iter().map(|(_, n)| n).sum::<u64>();
    assert!(eventually(5, || async { total(in_flight(&b).await) == 1 }).await, "b counts a's request");
    assert_eq!(send(&b, &body("refused", 2)).await, 429, "the tier's one place is taken");
    assert_eq!(long.await.expect("joined"), Some(200));
    assert!(eventually(5, || async { total(in_flight(&b).await) == 0 }).await);
    assert_eq!(send(&b, &body("admitted", 2)).await, 200, "the place is free again");
}
