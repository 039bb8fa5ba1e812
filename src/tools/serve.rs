//! `kvgate serve`: load the config, start every pool's discovery and scraping, and serve the
//! admin API (ext_proc and the proxy listen here too once configured).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;

mod demo;
mod memory;

use crate::front::admin;
use crate::front::extproc::{Picker, health::health_service};
use crate::front::listen::{ClientCertCheck, ConnLimits, Pace, Tls, drain, serve_grpc, serve_http, shutdown_signal};
use crate::front::picker;
use crate::front::picker::cluster;
use crate::front::proxy::{self, ProxyState};
use crate::gateway::config::{Config, ExtProcConfig, INFERENCE_POOL_GROUP, InferencePoolRef, TlsFiles, parse_yaml};
use crate::gateway::facade::Gateway;
use crate::gateway::paths::PathPolicy;
use crate::gateway::pool::{Launched, PoolSettings, launch};
use crate::gateway::tasks::{Task, Tasks};
use crate::gateway::telemetry::Telemetry;
use crate::routing::schedule::SchedulerSpec;

/// `kvgate serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The config file (YAML). Without it, kvgate runs its built-in demo: four simulated vLLM
    /// replicas behind the proxy, all on loopback.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override the config's `grpc_addr`.
    #[arg(long)]
    pub grpc_addr: Option<SocketAddr>,
    /// Override the config's `admin_addr`.
    #[arg(long)]
    pub admin_addr: Option<SocketAddr>,
    /// Override the config's `proxy_addr`.
    #[arg(long)]
    pub proxy_addr: Option<SocketAddr>,
    /// Override the config's `health_addr` (gRPC health alone).
    #[arg(long)]
    pub health_addr: Option<SocketAddr>,
    /// Serve one pool sourced from this Kubernetes `InferencePool` (the reference picker's
    /// flag). Without `--config`, the listeners take their defaults and the pool's models are
    /// learned from its endpoints; with it, the file's one pool (or a new one) follows the
    /// InferencePool.
    #[arg(long)]
    pub pool_name: Option<String>,
    /// The InferencePool's namespace (default: kvgate's own — the service account's, or the
    /// kubeconfig context's).
    #[arg(long, requires = "pool_name")]
    pub pool_namespace: Option<String>,
    /// The InferencePool's API group (version `v1`).
    #[arg(long, requires = "pool_name", default_value = INFERENCE_POOL_GROUP)]
    pub pool_group: String,
    /// Kubeconfig for the API server (default: `KUBECONFIG`, `~/.kube/config`, then the
    /// in-cluster service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub reference: ReferenceFlags,
}

/// The reference endpoint picker's other flags, so that its Helm chart can run kvgate's image
/// unchanged: the scheduler config, the ports, and TLS are honoured; logging and tracing
/// flags are accepted and ignored.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReferenceFlags {
    /// An EndpointPickerConfig file: the pool's scheduler (`plugins`, `schedulingProfiles`).
    #[arg(long, conflicts_with = "config_text")]
    pub config_file: Option<PathBuf>,
    /// The same, inline.
    #[arg(long)]
    pub config_text: Option<String>,
    /// ext_proc (and gRPC health) on `0.0.0.0:PORT`.
    #[arg(long, value_name = "PORT")]
    pub grpc_port: Option<u16>,
    /// gRPC health alone on `0.0.0.0:PORT`.
    #[arg(long, value_name = "PORT")]
    pub grpc_health_port: Option<u16>,
    /// The admin API (`/metrics`, probes, `/debug`) on `0.0.0.0:PORT`.
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// Serve ext_proc over TLS: the certificate in `--cert-path`, or a self-signed one. On by
    /// default with `--pool-name` and no `--config` (as the reference picker), off otherwise.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub secure_serving: Option<bool>,
    /// A folder with `tls.crt` and `tls.key` for `--secure-serving`.
    #[arg(long, value_name = "DIR")]
    pub cert_path: Option<PathBuf>,
    /// Accepted and ignored (kvgate logs as it does).
    #[arg(long, hide = true)]
    pub zap_encoder: Option<String>,
    /// Accepted and ignored.
    #[arg(long, hide = true)]
    pub log_level: Option<String>,
    /// Accepted and ignored.
    #[arg(long = "v", hide = true)]
    pub verbosity: Option<String>,
    /// Accepted and ignored.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub tracing: Option<String>,
}

