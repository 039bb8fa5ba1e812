//! `kvgate sim`: a vLLM simulator faithful where routing can see it — the OpenAI API and its
//! bytes, Prometheus metrics, prefix-cache hits, continuous batching and queueing, KV events,
//! data-parallel ranks, P/D hand-offs, LoRA adapters — with failure injection for tests.
//!
//! Flags use vLLM's names where vLLM has the setting. The default latency model approximates
//! Llama-3.1-8B on one H100: a decode step reads ~16 GB of weights at 3.35 TB/s (≥ 4.8 ms) and
//! published batch-1 inter-token latency is 10–15 ms, hence a 10 ms step overhead plus 0.15 ms per
//! running request (≈ 20 ms at 64 requests); prefill runs at the ~15,900 tokens/s the reference
//! router assumes for this model (0.0628 ms per uncached token); NIXL moves KV at ~3 µs per token.

pub(crate) mod engine;
pub(crate) mod events;
pub(crate) mod faults;
pub(crate) mod kv;
pub(crate) mod metrics;
pub(crate) mod server;
pub(crate) mod tokenizer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use parking_lot::{Mutex, RwLock};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::front::listen::{ConnLimits, serve_http};
use crate::gateway::tasks::Tasks;

use engine::{Engine, EngineConfig, KvRole, Latency};
use events::{Encoding, KvEventsConfig};
use faults::{FaultKind, Faults};
use metrics::{FakeMetrics, SimMetrics};
use server::{LoraModule, PortState, Shared};

/// `kvgate sim` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Model path or name (also the served name when `--served-model-name` is absent).
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    pub model: String,
    /// Names the model is served under; the first is the `model_name` metric label.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Longest prompt plus completion, in tokens.
    #[arg(long, default_value_t = 32768)]
    pub max_model_len: usize,
    /// Requests in the running batch at most (per data-parallel rank).
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Tokens scheduled per engine step at most (chunked prefill).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV-cache blocks per rank (default 29,067: an 8B model on an 80 GB GPU at 0.9 utilisation).
    #[arg(long)]
    pub num_gpu_blocks_override: Option<usize>,
    /// Data-parallel ranks.
    #[arg(long, default_value_t = 1)]
    pub data_parallel_size: u32,
    /// Run only this rank (external load balancing, one process per rank).
    #[arg(long)]
    pub data_parallel_rank: Option<u32>,
    /// Serve rank k on port + k, each with its own engine and metrics.
    #[arg(long)]
    pub data_parallel_multi_port_external_lb: bool,
    /// The model's Hugging Face tokenizer folder (`tokenizer.json`, `tokenizer_config.json`,
    /// `chat_template.jinja`): prompts are tokenized and chats rendered with them, so the KV
    /// cache, the prefix-cache counters, usage and KV events are in the model's real tokens
    /// (default: the simulator's own ~4-characters-per-token tokenizer, whose counts differ from a
    /// real model's: give the model's folder here when a client counts tokens itself).
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<std::path::PathBuf>,
    /// KV events, as vLLM's JSON (`{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557",…}`):
    /// an endpoint with `*` binds (on `--host`), any other connects; rank r publishes on port + r.
    #[arg(long)]
    pub kv_events_config: Option<String>,
    /// KV-event encoding: tagged maps (newer vLLM) or tagged arrays (older vLLM).
    #[arg(long, value_enum, default_value = "map")]
    pub kv_events_encoding: Encoding,
    /// Serve LoRA adapters.
    #[arg(long)]
    pub enable_lora: bool,
    /// Adapters as `name=path` (or vLLM's JSON form `{"name":…,"path":…}`).
    #[arg(long, num_args = 1..)]
    pub lora_modules: Vec<String>,
    /// Adapters resident at once; more need a swap (`--lora-load-ms`).
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,
    /// P/D settings, as vLLM's JSON (`{"kv_connector":"NixlConnector","kv_role":"kv_both"}`).
    #[arg(long)]
    pub kv_transfer_config: Option<String>,
    /// Wall-clock seconds per simulated second; 0 never sleeps (for overhead benchmarks).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Fixed cost of an engine step, ms.
    #[arg(long, default_value_t = 10.0)]
    pub step_overhead_ms: f64,
    /// Cost per uncached prompt token, ms.
    #[arg(long, default_value_t = 0.0628)]
    pub prefill_ms_per_token: f64,
    /// Cost per request in the batch per step, ms.
    #[arg(long, default_value_t = 0.15)]
    pub decode_ms_per_seq: f64,
    /// Cost per token of KV received from a prefill endpoint, ms.
    #[arg(long, default_value_t = 0.003)]
    pub kv_transfer_ms_per_token: f64,
    /// Cost of swapping a LoRA adapter in, ms.
    #[arg(long, default_value_t = 25.0)]
    pub lora_load_ms: f64,
    /// Seed for generated tokens, default lengths and failure draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Probability in [0, 1] that a request fails.
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Failure kinds to draw from.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "500,429,503")]
    pub failure_types: Vec<FaultKind>,
    /// Delay of the `slow-start` failure, ms.
    #[arg(long, default_value_t = 2000)]
    pub slow_start_ms: u64,
    /// `x-inference-pod` (default: $POD_NAME, else `kvgate-sim-<port>`).
    #[arg(long)]
    pub pod_name: Option<String>,
    /// Seconds an idle kept-alive connection stays open (vLLM's HTTP server default: 5).
    #[arg(long, default_value_t = 5.0)]
    pub timeout_keep_alive: f64,
    /// Honour `/metrics?name[]=…` filters, as vLLM's exporter did before 0.32 (vLLM 0.32
    /// answers every scrape with its whole exposition, about 50 KB, and so does the simulator
    /// without this flag).
    #[arg(long)]
    pub metrics_name_filter: bool,
    /// Leave `usage.prompt_tokens_details.cached_tokens` out of responses, as vLLM does without
    /// `--enable-prompt-tokens-details` (a backend that does not say what it had cached).
    #[arg(long)]
    pub no_prompt_tokens_details: bool,
    /// Leave `vllm:cache_config_info` out of `/metrics` (a backend that does not say how large
    /// its KV cache is).
    #[arg(long)]
    pub no_cache_config_info: bool,
    /// Load `/metrics` reports instead of the engine's, as llm-d-inference-sim's flag:
    /// `{"running-requests":N,"waiting-requests":N,"kv-cache-usage":F,"loras":[{"running":"a,b","waiting":"c","timestamp":T}]}`
    /// (every rank reports it; absent numbers are 0; `max_lora` is `--max-loras`).
    #[arg(long, value_name = "JSON")]
    pub fake_metrics: Option<String>,
}

