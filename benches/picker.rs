//! What one decision costs through kvgate's gRPC API against the same decision through Envoy's
//! ext_proc protocol, on loopback, with kvgate and a simulator as separate processes:
//! - `pick_report`: `Pick` with a 4 KiB chat body, then `Report` with `finished`;
//! - `ext_proc`: one ext_proc stream as Envoy drives it for that request (headers, body, the
//!   decision and the body back, the response headers) — the same decision, the same release.
//!
//! After the timings it prints kvgate's CPU time per decision for each (from `/proc`, over 4,000
//! decisions). Run: `cargo bench --bench picker`.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use kvgate::front::picker::pb::{self, picker_client::PickerClient};
use tonic::transport::Channel;

/// Envoy's ext_proc messages, the same builders the integration tests use.
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/common/extproc_msg.rs"]
mod msg;

/// The chat request builder of the integration tests.
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/common/request.rs"]
mod request;

const MODEL: &str = "m";

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A simulator and kvgate over it; returns them and kvgate's gRPC address.
fn start() -> (Proc, Proc, SocketAddr) {
    let bin = env!("CARGO_BIN_EXE_kvgate");
    let mut sim = Command::new(bin)
        .args(["sim", "--port", "0", "--served-model-name", MODEL, "--time-scale", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sim starts");
    let mut line = String::new();
    std::io::BufReader::new(sim.stdout.take().expect("stdout")).read_line(&mut line).expect("listening line");
    let sim_addr = line.trim().rsplit("http://").next().expect("address").to_owned();
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let dir = std::env::temp_dir().join(format!("kvgate-picker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("kvgate.yaml");
    let yaml = format!(
        "grpc_addr: {grpc}\nadmin_addr: 127.0.0.1:{}\npools: [{{name: p, models: [{MODEL}], endpoints: [{{address: '{sim_addr}'}}]}}]\n",
        free_port()
    );
    std::fs::write(&cfg, yaml).expect("config");
    let kv = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kvgate starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(grpc).is_err() {
        assert!(Instant::now() < deadline, "kvgate did not listen on {grpc}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(sim), Proc(kv), grpc)
}

/// User plus system CPU time of process `pid` so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit_once(')').expect("comm").1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // Linux reports these in USER_HZ, 100 per second on every architecture it runs on.
    Duration::from_micros(ticks * 10_000)
}

fn body() -> Vec<u8> {
    request::chat(MODEL).system("You are a careful assistant. ".repeat(140)).user("Summarize.").max_tokens(1).bytes()
}

async fn pick_report(c: &mut PickerClient<Channel>, body: &[u8]) {
    let req = pb::PickRequest {
        path: "/v1/chat/completions".into(),
        input: Some(pb::pick_request::Input::Body(body.to_vec())),
        ..Default::default()
    };
    let picked = c.pick(req).await.expect("pick").into_inner();
    let Some(pb::pick_response::Result::Decision(d)) = picked.result else { panic!("refused: {picked:?}") };
    let end = pb::Finished { status: 200, usage: None, response_bytes: 200 };
    let report = pb::ReportRequest {
        decision_id: d.decision_id,
        end: Some(pb::report_request::End::Finished(end)),
        ..Default::default()
    };
    c.report(report).await.expect("report");
}

async fn ext_proc(c: &mut ExternalProcessorClient<Channel>, body: &[u8]) {
    let msgs = [msg::post_headers("/v1/chat/completions"), msg::request_body(body, true)];
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for m in msgs {
        tx.send(m).await.expect("queued");
    }
    let mut answers = c.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("process").into_inner();
    // The decision (headers answer) and the body back.
    for _ in 0..2 {
        answers.message().await.expect("answer").expect("a message");
    }
    tx.send(msg::response_headers(&[(":status", "200")], true)).await.expect("queued");
    answers.message().await.expect("answer").expect("a message");
}

fn bench(c: &mut Criterion) {
    let (_sim, kv, grpc) = start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (mut picker, mut extproc) = rt.block_on(async {
        let uri = format!("http://{grpc}");
        (PickerClient::connect(uri.clone()).await.expect("c"), ExternalProcessorClient::connect(uri).await.expect("c"))
    });
    let body = body();
    let mut g = c.benchmark_group("decision_round_trip_4KiB");
    g.bench_function("pick_report", |b| b.iter(|| rt.block_on(pick_report(&mut picker, &body))));
    g.bench_function("ext_proc", |b| b.iter(|| rt.block_on(ext_proc(&mut extproc, &body))));
    g.finish();
    const N: u32 = 4_000;
    let pid = kv.0.id();
    let before = cpu(pid);
    rt.block_on(async {
        for _ in 0..N {
            pick_report(&mut picker, &body).await;
        }
    });
    let pick_cpu = (cpu(pid) - before) / N;
    let before = cpu(pid);
    rt.block_on(async {
        for _ in 0..N {
            ext_proc(&mut extproc, &body).await;
        }
    });
    let ext_cpu = (cpu(pid) - before) / N;
    println!("kvgate CPU per decision over {N}: pick_report {pick_cpu:?}, ext_proc {ext_cpu:?}");
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
