//! The `kvgate` binary: parse the command line, run the subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kvgate::gateway::config::Config;
use kvgate::gateway::config::endpoints::{EndpointsDocument, ResolvedEndpoint, load_endpoints_file};

#[derive(Debug, Parser)]
#[command(name = "kvgate", version, about = "Prefix-cache-aware routing for vLLM fleets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct BenchCli {
    #[command(subcommand)]
    sub: Option<BenchSub>,
    #[command(flatten)]
    args: Option<kvgate::tools::bench::BenchArgs>,
}

#[derive(Debug, Subcommand)]
enum BenchSub {
    /// Compare reports side by side (and overlay their TTFT distributions with --plot).
    Compare {
        /// Reports written by `kvgate bench --output` or `--save-result`, or `vllm bench serve` result files.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Write the overlaid TTFT CDFs here (SVG).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config file and print each pool's resolved endpoints and scheduler.
    CheckConfig {
        /// The config file (YAML).
        file: PathBuf,
    },
    /// Run kvgate: pools, discovery, scraping and the admin API, from a config file.
    Serve(Box<kvgate::tools::serve::ServeArgs>),
    /// Drive a seeded workload against an OpenAI-compatible server and report latency,
    /// throughput and prefix-cache hit rate.
    Bench(Box<BenchCli>),
    /// Run a simulated vLLM server (OpenAI API, metrics, prefix cache, KV events, DP, P/D, LoRA).
    Sim(Box<kvgate::tools::sim::SimArgs>),
    /// Run beside a decode endpoint: for requests naming a prefill endpoint in
    /// `x-prefiller-host-port`, do the prefill hand-off, then decode locally.
    Sidecar(kvgate::tools::sidecar::SidecarArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Serve(args) => {
            return_freed_buffers();
            init_logging();
            run_async(kvgate::tools::serve::run(*args))
        }
        Command::Bench(cli) => match cli.sub {
            Some(BenchSub::Compare { reports, plot }) => match kvgate::tools::bench::compare(&reports, plot.as_deref())
            {
                Ok(table) => print_out(&format!("{table}\n")),
                Err(e) => {
                    #[allow(clippy::print_stderr)]
                    {
                        eprintln!("error: {e:#}");
                    }
                    ExitCode::FAILURE
                }
            },
            None => match cli.args {
                Some(args) => run_async(kvgate::tools::bench::run(args)),
                None => {
                    #[allow(clippy::print_stderr)]
                    {
                        eprintln!("error: kvgate bench needs --base-url and --model (or `compare`); see --help");
                    }
                    ExitCode::FAILURE
                }
            },
        },
        Command::Sim(args) => {
            init_logging();
            run_async(kvgate::tools::sim::run(*args))
        }
        Command::Sidecar(args) => {
            return_freed_buffers();
            init_logging();
            run_async(kvgate::tools::sidecar::run(args))
        }
    }
}

/// Logs to stderr at info level.
fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Runs an async subcommand on a multi-threaded runtime; errors go to stderr and exit 1.
fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(fut));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let document = std::fs::read_to_string(file).ok().and_then(|text| EndpointsDocument::of(&text));
    if let Some(document) = document {
        return check_endpoints_file(file, document);
    }
    let resolved = Config::load(file).and_then(|cfg| cfg.resolve(file).map(|pools| (cfg, pools)));
    let (cfg, pools) = match resolved {
        Ok(v) => v,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    use std::fmt::Write as _;
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
    for pool in &pools {
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
                let _ = writeln!(
                    out,
                    "    endpoint {e} ({}) role {}",
                    e.name,
                    kvgate::routing::endpoint::Role::of_labels(&e.labels)
                );
            }
        }
        for line in pool.scheduler.to_string().lines() {
            let _ = writeln!(out, "  {line}");
        }
        if let Some(p) = &pool.precise {
            let ev = &p.kv_events;
            let how = match (&ev.port, &ev.bind) {
                (Some(port), _) => format!("connects to each endpoint's publisher at tcp://<ip>:{port}+rank"),
                (_, Some(b)) => format!("binds {b} for the engines to connect (topic kv@<ip:port>@<model>)"),
                _ => String::new(),
            };
            let replay =
                ev.replay_port.map_or("no replay socket".to_owned(), |r| format!("replays from <ip>:{r}+rank"));
            let _ = writeln!(out, "  KV events: {how}; topic filter `{}`; {replay}", ev.topic);
            let _ = writeln!(
                out,
                "  tokenizer {} (chat template: {})",
                p.tokenizer_dir.display(),
                if p.tokenizer.has_chat_template() { "yes" } else { "no" }
            );
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
    print_out(&out)
}