/// Default KV blocks: ~465k tokens of KV for an 8B model on an 80 GB GPU.
pub const DEFAULT_GPU_BLOCKS: usize = 29_067;

/// How long the simulator waits for its tasks to end once told to stop.
const STOP: Duration = Duration::from_secs(5);

/// A running simulator: its bound ports.
#[derive(Debug)]
pub struct Running {
    /// One address per port, rank order.
    pub addrs: Vec<SocketAddr>,
}

fn parse_lora(spec: &str) -> anyhow::Result<LoraModule> {
    if spec.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(spec).with_context(|| format!("--lora-modules `{spec}`"))?;
        let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let name = get("name").context("a --lora-modules JSON entry needs `name`")?;
        let path = get("path").context("a --lora-modules JSON entry needs `path`")?;
        return Ok(LoraModule { name, path });
    }
    let (name, path) = spec.split_once('=').with_context(|| format!("--lora-modules `{spec}`: expected name=path"))?;
    Ok(LoraModule { name: name.to_owned(), path: path.to_owned() })
}

fn parse_kv_role(json: Option<&str>) -> anyhow::Result<KvRole> {
    let Some(json) = json else { return Ok(KvRole::Both) };
    let v: serde_json::Value = serde_json::from_str(json).context("--kv-transfer-config is not JSON")?;
    match v.get("kv_role").and_then(|r| r.as_str()) {
        None | Some("kv_both") => Ok(KvRole::Both),
        Some("kv_producer") => Ok(KvRole::Producer),
        Some("kv_consumer") => Ok(KvRole::Consumer),
        Some(other) => bail!("--kv-transfer-config: unknown kv_role `{other}` (kv_producer, kv_consumer or kv_both)"),
    }
}

