//! Kubernetes discovery against a real API server (etcd + kube-apiserver on loopback; see
//! `tests/common/kube.rs`): pods joining and leaving with their readiness, scaling, label
//! changes, `targetPorts` ranks, spec changes, malformed objects, an API server that is down at
//! start or restarts under a running kvgate, the InferenceObjectives that give a pool's
//! priorities; and the Helm chart's objects applied there (its Role is enough, its picker API
//! and cluster tokens, its replicas sharing state). Pods get IPs `127.0.N.M`, where simulators
//! listen, all on port 8000 as in a cluster; each test has its own `127.0.N.0/24`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::kube::{
    ADMIN_TOKEN, Cluster, Kubelet, inference_objective, inference_pool, install_crd, install_objective_crd, namespace,
    pool_spec, put_pool,
};
use common::{eventually, get_json, start_sim};
use kvgate::gateway::config::Config;
use kvgate::tools::serve::{Server, start_with};
use serde_json::{Value, json};

const GROUP: &str = "inference.networking.k8s.io";
const LOOSE_GROUP: &str = "inference.kvgate.test";

/// A fresh API server with the CRD of `crd_file` (serving `group`) and namespace `ns`, the
/// admin's client, and the kubelet for `ns`.
async fn cluster_with(crd_file: &str, group: &str, ns: &str) -> (Cluster, kube::Client, Kubelet) {
    let cluster = Cluster::start().await;
    let client = cluster.admin().await;
    install_crd(&client, crd_file, group).await;
    namespace(&client, ns).await;
    let kubelet = Kubelet::new(&client, ns);
    (cluster, client, kubelet)
}

/// Starts kvgate in-process with one pool following InferencePool `vllm` in `ns` (`pool` is
/// the rest of the pool's YAML mapping, e.g. `models: [m]`).
async fn kvgate(cluster: &Cluster, ns: &str, pool: &str) -> Server {
    let kubeconfig = cluster.kubeconfig("kvgate", ADMIN_TOKEN, ns);
    let yaml = format!(
        "grpc_addr: 127.0.0.1:0\nadmin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\nscrape: {{interval_ms: 50}}\n\
         pools:\n  - {{name: llama, {pool}}}\n"
    );
    let path = Path::new("kubernetes.yaml");
    let cfg = Config::from_yaml(&yaml, path).expect("config");
    start_with(cfg, path, Some(&kubeconfig)).await.expect("kvgate starts")
}

async fn debug(kv: &Server) -> Value {
    get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await
}

/// Whether the first pool's discovery shows an error.
async fn discovery_failing(kv: &Server) -> bool {
    debug(kv).await["pools"][0]["discovery"]["last_error"].as_str().is_some_and(|e| !e.is_empty())
}

/// The first pool's endpoint addresses, sorted.
async fn addresses(kv: &Server) -> Vec<String> {
    addresses_at(&format!("http://{}", kv.admin_addr)).await
}

