//! `kvgate serve`: load the config, start every pool's discovery and scraping, and serve the
//! admin API (ext_proc and the proxy listen here too once configured).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin;
use crate::config::Config;
use crate::pool::{AbortOnDrop, Pool, discovery};
use crate::route::{Gateway, PoolRouter};
use crate::telemetry::Telemetry;

/// `kvgate serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The config file (YAML).
    #[arg(long)]
    pub config: PathBuf,
    /// Override the config's `grpc_addr`.
    #[arg(long)]
    pub grpc_addr: Option<SocketAddr>,
    /// Override the config's `admin_addr`.
    #[arg(long)]
    pub admin_addr: Option<SocketAddr>,
    /// Override the config's `proxy_addr`.
    #[arg(long)]
    pub proxy_addr: Option<SocketAddr>,
}

/// A running kvgate: its gateway and bound listeners. Dropping it stops everything.
#[derive(Debug)]
pub struct Server {
    /// The decision path over every pool.
    pub gateway: Arc<Gateway>,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    _tasks: Vec<AbortOnDrop>,
}

/// Starts pools and listeners for `cfg` (read from `path`); returns once they are bound.
pub async fn start(cfg: Config, path: &Path) -> anyhow::Result<Server> {
    let resolved = cfg.resolve(path)?;
    let settings = cfg.pool_settings();
    let telemetry = Arc::new(Telemetry::new());
    let stale_ms = settings.stale_after.as_millis() as u64;
    let mut tasks = Vec::new();
    let mut pools = Vec::new();
    for rp in resolved {
        let router = PoolRouter::new(rp.name, rp.models, rp.scheduler, stale_ms);
        let pool = Pool::new(router, settings.clone(), telemetry.clone());
        tasks.push(AbortOnDrop(tokio::spawn(discovery::run(pool.clone(), rp.endpoints, rp.endpoints_file))));
        pools.push(pool);
    }
    let gateway = Arc::new(Gateway::new(pools, cfg.max_body_bytes, telemetry));
    let listener =
        TcpListener::bind(cfg.admin_addr).await.with_context(|| format!("binding admin_addr {}", cfg.admin_addr))?;
    let admin_addr = listener.local_addr()?;
    let app = admin::app(gateway.clone());
    tasks.push(AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin listener stopped");
        }
    })));
    Ok(Server { gateway, admin_addr, _tasks: tasks })
}

/// Runs `kvgate serve` until Ctrl-C or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(&args.config)?;
    if let Some(a) = args.grpc_addr {
        cfg.grpc_addr = a;
    }
    if let Some(a) = args.admin_addr {
        cfg.admin_addr = a;
    }
    if let Some(a) = args.proxy_addr {
        cfg.proxy_addr = Some(a);
    }
    let server = start(cfg, &args.config).await?;
    tracing::info!(admin = %server.admin_addr, pools = server.gateway.pools().len(), "kvgate serving");
    shutdown_signal().await;
    tracing::info!("shutting down");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