/// Starts the simulator's listeners and engines; returns once they are listening, with the
/// owner of its tasks (they run until it shuts down).
pub async fn start(args: SimArgs) -> anyhow::Result<(Running, Tasks)> {
    check(&args)?;
    let faults = faults(&args)?;
    let kv_events: Option<KvEventsConfig> = match &args.kv_events_config {
        Some(j) => Some(serde_json::from_str(j).context("--kv-events-config")?).filter(KvEventsConfig::enabled),
        None => None,
    };
    let kv_role = parse_kv_role(args.kv_transfer_config.as_deref())?;
    let fake = match &args.fake_metrics {
        Some(j) => Some(FakeMetrics::parse(j).map_err(|e| anyhow::anyhow!("--fake-metrics: {e}"))?),
        None => None,
    };
    let tokenizer = args.tokenizer.as_ref().map(|dir| crate::gateway::config::load_tokenizer(dir));
    let tokenizer = tokenizer.transpose().map_err(|e| anyhow::anyhow!("--tokenizer: {e}"))?;
    let vocab = tokenizer.as_ref().map_or(tokenizer::VOCAB, |t| t.vocab_size().max(1));
    let loras = args.lora_modules.iter().map(|s| parse_lora(s)).collect::<anyhow::Result<Vec<_>>>()?;
    if !loras.is_empty() && !args.enable_lora {
        bail!("--lora-modules needs --enable-lora");
    }
    let served =
        if args.served_model_name.is_empty() { vec![args.model.clone()] } else { args.served_model_name.clone() };
    let num_gpu_blocks = args.num_gpu_blocks_override.unwrap_or(DEFAULT_GPU_BLOCKS).max(1);
    let latency = Latency {
        step_overhead_ms: args.step_overhead_ms,
        prefill_ms_per_token: args.prefill_ms_per_token,
        decode_ms_per_seq: args.decode_ms_per_seq,
        kv_transfer_ms_per_token: args.kv_transfer_ms_per_token,
        lora_load_ms: args.lora_load_ms,
    };
    let ranks: Vec<u32> = match args.data_parallel_rank {
        Some(r) => vec![r],
        None => (0..args.data_parallel_size).collect(),
    };
    // Listeners first, so port 0 resolves before anything reports a port.
    let multi_port = args.data_parallel_multi_port_external_lb && args.data_parallel_rank.is_none();
    let listeners = bind(&args, if multi_port { ranks.len() } else { 1 }).await?;
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
    let pod_name = args
        .pod_name
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| format!("kvgate-sim-{}", addrs[0].port()));
    let shared = Arc::new(Shared {
        served: served.clone(),
        enable_lora: args.enable_lora,
        loras: RwLock::new(loras),
        max_model_len: args.max_model_len,
        kv_capacity_tokens: num_gpu_blocks * args.block_size,
        kv_role,
        faults: RwLock::new(faults),
        last_request_headers: Mutex::new(Vec::new()),
        pod_name,
        info: info(&args, &served, num_gpu_blocks),
        rng: Mutex::new(fastrand::Rng::with_seed(args.seed)),
        metrics_name_filter: args.metrics_name_filter,
        prompt_tokens_details: !args.no_prompt_tokens_details,
        cache_config_info: !args.no_cache_config_info,
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        tokenizer,
    });
    let side_host =
        if args.host == "0.0.0.0" || args.host == "::" { "127.0.0.1".to_owned() } else { args.host.clone() };
    let tasks = Tasks::new();
    let engine = |rank: u32, metrics: &SimMetrics| {
        let events_tx = kv_events.as_ref().map(|cfg| {
            let (tx, rx) = mpsc::unbounded_channel();
            let cfg = cfg.clone();
            let enc = args.kv_events_encoding;
            let shared = shared.clone();
            let host = args.host.clone();
            let publisher = async move {
                if let Err(e) = events::publish(cfg, rank, enc, rx, shared, host).await {
                    tracing::error!(rank, error = %format!("{e:#}"), "KV event publisher stopped");
                }
            };
            tasks.spawn("kv-event publisher", publisher).detach();
            tx
        });
        let cfg = EngineConfig {
            rank,
            block_size: args.block_size,
            num_gpu_blocks,
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
            time_scale: args.time_scale,
            latency,
            max_loras: if args.enable_lora { args.max_loras.max(1) } else { 0 },
            engine_id: format!("kvgate-sim-{:016x}-{rank}", args.seed ^ u64::from(addrs[0].port())),
            side_channel: (side_host.clone(), 5600 + rank as u16),
            seed: args.seed.wrapping_add(u64::from(rank)),
            model_name: served[0].clone(),
            vocab,
        };
        Engine::spawn(cfg, metrics.clone(), events_tx, &tasks)
    };
    // A port's metrics, pinned for the ranks behind it when `--fake-metrics` says so.
    let port_metrics = |engines: &[u32]| match &fake {
        Some(f) => SimMetrics::new().with_fake(f, engines, &served[0], args.max_loras),
        None => SimMetrics::new(),
    };
    let mut ports: Vec<(TcpListener, Arc<PortState>)> = Vec::new();
    if multi_port {
        for (listener, &rank) in listeners.into_iter().zip(&ranks) {
            let metrics = port_metrics(&[rank]);
            let h = engine(rank, &metrics);
            let port = listener.local_addr()?.port();
            ports.push((listener, Arc::new(PortState::new(shared.clone(), vec![h], metrics, port))));
        }
    } else {
        let metrics = port_metrics(&ranks);
        let engines = ranks.iter().map(|&r| engine(r, &metrics)).collect();
        let listener = listeners.into_iter().next().context("a listener")?;
        let port = listener.local_addr()?.port();
        ports.push((listener, Arc::new(PortState::new(shared.clone(), engines, metrics, port))));
    }
    serve_ports(ports, args.timeout_keep_alive, &tasks);
    Ok((Running { addrs }, tasks))
}