impl ReferenceFlags {
    /// Applies the flags to `cfg`; `reference` says kvgate runs as the reference picker would
    /// (`--pool-name` without `--config`). The message says what is wrong.
    fn apply(&self, cfg: &mut Config, reference: bool) -> anyhow::Result<()> {
        let any = |port: u16| SocketAddr::from(([0, 0, 0, 0], port));
        if let Some(p) = self.grpc_port {
            cfg.grpc_addr = any(p);
        }
        if let Some(p) = self.grpc_health_port {
            cfg.health_addr = Some(any(p));
        }
        if let Some(p) = self.metrics_port {
            cfg.admin_addr = any(p);
        }
        let text = match (&self.config_file, &self.config_text) {
            (Some(path), _) => Some(
                std::fs::read_to_string(path).with_context(|| format!("reading --config-file {}", path.display()))?,
            ),
            (None, Some(text)) => Some(text.clone()),
            (None, None) => None,
        };
        if let Some(text) = text {
            let spec: SchedulerSpec =
                parse_yaml(&text).map_err(|(at, m)| anyhow::anyhow!("--config-file/--config-text: {at}: {m}"))?;
            match cfg.pools.as_mut_slice() {
                [pool] => pool.scheduler = Some(spec),
                pools => anyhow::bail!(
                    "--config-file/--config-text sets the scheduler of a config's one pool; the config has {}",
                    pools.len()
                ),
            }
        }
        match (self.secure_serving.or(reference.then_some(true)), &self.cert_path) {
            (Some(false), _) | (None, None) => {}
            (_, Some(dir)) => {
                cfg.extproc.tls = Some(TlsFiles {
                    cert_path: dir.join("tls.crt"),
                    key_path: dir.join("tls.key"),
                    client_ca_path: None,
                });
            }
            (Some(true), None) => cfg.extproc.self_signed_tls = true,
        }
        for (flag, set) in [
            ("--zap-encoder", self.zap_encoder.is_some()),
            ("--log-level", self.log_level.is_some()),
            ("--v", self.verbosity.is_some()),
            ("--tracing", self.tracing.is_some()),
        ] {
            if set {
                tracing::info!(flag, "flag of the reference picker accepted and ignored");
            }
        }
        Ok(())
    }
}

/// A running kvgate: its gateway, bound listeners and the owner of its tasks. Dropping it stops
/// everything.
#[derive(Debug)]
pub struct Server {
    /// The decision path over every pool.
    pub gateway: Arc<Gateway>,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// Where the OpenAI proxy listens, if configured.
    pub proxy_addr: Option<SocketAddr>,
    /// Where the ext_proc gRPC server listens.
    pub grpc_addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    listeners: Vec<Task>,
    /// Every task the server spawned: pools' publishers, scrapers and KV-event feeds,
    /// discovery, the decision reaper, the gRPC health loop, listeners, ext_proc and watch
    /// streams.
    tasks: Tasks,
    /// Discovery, the decision reaper and the health loop: aborted with the server (or when
    /// starting it fails half-way).
    _background: Vec<Task>,
}

impl Server {
    /// Stops accepting new connections and requests, lets the ones in flight (streams
    /// included) finish for up to `grace`, then stops every task and waits for them (up to
    /// [`TASKS_STOP`]).
    pub async fn shutdown(mut self, grace: std::time::Duration) {
        let _ = self.stop.send(true);
        drain(std::mem::take(&mut self.listeners), grace).await;
        self.tasks.shutdown(TASKS_STOP).await;
    }

    /// The owner of the server's tasks (to see which run).
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Listeners are aborted as their handles drop; the rest are told to stop.
        self.tasks.stop();
    }
}

/// Starts pools and listeners for `cfg` (read from `path`); returns once they are bound.
pub async fn start(cfg: Config, path: &Path) -> anyhow::Result<Server> {
    start_with(cfg, path, None).await
}