/// The same from an admin URL (nothing while it does not answer).
async fn addresses_at(admin: &str) -> Vec<String> {
    let Ok(r) = common::client().get(format!("{admin}/debug/endpoints")).send().await else { return Vec::new() };
    let v: Value = r.json().await.unwrap_or_default();
    let mut out: Vec<String> = v["pools"][0]["endpoints"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["address"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// Waits until the pool's endpoints are exactly `want`; returns how long that took.
async fn expect_endpoints(kv: &Server, want: &[&str]) -> Duration {
    let start = Instant::now();
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    let ok = eventually(20, || {
        let want = want.clone();
        async move { addresses(kv).await == want }
    })
    .await;
    assert!(ok, "endpoints {want:?}, got: {}", debug(kv).await);
    start.elapsed()
}

async fn readyz(kv: &Server) -> u16 {
    common::client()
        .get(format!("http://{}/readyz", kv.admin_addr))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

fn proxy(kv: &Server) -> String {
    format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"))
}

/// A simulator standing in for pod `name` at `ip:8000`.
async fn sim(name: &str, ip: &str, extra: &[&str]) -> common::Sim {
    let mut flags = vec!["--host", ip, "--port", "8000", "--model", "m", "--pod-name", name];
    flags.extend_from_slice(extra);
    start_sim(&flags).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_follow_readiness_scaling_and_labels() {
    let (cluster, client, kubelet) = cluster_with("inferencepool-crd.yaml", GROUP, "t1").await;
    let _sims = [sim("a", "127.0.1.2", &[]).await, sim("b", "127.0.1.3", &[]).await, sim("c", "127.0.1.4", &[]).await];
    put_pool(&client, "t1", &inference_pool(GROUP, "vllm", pool_spec("vllm", &[8000]))).await;
    let kv = kvgate(&cluster, "t1", "models: [m], inference_pool: {name: vllm}").await;
    let app = [("app", "vllm")];

    // Listed with no pod: ready, and empty.
    assert!(eventually(20, || async { readyz(&kv).await == 200 }).await, "ready once listed");
    assert_eq!(addresses(&kv).await, Vec::<String>::new());
    let d = debug(&kv).await;
    assert_eq!(d["pools"][0]["source"], "kubernetes", "{d}");
    assert_eq!(d["pools"][0]["discovery"]["from"], "t1/vllm (inference.networking.k8s.io/v1)", "{d}");

    // A pod joins when Ready with an IP, not before.
    kubelet.create("a", &app, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(addresses(&kv).await.is_empty(), "a pod without IP or readiness is no endpoint");
    kubelet.status("a", "127.0.1.2", true).await;
    let joined = expect_endpoints(&kv, &["127.0.1.2:8000"]).await;
    let (status, body) = common::post(&proxy(&kv), &json!({"model": "m", "prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{body}");

    // Scale to three, one of them scheduled on a node (so deleting it leaves it terminating).
    kubelet.ready("b", &app, "127.0.1.3").await;
    kubelet.create("c", &app, true).await;
    kubelet.status("c", "127.0.1.4", true).await;
    expect_endpoints(&kv, &["127.0.1.2:8000", "127.0.1.3:8000", "127.0.1.4:8000"]).await;
    common::wait_scraped(&kv, 3).await;

    // A pod that stops being Ready leaves rotation while its request in flight finishes.
    let long = json!({"model": "m", "prompt": "tell me a long story", "max_tokens": 150, "stream": true,
                      "ignore_eos": true});
    let resp = common::client()
        .post(proxy(&kv))
        .header("content-type", "application/json")
        .body(long.to_string())
        .send()
        .await
        .expect("streaming request");
    assert_eq!(resp.status(), 200);
    let served = resp.headers()["x-inference-pod"].to_str().expect("pod header").to_owned();
    let ip = match served.as_str() {
        "a" => "127.0.1.2",
        "b" => "127.0.1.3",
        _ => "127.0.1.4",
    };
    kubelet.status(&served, ip, false).await;
    let rest: Vec<&str> = ["127.0.1.2:8000", "127.0.1.3:8000", "127.0.1.4:8000"]
        .into_iter()
        .filter(|a| !a.starts_with(&format!("{ip}:")))
        .collect();
    let left = expect_endpoints(&kv, &rest).await;
    let body = resp.text().await.expect("the stream ends");
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "the request in flight finished: …{}",
        &body[body.len().saturating_sub(200)..]
    );
    kubelet.status(&served, ip, true).await;
    expect_endpoints(&kv, &["127.0.1.2:8000", "127.0.1.3:8000", "127.0.1.4:8000"]).await;

    // Scale back to one: b is deleted (gone at once), c terminates (stays, with a deletion
    // timestamp, as without a kubelet to stop it).
    kubelet.delete("b").await;
    kubelet.delete("c").await;
    let pod_c = kubelet.pods.get("c").await.expect("c is still there, terminating");
    assert!(pod_c.metadata.deletion_timestamp.is_some());
    expect_endpoints(&kv, &["127.0.1.2:8000"]).await;

    // A label change moves a pod out of the selector and back in.
    kubelet.relabel("a", &[("app", "other")]).await;
    let relabelled = expect_endpoints(&kv, &[]).await;
    assert_eq!(readyz(&kv).await, 200, "an empty pool is still in sync");
    let (status, body) = common::post(&proxy(&kv), &json!({"model": "m", "prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(status, 503, "{body}");
    // No health or panic rule brings back what discovery removed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(addresses(&kv).await.is_empty());
    kubelet.relabel("a", &app).await;
    expect_endpoints(&kv, &["127.0.1.2:8000"]).await;
    println!("joined in {joined:?}; an unready pod left in {left:?}; a relabelled one in {relabelled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_ports_are_ranks_and_spec_changes_resync() {
    let (cluster, client, kubelet) = cluster_with("inferencepool-crd.yaml", GROUP, "t2").await;
    let _ranks = sim("dp", "127.0.2.2", &["--data-parallel-size", "2", "--data-parallel-multi-port-external-lb"]).await;
    let _other = sim("solo", "127.0.2.3", &[]).await;
    put_pool(&client, "t2", &inference_pool(GROUP, "vllm", pool_spec("vllm", &[8000, 8001]))).await;
    // No models configured: they are learned from the endpoints' /v1/models.
    let kv = kvgate(&cluster, "t2", "inference_pool: {name: vllm}").await;
    kubelet.ready("dp", &[("app", "vllm"), ("llm-d.ai/role", "both"), ("tier", "gold")], "127.0.2.2").await;
    kubelet.ready("solo", &[("app", "other"), ("llm-d.ai/role", "decode")], "127.0.2.3").await;

    expect_endpoints(&kv, &["127.0.2.2:8000", "127.0.2.2:8001"]).await;
    let d = debug(&kv).await;
    let eps = d["pools"][0]["endpoints"].as_array().expect("endpoints").clone();
    let mut ranks: Vec<(String, u64)> =
        eps.iter().map(|e| (e["name"].as_str().unwrap_or("").to_owned(), e["rank"].as_u64().unwrap_or(99))).collect();
    ranks.sort();
    assert_eq!(ranks, [("dp-rank-0".to_owned(), 0), ("dp-rank-1".to_owned(), 1)], "{d}");
    assert_eq!(eps[0]["labels"]["tier"], "gold", "pod labels are endpoint labels: {d}");

    // Models come from the endpoints; requests for them route once known.
    let models = format!("http://{}/v1/models", kv.proxy_addr.expect("proxy"));
    assert!(
        eventually(20, || async { get_json(&models).await["data"][0]["id"] == "m" }).await,
        "models learned: {}",
        get_json(&models).await
    );
    for _ in 0..6 {
        let (status, body) = common::post(&proxy(&kv), &json!({"model": "m", "prompt": "hi", "max_tokens": 2})).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = common::post(&proxy(&kv), &json!({"model": "nope", "prompt": "hi"})).await;
    assert_eq!(status, 404, "{body}");

    // Fewer ports: one endpoint per pod, no rank.
    put_pool(&client, "t2", &inference_pool(GROUP, "vllm", pool_spec("vllm", &[8001]))).await;
    expect_endpoints(&kv, &["127.0.2.2:8001"]).await;
    // Another selector: a full resync onto other pods, with their roles.
    put_pool(&client, "t2", &inference_pool(GROUP, "vllm", pool_spec("other", &[8000]))).await;
    expect_endpoints(&kv, &["127.0.2.3:8000"]).await;
    let d = debug(&kv).await;
    assert_eq!(d["pools"][0]["endpoints"][0]["role"], "decode", "{d}");
    assert_eq!(d["pools"][0]["endpoints"][0]["name"], "solo", "{d}");
    // With no endpoint left, the learned model is still the pool's: 503, not 404.
    kubelet.status("solo", "127.0.2.3", false).await;
    expect_endpoints(&kv, &[]).await;
    let (status, body) = common::post(&proxy(&kv), &json!({"model": "m", "prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pools_and_pods_are_reported_and_skipped() {
    let (cluster, client, kubelet) = cluster_with("loose-inferencepool-crd.yaml", LOOSE_GROUP, "t3").await;
    let _sim = sim("a", "127.0.3.2", &[]).await;
    let nine: Vec<u16> = (8000..8009).collect();
    put_pool(&client, "t3", &inference_pool(LOOSE_GROUP, "vllm", pool_spec("vllm", &nine))).await;
    let kv = kvgate(&cluster, "t3", "models: [m], inference_pool: {name: vllm, group: inference.kvgate.test}").await;
    kubelet.ready("a", &[("app", "vllm")], "127.0.3.2").await;
    kubelet.ready("bad-role", &[("app", "vllm"), ("llm-d.ai/role", "banana")], "127.0.3.3").await;

    let error = |d: &Value| d["pools"][0]["discovery"]["last_error"].as_str().unwrap_or("").to_owned();
    assert!(
        eventually(20, || async { error(&debug(&kv).await).contains("has 9") }).await,
        "the nine-port pool is reported: {}",
        debug(&kv).await
    );
    assert_eq!(readyz(&kv).await, 503, "never a valid spec: not ready");
    assert!(addresses(&kv).await.is_empty());

    // Fixed: in force, and the pod with a bad role label is skipped and reported.
    put_pool(&client, "t3", &inference_pool(LOOSE_GROUP, "vllm", pool_spec("vllm", &[8000]))).await;
    expect_endpoints(&kv, &["127.0.3.2:8000"]).await;
    assert!(eventually(10, || async { readyz(&kv).await == 200 }).await);
    let d = debug(&kv).await;
    assert!(d["pools"][0]["discovery"]["skipped"][0].as_str().unwrap_or("").contains("bad-role"), "{d}");
    assert_eq!(error(&d), "", "{d}");

    // Broken again in several ways: each is reported, and the last good spec stays.
    let broken = [
        (json!({"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": "8000"}), "not a list"),
        (json!({"selector": {"matchLabels": {"app": 7}}, "targetPorts": [{"number": 8000}]}), "not a string"),
        (json!({"targetPorts": [{"number": 8000}]}), "matchLabels"),
        (json!({"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": -1}]}), "not a port"),
        (json!("a string"), "no `spec` object"),
    ];
    for (spec, why) in broken {
        put_pool(&client, "t3", &inference_pool(LOOSE_GROUP, "vllm", spec.clone())).await;
        assert!(
            eventually(20, || async { error(&debug(&kv).await).contains(why) }).await,
            "{spec} reported as {why:?}: {}",
            debug(&kv).await
        );
        assert_eq!(addresses(&kv).await, ["127.0.3.2:8000"], "the last good spec stays in force");
        assert_eq!(readyz(&kv).await, 200);
    }

    // Deleted: no endpoints (requests get a 503, not a 404: the pool keeps its models), and
    // the reason shown; recreated: back.
    let api = common::kube::api_for(&client, &inference_pool(LOOSE_GROUP, "vllm", json!({})), "t3").await;
    api.delete("vllm", &Default::default()).await.expect("pool deleted");
    expect_endpoints(&kv, &[]).await;
    assert!(error(&debug(&kv).await).contains("does not exist"), "{}", debug(&kv).await);
    assert!(debug(&kv).await["pools"][0]["discovery"].get("skipped").is_none(), "{}", debug(&kv).await);
    let (status, body) = common::post(&proxy(&kv), &json!({"model": "m", "prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(status, 503, "{body}");
    put_pool(&client, "t3", &inference_pool(LOOSE_GROUP, "vllm", pool_spec("vllm", &[8000]))).await;
    expect_endpoints(&kv, &["127.0.3.2:8000"]).await;
    assert_eq!(error(&debug(&kv).await), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_at_start_and_restarted_under_kvgate() {
    let (mut cluster, client, kubelet) = cluster_with("inferencepool-crd.yaml", GROUP, "t4").await;
    let _sims = [sim("a", "127.0.4.2", &[]).await, sim("b", "127.0.4.3", &[]).await];
    put_pool(&client, "t4", &inference_pool(GROUP, "vllm", pool_spec("vllm", &[8000]))).await;
    kubelet.ready("a", &[("app", "vllm")], "127.0.4.2").await;

    // Unreachable at start: retried, and /readyz waits for the first list.
    cluster.stop_apiserver();
    let kv = kvgate(&cluster, "t4", "models: [m], inference_pool: {name: vllm}").await;
    // Once a list has failed, kvgate shows why, and is not ready.
    let failed = eventually(10, || async { discovery_failing(&kv).await }).await;
    assert!(failed, "the failed list is shown: {}", debug(&kv).await);
    assert_eq!(readyz(&kv).await, 503, "not ready before the first list");
    cluster.start_apiserver();
    cluster.wait_ready().await;
    expect_endpoints(&kv, &["127.0.4.2:8000"]).await;
    assert!(eventually(20, || async { readyz(&kv).await == 200 }).await);

    // Restarted under a running kvgate: the known endpoints stay while it is down …
    cluster.stop_apiserver();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(addresses(&kv).await, ["127.0.4.2:8000"]);
    assert_eq!(readyz(&kv).await, 200);
    let (status, body) = common::post(&proxy(&kv), &json!({"model": "m", "prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{body}");
    // … and the watch resumes when it is back.
    cluster.start_apiserver();
    cluster.wait_ready().await;
    let client = cluster.admin().await;
    let kubelet = Kubelet::new(&client, "t4");
    kubelet.ready("b", &[("app", "vllm")], "127.0.4.3").await;
    expect_endpoints(&kv, &["127.0.4.2:8000", "127.0.4.3:8000"]).await;
    kubelet.status("a", "127.0.4.2", false).await;
    expect_endpoints(&kv, &["127.0.4.3:8000"]).await;
    // The watch error is shown until the watch delivers again (or for a minute).
    let mut touched = inference_pool(GROUP, "vllm", pool_spec("vllm", &[8000]));
    touched.metadata.labels = Some([("touched".to_owned(), "yes".to_owned())].into());
    put_pool(&client, "t4", &touched).await;
    let cleared =
        eventually(20, || async { debug(&kv).await["pools"][0]["discovery"].get("last_error").is_none() }).await;
    assert!(cleared, "the error clears: {}", debug(&kv).await);
}

/// The first pool's flow-control objectives (name → priority) as `/debug/endpoints` shows them.
async fn objectives_at(admin: &str) -> Value {
    let Ok(r) = common::client().get(format!("{admin}/debug/endpoints")).send().await else { return Value::Null };
    let v: Value = r.json().await.unwrap_or_default();
    v["pools"][0]["flow_control"]["objectives"].clone()
}

/// Waits until the first pool's objectives are exactly `want`.
async fn expect_objectives(admin: &str, want: Value) {
    let ok = eventually(60, || {
        let want = want.clone();
        async move { objectives_at(admin).await == want }
    })
    .await;
    assert!(ok, "objectives {want}, got {}", objectives_at(admin).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_objectives_of_the_pool_give_its_priorities() {
    let (cluster, client, kubelet) = cluster_with("inferencepool-crd.yaml", GROUP, "t6").await;
    let _sim = sim("a", "127.0.6.2", &[]).await;
    put_pool(&client, "t6", &inference_pool(GROUP, "vllm", pool_spec("vllm", &[8000]))).await;
    kubelet.ready("a", &[("app", "vllm")], "127.0.6.2").await;
    let pool = "models: [m], inference_pool: {name: vllm}, objectives: [{name: chat, priority: 1}, {name: batch, priority: 5}]";
    let kv = kvgate(&cluster, "t6", pool).await;
    let admin = format!("http://{}", kv.admin_addr);

    // No InferenceObjective CRD: the endpoints and readiness do not wait for it, and the
    // objectives are the config's.
    expect_endpoints(&kv, &["127.0.6.2:8000"]).await;
    assert!(eventually(20, || async { readyz(&kv).await == 200 }).await, "ready without the CRD");
    assert_eq!(objectives_at(&admin).await, json!({"batch": 5, "chat": 1}));
    assert!(!discovery_failing(&kv).await, "a missing CRD is no discovery error: {}", debug(&kv).await);

    // Installed later: picked up by the watch's retries. Two objectives of the pool (one with
    // the defaults spelled out), one without a priority (0), one of another pool.
    install_objective_crd(&client).await;
    let of_pool = |priority: Option<i64>| {
        let mut spec = json!({"poolRef": {"name": "vllm"}});
        if let Some(p) = priority {
            spec["priority"] = json!(p);
        }
        spec
    };
    put_pool(&client, "t6", &inference_objective("chat", of_pool(Some(10)))).await;
    let explicit = json!({"priority": -1, "poolRef": {"name": "vllm", "group": GROUP, "kind": "InferencePool"}});
    put_pool(&client, "t6", &inference_objective("batch", explicit)).await;
    put_pool(&client, "t6", &inference_objective("plain", of_pool(None))).await;
    let other = json!({"priority": 99, "poolRef": {"name": "other"}});
    put_pool(&client, "t6", &inference_objective("elsewhere", other)).await;
    expect_objectives(&admin, json!({"batch": -1, "chat": 10, "plain": 0})).await;

    // Patched and deleted: the map follows; a deleted objective's configured priority is back.
    put_pool(&client, "t6", &inference_objective("chat", of_pool(Some(3)))).await;
    let api = common::kube::api_for(&client, &inference_objective("batch", json!({})), "t6").await;
    api.delete("batch", &Default::default()).await.expect("objective deleted");
    expect_objectives(&admin, json!({"batch": 5, "chat": 3, "plain": 0})).await;
    // Another pool's objective renamed to this pool's shows; moved away, it goes.
    put_pool(&client, "t6", &inference_objective("elsewhere", json!({"priority": 7, "poolRef": {"name": "vllm"}})))
        .await;
    expect_objectives(&admin, json!({"batch": 5, "chat": 3, "elsewhere": 7, "plain": 0})).await;
    put_pool(&client, "t6", &inference_objective("elsewhere", json!({"priority": 7, "poolRef": {"name": "x"}}))).await;
    expect_objectives(&admin, json!({"batch": 5, "chat": 3, "plain": 0})).await;
    assert_eq!(addresses(&kv).await, ["127.0.6.2:8000"]);
    assert_eq!(readyz(&kv).await, 200);
}

/// `kvgate serve` as its own process (the binary a container runs); killed on drop.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kvgate serve ARGS`, its stderr in `NAME.log` in the cluster's folder.
fn serve_process<I, A>(cluster: &Cluster, name: &str, args: I) -> Process
where
    I: IntoIterator<Item = A>,
    A: AsRef<std::ffi::OsStr>,
{
    let log = std::fs::File::create(cluster.dir.join(format!("{name}.log"))).expect("log file");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .arg("serve")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("kvgate starts");
    Process(child)
}

/// Listener flags on free loopback ports, and the admin and proxy URLs.
fn listener_flags() -> (Vec<String>, String, String) {
    let [grpc, admin, health, proxy] = [0; 4].map(|_| common::free_port());
    let flags = [("--grpc-addr", grpc), ("--admin-addr", admin), ("--health-addr", health), ("--proxy-addr", proxy)]
        .iter()
        .flat_map(|(f, p)| [(*f).to_owned(), format!("127.0.0.1:{p}")])
        .collect();
    (flags, format!("http://127.0.0.1:{admin}"), format!("http://127.0.0.1:{proxy}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_is_enough_for_kvgate() {
    let (cluster, client, kubelet) = cluster_with("inferencepool-crd.yaml", GROUP, "t5").await;
    namespace(&client, "elsewhere").await;
    install_objective_crd(&client).await;

    // The chart as rendered with its default values, applied as is: ServiceAccount, Role,
    // RoleBinding, ConfigMap, Service, Deployment and the InferencePool itself, and for its two
    // replicas the peers' Service, the cluster token's Secret and a PodDisruptionBudget.
    let manifests = common::kube::render_chart("kvgate", "t5", &["inferencePool.modelServers.matchLabels.app=vllm"]);
    let created = common::kube::create_all(&client, &manifests, "t5").await;
    let kinds: Vec<String> = created.iter().filter_map(|o| o.types.as_ref().map(|t| t.kind.clone())).collect();
    let want = [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
        "InferencePool",
        "Secret",
        "PodDisruptionBudget",
    ];
    for kind in want {
        assert!(kinds.iter().any(|k| k == kind), "the chart renders a {kind}: {kinds:?}");
    }
    let config = created
        .iter()
        .find(|o| o.types.as_ref().is_some_and(|t| t.kind == "ConfigMap"))
        .and_then(|o| o.data["data"]["config.yaml"].as_str())
        .expect("the ConfigMap's config.yaml")
        .to_owned();
    // The cluster token where the pod would have it (its peers' DNS name does not resolve here:
    // kvgate is ready alone).
    let token_dir = cluster.dir.join("cluster-token");
    std::fs::create_dir_all(&token_dir).expect("folder");
    std::fs::write(token_dir.join("token"), secret_token(&client, "t5", "kvgate-cluster").await).expect("token");
    let config = config.replace(CLUSTER_TOKEN_DIR, &token_dir.display().to_string());
    let config_path = cluster.dir.join("chart-config.yaml");
    std::fs::write(&config_path, &config).expect("config written");

    // kvgate's identity: the chart's service account, bound only to the chart's Role.
    let token = common::kube::service_account_token(&client, "t5", "kvgate").await;
    let kubeconfig = cluster.kubeconfig("chart-sa", &token, "t5");
    let restricted = {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
        kube::Client::try_from(cfg).expect("client")
    };
    let pods_elsewhere: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(restricted.clone(), "elsewhere");
    let denied = pods_elsewhere.list(&Default::default()).await.expect_err("no rights outside its namespace");
    assert!(denied.to_string().contains("forbidden"), "{denied}");
    let objectives: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        restricted.clone(),
        "t5",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk(common::kube::OBJECTIVE_GROUP, "v1alpha2", "InferenceObjective"),
            "inferenceobjectives",
        ),
    );
    objectives.list(&Default::default()).await.expect("InferenceObjectives readable");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(restricted, "t5");
    assert!(secrets.list(&Default::default()).await.is_err(), "no rights beyond pods, InferencePools and objectives");
    // An objective of the chart's pool: both runs below show it.
    put_pool(&client, "t5", &inference_objective("chat", json!({"priority": 7, "poolRef": {"name": "kvgate"}}))).await;

    let _sims = [sim("vllm-0", "127.0.5.2", &[]).await, sim("vllm-1", "127.0.5.3", &[]).await];
    kubelet.ready("vllm-0", &[("app", "vllm")], "127.0.5.2").await;

    // The container's command line with the chart's config, and with the reference picker's
    // flags alone.
    let (flags, admin, proxy) = listener_flags();
    let mut args: Vec<std::ffi::OsString> = vec!["--config".into(), config_path.into(), "--kubeconfig".into()];
    args.push(kubeconfig.clone().into());
    args.extend(flags.iter().map(Into::into));
    let chart_run = serve_process(&cluster, "chart-run", args);
    // The reference picker's chart's command line, unchanged but for the ports: its scheduler
    // file, log flags, TLS with a certificate folder, health alone on its own port.
    let epc = cluster.dir.join("default-plugins.yaml");
    std::fs::write(
        &epc,
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
         - type: queue-scorer\n- type: kv-cache-utilization-scorer\n- type: prefix-cache-scorer\n\
         schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n\
         \x20 - pluginRef: kv-cache-utilization-scorer\n  - pluginRef: prefix-cache-scorer\n",
    )
    .expect("EndpointPickerConfig written");
    let certs = cluster.dir.join("certs");
    std::fs::create_dir_all(&certs).expect("cert folder");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    std::fs::write(certs.join("tls.crt"), cert.cert.pem()).expect("cert");
    std::fs::write(certs.join("tls.key"), cert.signing_key.serialize_pem()).expect("key");
    let [grpc2, health2, metrics2, proxy_port2] = [0; 4].map(|_| common::free_port());
    let (admin2, proxy2) = (format!("http://127.0.0.1:{metrics2}"), format!("http://127.0.0.1:{proxy_port2}"));
    let reference_args = [
        "--pool-name",
        "kvgate",
        "--pool-namespace",
        "t5",
        "--zap-encoder",
        "json",
        "--log-level",
        "error",
        "--v",
        "1",
    ];
    let mut args: Vec<std::ffi::OsString> = reference_args.iter().map(Into::into).collect();
    args.extend([
        "--config-file".into(),
        epc.into(),
        "--secure-serving".into(),
        "--cert-path".into(),
        certs.clone().into(),
    ]);
    for (flag, port) in [("--grpc-port", grpc2), ("--grpc-health-port", health2), ("--metrics-port", metrics2)] {
        args.extend([flag.into(), port.to_string().into()]);
    }
    args.extend(["--proxy-addr".into(), format!("127.0.0.1:{proxy_port2}").into(), "--kubeconfig".into()]);
    args.push(kubeconfig.clone().into());
    let flag_run = serve_process(&cluster, "flag-run", args);
    for (admin, proxy, run) in [(&admin, &proxy, "chart-run"), (&admin2, &proxy2, "flag-run")] {
        // Generous: this runs beside the image build, which takes the machine's disk and CPU.
        let seen = eventually(60, || async { addresses_at(admin).await == ["127.0.5.2:8000"] }).await;
        let log = std::fs::read_to_string(cluster.dir.join(format!("{run}.log"))).unwrap_or_default();
        assert!(seen, "{run} at {admin}: endpoints {:?}; its log:\n{log}", addresses_at(admin).await);
        let ready = eventually(10, || async {
            common::client().get(format!("{admin}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(ready, "{admin} ready");
        // Models learned from the endpoint, then served.
        let body = json!({"model": "m", "prompt": "hi", "max_tokens": 2});
        let served =
            eventually(20, || async { common::post(&format!("{proxy}/v1/completions"), &body).await.0 == 200 }).await;
        assert!(served, "{proxy}: {:?}", common::post(&format!("{proxy}/v1/completions"), &body).await);
        expect_objectives(admin, json!({"chat": 7})).await;
    }
    // The reference chart's probe (gRPC health, service `inference-extension`, plaintext on the
    // health port) and ext_proc's port over TLS; the scheduler is the file's.
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let ask = |service: &str| HealthCheckRequest { service: service.to_owned() };
    let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{health2}"))
        .expect("uri")
        .connect()
        .await
        .expect("health port");
    let probe = HealthClient::new(plain);
    // gRPC health follows readiness within its 200 ms poll.
    let serving = eventually(10, || {
        let mut probe = probe.clone();
        async move {
            let status = probe.check(ask("inference-extension")).await.map(|r| r.into_inner().status);
            status.is_ok_and(|s| s == ServingStatus::Serving as i32)
        }
    })
    .await;
    assert!(serving, "the reference chart's probe passes");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{grpc2}"))
        .expect("uri")
        .tls_config(tls)
        .expect("TLS")
        .connect()
        .await
        .expect("ext_proc's port speaks TLS");
    let status = HealthClient::new(channel).check(ask("")).await.expect("health over TLS").into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let explain = common::client()
        .post(format!("{admin2}/debug/explain?path=/v1/completions"))
        .body(json!({"model": "m", "prompt": "hi"}).to_string())
        .send()
        .await
        .expect("explain")
        .text()
        .await
        .expect("text");
    assert!(explain.contains("queue-scorer") && !explain.contains("active-request-scorer"), "{explain}");

    kubelet.ready("vllm-1", &[("app", "vllm")], "127.0.5.3").await;
    for admin in [&admin, &admin2] {
        let both = ["127.0.5.2:8000", "127.0.5.3:8000"];
        assert!(eventually(20, || async { addresses_at(admin).await == both }).await, "{admin}: watch works");
    }
    drop((chart_run, flag_run));
}

/// The container image: deploy/Dockerfile built with buildah around this build's binary, from
/// a runtime base made on the spot (no registry can be reached); the binary inside starts.
#[test]
fn the_image_builds_and_its_binary_starts() {
    let out =
        common::ci_script("image-test.sh").arg(env!("CARGO_BIN_EXE_kvgate")).output().expect("ci/image-test.sh runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "image test failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("kvgate {}", env!("CARGO_PKG_VERSION")));
}

/// The chart's picker API token: a Secret it creates (or one named), mounted as a folder, with
/// `picker_api.token_file` in the rendered config; kvgate run on that config takes the Secret's
/// token and refuses calls without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_picker_api_token_comes_from_a_secret() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kvgate::front::picker::pb::{self, picker_client::PickerClient};
    let (cluster, client, _kubelet) = cluster_with("inferencepool-crd.yaml", GROUP, "t9").await;

    // Named: nothing created, the named Secret and key mounted.
    let named = common::kube::render_chart(
        "kvgate",
        "t9",
        &["inferenceExtension.pickerApi.token.existingSecret=mine", "inferenceExtension.pickerApi.token.key=tok"],
    );
    let docs = common::kube::yaml_documents(&named);
    let picker_secret = |d: &&Value| d["kind"] == "Secret" && d["metadata"]["name"] == "kvgate-picker-api";
    assert!(!docs.iter().any(|d| picker_secret(&d)), "no picker API Secret of the chart's own");
    let volumes =
        &docs.iter().find(|d| d["kind"] == "Deployment").expect("a Deployment")["spec"]["template"]["spec"]["volumes"];
    let token_volume =
        volumes.as_array().expect("volumes").iter().find(|v| v["name"] == "picker-api-token").expect("mounted");
    assert_eq!(token_volume["secret"], json!({"secretName": "mine", "items": [{"key": "tok", "path": "token"}]}));

    // Created: applied as rendered (one replica: the cluster token is another test's).
    let manifests = common::kube::render_chart(
        "kvgate",
        "t9",
        &[
            "inferencePool.modelServers.matchLabels.app=vllm",
            "inferenceExtension.pickerApi.token.create=true",
            "inferenceExtension.replicas=1",
        ],
    );
    common::kube::create_all(&client, &manifests, "t9").await;
    let secret = kube::Api::<Secret>::namespaced(client.clone(), "t9").get("kvgate-picker-api").await.expect("Secret");
    let token = secret.data.expect("data").remove("token").expect("key `token`").0;
    let token = String::from_utf8(token).expect("ASCII token");
    assert_eq!(token.len(), 48);
    let deployment = kube::Api::<Deployment>::namespaced(client.clone(), "t9").get("kvgate").await.expect("Deployment");
    let pod = deployment.spec.expect("spec").template.spec.expect("pod spec");
    let mount = pod.containers[0]
        .volume_mounts
        .as_ref()
        .and_then(|m| m.iter().find(|m| m.name == "picker-api-token"))
        .expect("the token's mount")
        .clone();
    assert!(mount.sub_path.is_none(), "a folder, so that a rotated Secret reaches the pod");
    let config = kube::Api::<ConfigMap>::namespaced(client.clone(), "t9").get("kvgate").await.expect("ConfigMap");
    let config = config.data.expect("data").remove("config.yaml").expect("config.yaml");
    let token_file = format!("{}/token", mount.mount_path);
    assert!(config.contains(&format!("token_file: {token_file}")), "{config}");

    // kvgate on that config, with the Secret's files where the pod would have them.
    let local = cluster.dir.join("picker-api");
    std::fs::create_dir_all(&local).expect("folder");
    std::fs::write(local.join("token"), &token).expect("token");
    let path = cluster.dir.join("chart-token.yaml");
    let mut cfg =
        Config::from_yaml(&config.replace(&mount.mount_path, &local.display().to_string()), &path).expect("config");
    cfg.grpc_addr = "127.0.0.1:0".parse().expect("address");
    cfg.admin_addr = "127.0.0.1:0".parse().expect("address");
    cfg.health_addr = None;
    let kubeconfig = cluster.kubeconfig("chart-token", ADMIN_TOKEN, "t9");
    let kv = start_with(cfg, &path, Some(&kubeconfig)).await.expect("kvgate starts");
    let mut c = PickerClient::connect(format!("http://{}", kv.grpc_addr)).await.expect("gRPC connects");
    let ask = || pb::ExplainRequest {
        path: "/v1/completions".into(),
        input: Some(pb::explain_request::Input::Body(json!({"model": "m", "prompt": "hi"}).to_string().into_bytes())),
    };
    let e = c.explain(ask()).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}", e.message());
    let mut req = tonic::Request::new(ask());
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ASCII"));
    c.explain(req).await.expect("the Secret's token is taken");
}

/// Where the chart mounts the cluster token's Secret.
const CLUSTER_TOKEN_DIR: &str = "/var/run/secrets/kvgate/cluster";

/// The value under `token` of Secret `name` in `ns`.
async fn secret_token(client: &kube::Client, ns: &str, name: &str) -> String {
    let secret = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("Secret {ns}/{name}: {e}"));
    let token = secret.data.and_then(|mut d| d.remove("token")).expect("key `token`").0;
    String::from_utf8(token).expect("ASCII token")
}

/// The rendered objects of `kind`.
fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The chart's default is two replicas sharing what they learn: a headless Service of every
/// pod, ready or not, whose DNS name is the config's `cluster.dns`; a generated token in a
/// Secret (kept on an upgrade), mounted as a file; a PodDisruptionBudget; a spread over nodes.
/// The API server takes every object; two kvgate on that config, with the Secret's token,
/// follow each other. One replica renders none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_replicas_share_state_through_a_headless_service() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{ConfigMap, Service};
    let (cluster, client, _kubelet) = cluster_with("inferencepool-crd.yaml", GROUP, "t10").await;
    let set = ["inferencePool.modelServers.matchLabels.app=vllm"];
    let manifests = common::kube::render_chart("kvgate", "t10", &set);
    let docs = common::kube::yaml_documents(&manifests);
    let selector = json!({"app.kubernetes.io/name": "kvgate", "app.kubernetes.io/instance": "kvgate"});

    // What only the rendering shows: the PodDisruptionBudget's API (this API server predates
    // policy/v1 and takes it as v1beta1).
    let pdb = of_kind(&docs, "PodDisruptionBudget");
    assert_eq!(pdb.len(), 1, "one PodDisruptionBudget");
    assert_eq!(pdb[0]["apiVersion"], "policy/v1");
    common::kube::create_all(&client, &manifests, "t10").await;

    // Read back from the API server, as it stored them.
    let deployment =
        kube::Api::<Deployment>::namespaced(client.clone(), "t10").get("kvgate").await.expect("Deployment");
    let spec = deployment.spec.expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let pdb_api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        client.clone(),
        "t10",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"),
            "poddisruptionbudgets",
        ),
    );
    let pdb = serde_json::to_value(pdb_api.get("kvgate").await.expect("PodDisruptionBudget")).expect("JSON");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{pdb}");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], selector);
    let peers = kube::Api::<Service>::namespaced(client.clone(), "t10").get("kvgate-peers").await.expect("Service");
    let peers = serde_json::to_value(peers.spec.expect("spec")).expect("JSON");
    assert_eq!(peers["clusterIP"], "None", "headless: {peers}");
    assert_eq!(peers["publishNotReadyAddresses"], true, "replicas starting together see each other");
    assert_eq!(peers["selector"], selector);
    assert_eq!(peers["ports"][0]["port"], 9002);
    assert_eq!(peers["ports"][0]["targetPort"], "grpc");
    let pod = serde_json::to_value(spec.template.spec.expect("pod spec")).expect("JSON");
    assert_eq!(
        pod["topologySpreadConstraints"],
        json!([{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector}}])
    );
    let volume = pod["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "cluster-token");
    let volume = volume.expect("the cluster token's volume");
    assert_eq!(volume["secret"]["secretName"], "kvgate-cluster");
    assert_eq!(volume["secret"]["items"], json!([{"key": "token", "path": "token"}]));
    let mounts = pod["containers"][0]["volumeMounts"].as_array().expect("mounts");
    let mount = mounts.iter().find(|m| m["name"] == "cluster-token").expect("the cluster token's mount");
    assert_eq!((&mount["mountPath"], &mount["readOnly"]), (&json!(CLUSTER_TOKEN_DIR), &json!(true)));
    assert!(mount.get("subPath").is_none(), "a folder, so that a rotated Secret reaches the pod");
    let token = secret_token(&client, "t10", "kvgate-cluster").await;
    assert_eq!(token.len(), 48);

    // kvgate's own parser reads the config: its peers are the headless Service's addresses.
    let config = kube::Api::<ConfigMap>::namespaced(client.clone(), "t10").get("kvgate").await.expect("ConfigMap");
    let config = config.data.expect("data").remove("config.yaml").expect("config.yaml");
    let path = cluster.dir.join("chart-cluster.yaml");
    let cfg = Config::from_yaml(&config, &path).expect("the chart's config parses");
    let section = cfg.cluster.as_ref().expect("a cluster section");
    assert_eq!(section.dns.as_deref(), Some("kvgate-peers.t10.svc.cluster.local:9002"));
    assert_eq!(section.token_file.as_deref(), Some(Path::new(&format!("{CLUSTER_TOKEN_DIR}/token"))));

    // An upgrade renders the Secret with the token it holds.
    let kubeconfig = cluster.kubeconfig("chart-cluster", ADMIN_TOKEN, "t10");
    let again = common::kube::yaml_documents(&common::kube::render_chart_on(&kubeconfig, "kvgate", "t10", &set));
    let rendered = |docs: &[Value]| of_kind(docs, "Secret")[0]["data"]["token"].clone();
    assert!(rendered(&docs).is_string());
    assert_eq!(rendered(&again), rendered(&docs), "the token is kept");

    // Two replicas on that config and the Secret's token, each at port P of its own address as
    // the headless Service's name resolves to (given here as `peers`), follow each other.
    let local = cluster.dir.join("cluster-token");
    std::fs::create_dir_all(&local).expect("folder");
    std::fs::write(local.join("token"), &token).expect("token");
    let port = common::free_port();
    let addresses = ["127.0.10.1", "127.0.10.2"].map(|ip| format!("{ip}:{port}"));
    let mut replicas = Vec::new();
    for address in &addresses {
        let mut cfg =
            Config::from_yaml(&config.replace(CLUSTER_TOKEN_DIR, &local.display().to_string()), &path).expect("config");
        cfg.grpc_addr = address.parse().expect("address");
        cfg.admin_addr = "127.0.0.1:0".parse().expect("address");
        cfg.health_addr = None;
        let c = cfg.cluster.as_mut().expect("cluster");
        c.dns = None;
        c.peers = addresses.to_vec();
        replicas.push(start_with(cfg, &path, Some(&kubeconfig)).await.expect("kvgate starts"));
    }
    for kv in &replicas {
        let admin = format!("http://{}/debug/cluster", kv.admin_addr);
        let joined = eventually(20, || async {
            get_json(&admin).await["peers"].as_array().is_some_and(|p| p.len() == 1 && p[0]["snapshot_age_ms"].is_u64())
        })
        .await;
        assert!(joined, "{} follows its peer: {}", kv.grpc_addr, get_json(&admin).await);
    }

    // One replica: the objects of a single picker, as before.
    let one = common::kube::render_chart("kvgate", "t10", &["inferenceExtension.replicas=1"]);
    let docs = common::kube::yaml_documents(&one);
    assert!(of_kind(&docs, "PodDisruptionBudget").is_empty() && of_kind(&docs, "Secret").is_empty());
    let services: Vec<&Value> = of_kind(&docs, "Service");
    assert_eq!(services.len(), 1, "only the picker's Service");
    assert_ne!(services[0]["spec"]["clusterIP"], "None");
    let pod = &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"];
    assert!(pod.get("topologySpreadConstraints").is_none(), "{pod}");
    assert!(!pod["volumes"].as_array().expect("volumes").iter().any(|v| v["name"] == "cluster-token"));
    let config = of_kind(&docs, "ConfigMap")[0]["data"]["config.yaml"].as_str().expect("config.yaml");
    assert!(Config::from_yaml(config, &path).expect("config").cluster.is_none(), "{config}");
}