/// `check-config` on a file of endpoints rather than a config: says so, and validates it as the
/// endpoints file a pool's `endpoints_file` names.
fn check_endpoints_file(file: &std::path::Path, document: EndpointsDocument) -> ExitCode {
    let what = "looks like an endpoints file (a list of endpoints), not a kvgate config";
    let loaded = match document {
        EndpointsDocument::File => load_endpoints_file(file).map_err(|e| e.to_string()),
        EndpointsDocument::BareList => Err(format!(
            "{}: {what}, but its entries are not under `endpoints:`; an endpoints file reads \
             `endpoints: [{{address: ...}}, ...]`",
            file.display()
        )),
    };
    let endpoints = match loaded {
        Ok(endpoints) => endpoints,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {e}");
                if document == EndpointsDocument::File {
                    eprintln!("({} {what}: it was checked as one)", file.display());
                }
            }
            return ExitCode::FAILURE;
        }
    };
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK as an endpoints file (a list of endpoints), not a kvgate config", file.display());
    let _ = writeln!(out, "reference it from a pool's `endpoints_file` setting; kvgate re-reads it on every change");
    let _ = writeln!(out, "\n{} endpoints:", endpoints.len());
    for e in &endpoints {
        let _ = writeln!(out, "  {}", endpoint_line(e));
    }
    print_out(&out)
}

/// `endpoint ADDRESS (NAME) role ROLE rank N`, as `check-config` lists a resolved endpoint.
fn endpoint_line(e: &ResolvedEndpoint) -> String {
    let rank = match e.rank {
        Some(r) if e.rank_header => format!(" rank {r} (pinned with X-data-parallel-rank)"),
        Some(r) => format!(" rank {r}"),
        None => String::new(),
    };
    let role = kvgate::routing::endpoint::Role::of_labels(&e.labels);
    let name = if e.name == e.to_string() { String::new() } else { format!(" ({})", e.name) };
    format!("endpoint {e}{name} role {role}{rank}")
}

/// Asks a precise pool's listed endpoints for their `vllm:cache_config_info` (2 s each) and
/// says where its block size disagrees with the scheduler's.
fn block_size_warnings(pool: &kvgate::gateway::config::ResolvedPool, block_size: u32) -> Vec<String> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return Vec::new() };
    let endpoints: Vec<_> = pool.endpoints.iter().chain(&pool.file_endpoints).collect();
    rt.block_on(async {
        let mut out = Vec::new();
        for e in endpoints {
            let Some(addr) = e.socket_addr() else { continue };
            match kvgate::gateway::pool::scrape::cache_config(addr, e.rank).await {
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

/// Writes `text` to stdout. A reader that has gone (`| head`) is not an error: the output was
/// wanted only in part.
fn print_out(text: &str) -> ExitCode {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

/// glibc's malloc raises its mmap threshold each time it frees a large block (up to 32 MiB), so
/// after a burst of large request bodies later ones are carved from heap arenas it seldom gives
/// back: measured with `benches/memory.sh` (3 rounds of 40 concurrent 3 MB uploads), RSS at rest
/// grew from 17 to 32 to 130 MB over the rounds, peaking at 184 MB. A fixed 1 MiB threshold keeps
/// every block that large in its own mapping, unmapped when freed: RSS at rest stays at 29–34 MB
/// and peaks at 157 MB. (128 KiB gave 17–19 MB, but mapping every 220 KB chat body's buffers
/// afresh cost about 1.5 ms a request in page faults.) For `serve` and `sidecar` only: the
/// simulator and the load generator keep glibc's defaults.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn return_freed_buffers() {
    const THRESHOLD: libc::c_int = 1 << 20;
    // SAFETY: `mallopt` only sets allocator parameters, and this runs before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_freed_buffers() {}
