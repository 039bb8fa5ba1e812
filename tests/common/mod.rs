//! Helpers shared by the integration tests: a fleet of simulators with kvgate in front
//! ([`gateway`]), the one chat request builder ([`chat`]), Envoy's ext_proc messages
//! ([`extproc_msg`]), bounded waits on a condition ([`eventually`]), and smaller pieces: start
//! simulators in-process on loopback port 0, read Prometheus text, pick free ports.
#![allow(dead_code, unreachable_pub, unused_imports)]

pub mod envoy;
pub mod extproc_msg;
mod gateway;
pub mod kube;
mod request;

pub use gateway::{Fleet, Gateway, gateway};
pub use request::{Chat, chat};

use std::net::SocketAddr;
use std::time::Duration;

use kvgate::tools::sim::{self, SimArgs};

/// A simulator running in this test's runtime; stops when the runtime ends.
pub struct Sim {
    pub addrs: Vec<SocketAddr>,
    _tasks: kvgate::gateway::tasks::Tasks,
}

impl Sim {
    /// `http://addr` of port `k`.
    pub fn url(&self, k: usize) -> String {
        format!("http://{}", self.addrs[k])
    }
}

/// Starts a simulator with these flags (plus `--port 0` unless given).
pub async fn start_sim(flags: &[&str]) -> Sim {
    let mut all: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    if !flags.contains(&"--port") {
        all.extend(["--port".into(), "0".into()]);
    }
    let args = kvgate::tools::cli::parse_flags::<SimArgs, _, _>("sim", &all).expect("valid simulator flags");
    let (running, tasks) = sim::start(args).await.expect("simulator starts");
    Sim { addrs: running.addrs, _tasks: tasks }
}

/// `bash ci/SCRIPT` from the repository, with the variables cargo sets for build scripts and
/// tests taken out of its environment: `OUT_DIR`, `TARGET` or a jobserver's `MAKEFLAGS` mean
/// something else to the tools a script runs (Kubernetes' `make` writes into `OUT_DIR`).
pub fn ci_script(script: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ci").join(script));
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if is_cargo_variable(name) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Whether `name` is one of the variables cargo sets (or inherits for its jobserver).
pub fn is_cargo_variable(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "OUT_DIR",
        "TARGET",
        "HOST",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_LINKER",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
    ];
    const PREFIXES: &[&str] = &["CARGO", "__CARGO", "DEP_", "RUSTC_", "RUSTDOC_"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// An HTTP client with a bound on every request.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client")
}

/// The value of the series of `name` whose labels include every `label="value"` in `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        if labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) { value.parse().ok() } else { None }
    })
}

/// Fetches `/metrics` of `base`.
pub async fn metrics(base: &str) -> String {
    client().get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("text")
}

