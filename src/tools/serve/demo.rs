//! The built-in demo: four simulated vLLM replicas on loopback behind kvgate's proxy, so
//! `kvgate serve` with no config shows the whole path working.

use std::path::Path;

use anyhow::Context;

use super::{ServeArgs, apply_overrides, start};
use crate::front::listen::shutdown_signal;
use crate::gateway::config::Config;

/// The model the demo serves.
const MODEL: &str = "demo-model";

pub(super) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut sims = Vec::new();
    let mut endpoints = Vec::new();
    for k in 0..4 {
        // Real-time 8B-on-H100 latency, a small KV cache (so prefix affinity matters), and a
        // pod name per replica so responses say who served them.
        let flags = [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--served-model-name",
            MODEL,
            "--time-scale",
            "1",
            "--max-num-seqs",
            "32",
            "--num-gpu-blocks-override",
            "4096",
            "--seed",
            &k.to_string(),
            "--pod-name",
            &format!("demo-replica-{k}"),
        ];
        let sim_args = crate::tools::cli::parse_flags::<crate::tools::sim::SimArgs, _, _>("sim", flags)
            .context("demo simulator flags")?;
        let (running, tasks) = crate::tools::sim::start(sim_args).await?;
        endpoints.push(format!("{{address: '{}', name: demo-replica-{k}}}", running.addrs[0]));
        sims.push(tasks);
    }
    let yaml = format!(
        "grpc_addr: 127.0.0.1:9002\nadmin_addr: 127.0.0.1:9090\nproxy_addr: 127.0.0.1:8080\n\
         pools: [{{name: demo, models: [{MODEL}], endpoints: [{}]}}]\n",
        endpoints.join(", ")
    );
    let path = Path::new("(built-in demo)");
    let mut cfg = Config::from_yaml(&yaml, path)?;
    apply_overrides(&mut cfg, &args);
    let server = start(cfg, path).await?;
    let proxy = server.proxy_addr.context("the demo always runs the proxy")?;
    println!(
        "kvgate demo: 4 simulated vLLM replicas serving `{MODEL}` (this is a demo, not a real model)\n\
         \n  proxy   http://{proxy}/v1   (OpenAI API)\n  ext_proc {grpc}   (Envoy endpoint picker, gRPC)\n  admin   http://{admin}/debug/endpoints   (watch the picks)\n\
         \ntry:\n  curl -s http://{proxy}/v1/chat/completions -H 'content-type: application/json' \\\n    \
         -d '{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"max_tokens\":16}}'\n\
         \nCtrl-C stops it; `kvgate serve --config FILE` serves a real fleet.",
        admin = server.admin_addr,
        grpc = server.grpc_addr,
    );
    shutdown_signal().await;
    server.shutdown(std::time::Duration::from_secs(5)).await;
    for sim in sims {
        sim.shutdown(super::TASKS_STOP).await;
    }
    Ok(())
}