/// Refuses flag values the simulator cannot run with.
fn check(args: &SimArgs) -> anyhow::Result<()> {
    if args.data_parallel_size == 0 {
        bail!("--data-parallel-size must be at least 1");
    }
    if let Some(r) = args.data_parallel_rank.filter(|r| *r >= args.data_parallel_size) {
        bail!("--data-parallel-rank {r} is not below --data-parallel-size {}", args.data_parallel_size);
    }
    if !(args.time_scale >= 0.0 && args.time_scale.is_finite()) {
        bail!("--time-scale must be a number >= 0");
    }
    if !(args.timeout_keep_alive.is_finite() && args.timeout_keep_alive > 0.0 && args.timeout_keep_alive <= 86_400.0) {
        bail!("--timeout-keep-alive is in seconds, more than 0 and at most a day");
    }
    if args.block_size == 0 || args.max_num_seqs == 0 || args.max_num_batched_tokens == 0 {
        bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be at least 1");
    }
    Ok(())
}

/// The faults the flags ask for.
fn faults(args: &SimArgs) -> anyhow::Result<Faults> {
    let faults = Faults {
        failure_rate: args.failure_rate,
        failure_types: args.failure_types.clone(),
        slow_start_ms: args.slow_start_ms,
        paused: false,
        fail_next: 0,
        kv_events_drop_next: 0,
        kv_events_stalled: false,
        linger_after_done_ms: 0,
    };
    faults.validate().map_err(anyhow::Error::msg)?;
    Ok(faults)
}

/// Binds `count` listeners on consecutive ports from `--port` (all on any free port for 0).
async fn bind(args: &SimArgs, count: usize) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for k in 0..count {
        let port = if args.port == 0 { 0 } else { args.port.checked_add(k as u16).context("port out of range")? };
        let l = TcpListener::bind((args.host.as_str(), port))
            .await
            .with_context(|| format!("binding {}:{port}", args.host))?;
        listeners.push(l);
    }
    Ok(listeners)
}

/// The simulated engine as `/server_info` describes it.
fn info(args: &SimArgs, served: &[String], num_gpu_blocks: usize) -> serde_json::Value {
    json!({
        "model_path": args.model, "served_model_names": served, "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size, "num_gpu_blocks": num_gpu_blocks,
        "data_parallel_size": args.data_parallel_size, "tensor_parallel_size": 1,
        "enable_lora": args.enable_lora, "max_loras": args.max_loras, "time_scale": args.time_scale,
        "version": concat!("kvgate-sim-", env!("CARGO_PKG_VERSION")),
    })
}

/// Serves each port's HTTP API, one task of `tasks` per listener.
fn serve_ports(ports: Vec<(TcpListener, Arc<PortState>)>, keep_alive: f64, tasks: &Tasks) {
    // An idle connection is closed after the keep-alive timeout, as vLLM closes it; accepted
    // connections get TCP_NODELAY (tokens go out as small writes, which Nagle's algorithm and
    // delayed ACKs would hold back by up to 40 ms each).
    let limits = ConnLimits {
        header_read_timeout: Duration::from_secs_f64(keep_alive),
        max_connections: 65_536,
        // A load generator, or one router in front, is one client.
        max_per_client: 65_536,
        ..ConnLimits::default()
    };
    for (listener, state) in ports {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let serving = serve_http(tasks, listener, server::app(state), "simulator", stop_rx, limits);
        let port = async move {
            // Never told to stop: the simulator serves until its owner stops this task (which
            // drops the listener's).
            let _stop = stop;
            serving.await;
        };
        tasks.spawn("simulator port", port).detach();
    }
}

/// Runs the simulator until Ctrl-C.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let (running, tasks) = start(args).await?;
    for a in &running.addrs {
        println!("kvgate sim listening on http://{a}");
    }
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    tasks.shutdown(STOP).await;
    Ok(())
}
