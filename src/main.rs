//! The `kvgate` binary: parse the command line, run the subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Sidecar(Box<kvgate::tools::sidecar::SidecarArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match kvgate::tools::check::check_config(&file) {
            Ok(report) => print_out(&report),
            Err(e) => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("error: {e}");
                }
                ExitCode::FAILURE
            }
        },
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
            run_async(kvgate::tools::sidecar::run(*args))
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
