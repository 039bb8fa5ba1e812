//! A running kvgate owns every task it starts: dropping the server, or shutting it down, stops
//! its pools' publishers and scrapers, discovery, the gRPC health loop, the listeners and the
//! connections they serve (a client that keeps its connection open holds no task). The first
//! test runs the simulator and the clients on a runtime of their own, so the runtime under test
//! counts kvgate's tasks alone; the second asks the server's task owner which tasks run.

mod common;

use std::time::Duration;

use common::{eventually, start_kvgate, start_sim};

const MODEL: &str = "m";

#[test]
fn no_task_outlives_the_server() {
    let outside = tokio::runtime::Runtime::new().expect("runtime for the simulator and clients");
    let sim = outside.block_on(start_sim(&["--time-scale", "0", "--served-model-name", MODEL]));
    let sim_addr = sim.addrs[0];
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let alive = || rt.metrics().num_alive_tasks();
    let baseline = alive();
    for graceful in [false, true] {
        let kv = rt.block_on(start_kvgate(&format!(
            "admin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\nhealth_addr: 127.0.0.1:0\n\
             pools: [{{name: p, models: [{MODEL}], endpoints: [{{address: '{sim_addr}'}}]}}]\n"
        )));
        let proxy = kv.proxy_addr.expect("proxy listens");
        // Traffic from the other runtime: a scraped endpoint, a proxied request, a ready check.
        // The client keeps its connections open: their tasks on the server are the server's too.
        let client = reqwest::Client::new();
        let keep = client.clone();
        let admin = kv.admin_addr;
        let status = outside.block_on(async move {
            let ready = eventually(10, || async {
                let r = client.get(format!("http://{admin}/readyz")).send().await;
                r.is_ok_and(|r| r.status() == 200)
            })
            .await;
            assert!(ready, "kvgate became ready");
            let body = serde_json::json!({"model": MODEL, "prompt": "hello", "max_tokens": 2});
            let r = client.post(format!("http://{proxy}/v1/completions")).json(&body).send().await.expect("proxied");
            let status = r.status().as_u16();
            r.bytes().await.expect("body");
            status
        });
        assert_eq!(status, 200);
        let running = alive();
        // Publisher, scraper, discovery, health loop and four listeners at least.
        assert!(running >= baseline + 6, "only {} tasks while serving", running - baseline);
        if graceful {
            rt.block_on(kv.shutdown(Duration::from_secs(5)));
        } else {
            drop(kv);
        }
        let gone = rt.block_on(eventually(10, || async { alive() == baseline }));
        assert!(gone, "{} of kvgate's tasks outlived it (graceful: {graceful})", alive() - baseline);
        drop(keep);
    }
    drop(sim);
}

/// `Server::shutdown` stops every task the server owns and waits for them: the pool's
/// publisher, scraper and its connection, the decision reaper, the health loop, the listeners,
/// and an ext_proc stream a client keeps open past the grace period (static discovery has ended
/// by then). None is left once it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_stops_every_owned_task_before_it_returns() {
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", MODEL]).await;
    let kv = start_kvgate(&format!(
        "admin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\nhealth_addr: 127.0.0.1:0\n\
         pools: [{{name: p, models: [{MODEL}], endpoints: [{{address: '{}'}}]}}]\n",
        sim.addrs[0]
    ))
    .await;
    let tasks = kv.tasks().clone();
    let names = || tasks.running().into_iter().map(|(name, _)| name).collect::<Vec<_>>();
    // A stream Envoy opened and never ends: its task is the server's too.
    let mut client = ExternalProcessorClient::connect(format!("http://{}", kv.grpc_addr)).await.expect("connect");
    let (_envoy, requests) = tokio::sync::mpsc::channel(1);
    let _answers = client.process(tokio_stream::wrappers::ReceiverStream::new(requests)).await.expect("a stream");
    let expected = [
        "pool publisher",
        "scraper",
        "scrape connection",
        "decision reaper",
        "grpc health",
        "admin",
        "proxy",
        "ext_proc",
        "health",
        "ext_proc stream",
    ];
    let all_running = eventually(10, || async { expected.iter().all(|n| names().contains(n)) }).await;
    assert!(all_running, "running: {:?}", tasks.running());
    kv.shutdown(Duration::from_millis(300)).await;
    assert!(tasks.running().is_empty(), "still running after the shutdown: {:?}", tasks.running());
}