/// POSTs JSON, returns status and parsed body.
pub async fn post(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// Polls `cond` every 20 ms until it holds or `secs` pass; returns whether it held.
pub async fn eventually<F, Fut>(secs: u64, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A `kvgate sim` child process (for tests that kill and restart an endpoint).
pub struct SimProcess {
    pub addr: SocketAddr,
    child: std::process::Child,
}

impl SimProcess {
    /// Starts `kvgate sim` with `flags` and waits for its listening line.
    pub fn start(flags: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .arg("sim")
            .args(flags)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kvgate sim starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("listening line");
        let addr =
            line.trim().rsplit("http://").next().and_then(|a| a.parse().ok()).expect("an address in the first line");
        Self { addr, child }
    }
}

impl SimProcess {
    /// Stops the process (SIGSTOP): its kernel still accepts connections, but nothing answers.
    pub fn stop(&self) {
        assert!(self.signal("-STOP"), "the simulator stops");
    }

    /// Lets a stopped process go on (SIGCONT).
    pub fn resume(&self) {
        assert!(self.signal("-CONT"), "the simulator goes on");
    }

    fn signal(&self, signal: &str) -> bool {
        std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        // A stopped process is let go first, so nothing of it outlives the test, even on a panic.
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts kvgate (pools, discovery, listeners) from config text; returns the server. The gRPC
/// listener goes on a free port unless the text names one.
pub async fn start_kvgate(yaml: &str) -> kvgate::tools::serve::Server {
    let path = std::path::Path::new("test.yaml");
    let yaml = if yaml.contains("grpc_addr") { yaml.to_owned() } else { format!("grpc_addr: 127.0.0.1:0\n{yaml}") };
    let cfg = kvgate::gateway::config::Config::from_yaml(&yaml, path).expect("config parses");
    kvgate::tools::serve::start(cfg, path).await.expect("kvgate starts")
}

/// Whether gRPC health on `channel` comes to answer SERVING for `service` (within 5 s).
pub async fn grpc_serving(channel: tonic::transport::Channel, service: &str) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let health = HealthClient::new(channel);
    eventually(5, || {
        let mut c = health.clone();
        async move {
            c.check(HealthCheckRequest { service: service.into() })
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
        }
    })
    .await
}

/// Waits until kvgate lists `n` endpoints in its first pool, all scraped.
pub async fn wait_scraped(kv: &kvgate::tools::serve::Server, n: usize) {
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    let ok = eventually(10, || async {
        let v = get_json(&debug).await;
        v["pools"][0]["endpoints"].as_array().is_some_and(|e| e.len() == n && e.iter().all(|e| e["stale"] == false))
    })
    .await;
    assert!(ok, "endpoints scraped: {}", get_json(&debug).await);
}

/// A counter's value per data-parallel rank (`engine` label) in a simulator's `/metrics`.
pub async fn per_engine(base: &str, name: &str, ranks: u32) -> Vec<f64> {
    let m = metrics(base).await;
    (0..ranks).map(|r| metric(&m, name, &[("engine", &r.to_string())]).unwrap_or(0.0)).collect()
}

/// GETs a JSON document.
pub async fn get_json(url: &str) -> serde_json::Value {
    client().get(url).send().await.expect("request").json().await.expect("JSON")
}

/// POSTs a JSON body, returns the response text (e.g. an SSE stream, read to its end).
pub async fn post_text(url: &str, body: &serde_json::Value) -> String {
    client().post(url).body(body.to_string()).send().await.expect("request").text().await.expect("body")
}

/// A Python virtualenv under `target/` with `packages` installed from PyPI (once per machine);
/// returns its `python`.
pub fn python_venv(name: &str, packages: &[&str]) -> std::path::PathBuf {
    use std::process::Command;
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join(name);
    let python = venv.join("bin").join("python");
    let stamp = venv.join(format!("installed-{}", packages.join("-").replace(['=', '/', '<', '>'], "_")));
    if !stamp.exists() {
        let ok = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().is_ok_and(|s| s.success())
            && Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(packages)
                .status()
                .is_ok_and(|s| s.success());
        assert!(ok, "could not install {packages:?} into {}", venv.display());
        std::fs::write(&stamp, "").expect("stamp");
    }
    python
}

/// Opens an ext_proc stream to kvgate at `addr`, sends `messages` and returns its first answer
/// (within 10 s).
pub async fn extproc_first_answer(
    addr: SocketAddr,
    messages: Vec<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest>,
) -> envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse {
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    let mut client = ExternalProcessorClient::connect(format!("http://{addr}")).await.expect("gRPC connects");
    let mut answers = client.process(tokio_stream::iter(messages)).await.expect("a stream").into_inner();
    tokio::time::timeout(std::time::Duration::from_secs(10), answers.message())
        .await
        .expect("an answer in time")
        .expect("no stream error")
        .expect("a message")
}

/// The output of a future that finishes without waiting (a gateway route in a pool without flow
/// control): polled once; one that would wait is a test's mistake.
#[allow(dead_code)]
pub fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("the future waits; only one that finishes at once can be taken now"),
    }
}