/// [`start`], with the kubeconfig for pools sourced from an InferencePool (see
/// [`launch`] for the default).
pub async fn start_with(cfg: Config, path: &Path, kubeconfig: Option<&Path>) -> anyhow::Result<Server> {
    let resolved = cfg.resolve(path)?;
    // Flags may have turned TLS on after the file was checked.
    if let Some(message) = cfg.cluster_over_tls() {
        anyhow::bail!("cluster: {message}");
    }
    let settings = PoolSettings::new(&cfg.scrape, &cfg.health);
    let telemetry = Arc::new(Telemetry::new());
    let tasks = Tasks::new();
    let Launched { pools, tasks: mut background } = launch(resolved, &settings, &telemetry, kubeconfig, &tasks).await?;
    if let Some(w) = cfg.open_picker_api() {
        tracing::warn!("{w}");
    }
    let paths = PathPolicy::new(&cfg.paths).map_err(|(at, m)| anyhow::anyhow!("{at}: {m}"))?;
    let gateway = Arc::new(
        Gateway::new(pools, cfg.max_body_bytes, cfg.max_buffered_bytes, telemetry.clone())
            .with_body_share(cfg.connections.max_body_share_percent)
            .with_paths(paths)
            .with_picker_api(&cfg.picker_api)
            .with_cluster(cfg.cluster.as_ref()),
    );
    // Decisions whose reports never come are released by this task.
    background.push(tasks.spawn("decision reaper", gateway.decisions().clone().run()));
    background.push(tasks.spawn("memory", memory::give_back()));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let limits = ConnLimits {
        header_read_timeout: std::time::Duration::from_millis(cfg.connections.header_read_timeout_ms),
        max_connections: cfg.connections.max_connections,
        pace: Pace::of(&cfg.connections),
        max_per_client: ConnLimits::per_client(
            cfg.connections.max_connections,
            cfg.connections.max_connections_per_client_percent,
        ),
    };
    let mut listeners = Vec::new();
    let listener =
        TcpListener::bind(cfg.admin_addr).await.with_context(|| format!("binding admin_addr {}", cfg.admin_addr))?;
    let admin_addr = listener.local_addr()?;
    listeners.push(serve_http(&tasks, listener, admin::app(gateway.clone()), "admin", stop_rx.clone(), limits));
    let proxy_addr = match cfg.proxy_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.with_context(|| format!("binding proxy_addr {addr}"))?;
            let bound = listener.local_addr()?;
            let state = Arc::new(ProxyState::new(gateway.clone(), cfg.proxy.clone()));
            listeners.push(serve_http(&tasks, listener, proxy::app(state), "proxy", stop_rx.clone(), limits));
            Some(bound)
        }
        None => None,
    };
    let listener =
        TcpListener::bind(cfg.grpc_addr).await.with_context(|| format!("binding grpc_addr {}", cfg.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    let picker = Picker::new(gateway.clone(), cfg.extproc.clone(), tasks.clone()).with_pace(limits.pace);
    let max = cfg.extproc.max_message_bytes;
    let ext = ExternalProcessorServer::new(picker).max_decoding_message_size(max).max_encoding_message_size(max);
    let (health, follow_readiness) = health_service(&gateway).await;
    background.push(tasks.spawn("grpc health", follow_readiness));
    let tls = grpc_tls(&cfg.extproc)?;
    // The picker API alone may require a client certificate; ext_proc and health never do.
    let require = ClientCertCheck { required: cfg.picker_api.require_client_cert };
    let (cluster_service, forward) = match gateway.cluster() {
        Some(c) => {
            let (service, tasks_of, forward) =
                cluster::start(gateway.clone(), c.clone(), telemetry.clone(), &tasks, stop_rx.clone())?;
            background.extend(tasks_of);
            (Some(service), Some(forward))
        }
        None => (None, None),
    };
    let api = InterceptedService::new(
        picker::service(gateway.clone(), &cfg.extproc, &cfg.picker_api, stop_rx.clone(), tasks.clone(), forward)?,
        require,
    );
    let (reflection_v1, reflection_v1alpha) = picker::reflection()?;
    let mut grpc = Routes::new(health.clone())
        .add_service(ext)
        .add_service(api)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    if let Some(service) = cluster_service {
        grpc = grpc.add_service(service);
    }
    let grpc = grpc.prepare().into_axum_router();
    listeners.push(serve_grpc(&tasks, listener, grpc, "ext_proc", stop_rx.clone(), limits, tls));
    if let Some(addr) = cfg.health_addr {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding health_addr {addr}"))?;
        let only_health = Routes::new(health).prepare().into_axum_router();
        listeners.push(serve_grpc(&tasks, listener, only_health, "health", stop_rx.clone(), limits, None));
    }
    Ok(Server { gateway, admin_addr, proxy_addr, grpc_addr, stop, listeners, tasks, _background: background })
}

/// The gRPC listener's TLS: the configured certificate and key (and client CA), a self-signed
/// certificate, or none (plain gRPC).
fn grpc_tls(cfg: &ExtProcConfig) -> anyhow::Result<Option<Tls>> {
    let read = |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    Ok(match &cfg.tls {
        Some(tls) => {
            let (cert, key) = (read(&tls.cert_path)?, read(&tls.key_path)?);
            let ca = tls.client_ca_path.as_deref().map(read).transpose()?;
            let made = Tls::from_pem(&cert, &key, ca.as_deref())
                .with_context(|| format!("extproc.tls ({}, {})", tls.cert_path.display(), tls.key_path.display()))?;
            Some(made)
        }
        None if cfg.self_signed_tls => {
            let made = rcgen::generate_simple_self_signed(vec!["kvgate".to_owned(), "localhost".to_owned()])
                .context("making a self-signed certificate")?;
            tracing::info!("ext_proc over TLS with a self-signed certificate");
            let tls = Tls::from_pem(made.cert.pem().as_bytes(), made.signing_key.serialize_pem().as_bytes(), None)
                .context("the self-signed certificate")?;
            Some(tls)
        }
        None => None,
    })
}

/// Runs `kvgate serve` until Ctrl-C or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (mut cfg, path) = match (&args.config, &args.pool_name) {
        (None, None) => return demo::run(args).await,
        (Some(path), _) => (Config::load(path)?, path.clone()),
        (None, Some(_)) => (Config::for_inference_pool(), PathBuf::from("--pool-name")),
    };
    if let Some(name) = &args.pool_name {
        let r = InferencePoolRef {
            name: name.clone(),
            namespace: args.pool_namespace.clone(),
            group: Some(args.pool_group.clone()),
        };
        cfg.follow_inference_pool(r).map_err(|m| anyhow::anyhow!("--pool-name: {m}"))?;
    }
    args.reference.apply(&mut cfg, args.config.is_none())?;
    apply_overrides(&mut cfg, &args);
    let server = start_with(cfg, &path, args.kubeconfig.as_deref()).await?;
    tracing::info!(
        admin = %server.admin_addr, proxy = ?server.proxy_addr, ext_proc = %server.grpc_addr,
        pools = server.gateway.pools().len(), "kvgate serving"
    );
    shutdown_signal().await;
    tracing::info!(grace_s = SHUTDOWN_GRACE.as_secs(), "shutting down: finishing requests in flight");
    server.shutdown(SHUTDOWN_GRACE).await;
    Ok(())
}

/// How long a shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a shutdown then waits for the server's tasks to end once told to stop (they end at
/// their next await point; this bounds one stuck on its thread).
pub const TASKS_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// Applies `--grpc-addr`, `--admin-addr`, `--proxy-addr` and `--health-addr`.
pub(crate) fn apply_overrides(cfg: &mut Config, args: &ServeArgs) {
    if let Some(a) = args.grpc_addr {
        cfg.grpc_addr = a;
    }
    if let Some(a) = args.admin_addr {
        cfg.admin_addr = a;
    }
    if let Some(a) = args.proxy_addr {
        cfg.proxy_addr = Some(a);
    }
    if let Some(a) = args.health_addr {
        cfg.health_addr = Some(a);
    }
}
