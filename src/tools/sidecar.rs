//! `kvgate sidecar`: runs beside a decode endpoint, in front of it, so a P/D fleet works behind
//! Envoy with kvgate's ext_proc picker alone.
//!
//! The picker sends a request to the decode endpoint's sidecar and, when it chose a separate
//! prefill endpoint, names it in `x-prefiller-host-port`. For such a request the sidecar runs
//! the prefill leg against that endpoint ([`crate::front::handoff::handoff`]) and sends the decode leg
//! to its local vLLM; if the prefill leg fails, the local vLLM prefills itself. With
//! `--report-to` it tells kvgate how the leg went (`kvgate.v1.Picker/Report`, by the decision id
//! in `x-kvgate-decision-id`) before the decode leg goes out, so kvgate's accounting is as exact
//! as when its own proxy runs the hand-off. Every other
//! request (no header, other paths, `/metrics`, `/health`) goes to the local vLLM as it is — but
//! for a client's own `kv_transfer_params`, which are removed — so the sidecar's address can
//! stand for the decode endpoint everywhere, scraping included.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};
use tonic::transport::Channel;

use crate::front::handoff::{self, Fallback, PrefillLeg};
use crate::front::http::{
    DECISION_HEADER, PREFILLER_HEADER, PREFILLER_RANK_HEADER, UpstreamClient, answer, end_to_end, ensure_request_id,
    json_error, no_route, read_body, relay, upstream_client, upstream_request, wrong_method,
};
use crate::front::listen::{ConnLimits, drain, serve_http, shutdown_signal};
use crate::front::picker::TokenFile;
use crate::front::picker::pb::{self, picker_client::PickerClient};
use crate::gateway::answer::Answer;
use crate::gateway::budget::BodyBudget;
use crate::gateway::config::DEFAULT_MAX_BUFFERED_BYTES;
use crate::gateway::events::Prefill;
use crate::gateway::tasks::{Task, Tasks};
use crate::routing::pd;
use crate::routing::request::ApiKind;
use crate::routing::schedule::Subset;

/// `kvgate sidecar` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarArgs {
    /// Where the sidecar listens (the address the picker routes to).
    #[arg(long, default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,
    /// The local decode endpoint (vLLM), `ip:port`.
    #[arg(long, default_value = "127.0.0.1:8200")]
    pub decode: SocketAddr,
    /// Prefill endpoints the sidecar may be sent to (`ip:port`, or an IP for all its ports);
    /// repeatable. A request naming any other endpoint is decoded with local prefill. This or
    /// `--allow-any-prefill` is required.
    #[arg(long = "allow-prefill")]
    pub allow_prefill: Vec<String>,
    /// Use whatever prefill endpoint `x-prefiller-host-port` names. Only safe when nothing but
    /// the picker (which overwrites the header) can reach the sidecar.
    #[arg(long, conflicts_with = "allow_prefill")]
    pub allow_any_prefill: bool,
    /// Bound on the prefill leg; past it the local endpoint prefills.
    #[arg(long, default_value_t = 30_000)]
    pub prefill_timeout_ms: u64,
    /// Bound on connecting to an endpoint.
    #[arg(long, default_value_t = 2_000)]
    pub connect_timeout_ms: u64,
    /// Bound on the local endpoint's response headers after the request is sent.
    #[arg(long, default_value_t = 600_000)]
    pub first_byte_timeout_ms: u64,
    /// Bound on silence between two chunks of a response.
    #[arg(long, default_value_t = 300_000)]
    pub idle_timeout_ms: u64,
    /// Largest request body accepted.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Request bytes held in memory at once, over every request; past it, 503.
    #[arg(long, default_value_t = DEFAULT_MAX_BUFFERED_BYTES)]
    pub max_buffered_bytes: usize,
    /// Serve the sidecar's own metrics (`/metrics`) and `/healthz` here.
    #[arg(long)]
    pub admin_addr: Option<SocketAddr>,
    /// kvgate's gRPC address (`http://HOST:9002`): report each hand-off's outcome there
    /// (`kvgate.v1.Picker/Report`, by the decision id the picker sends in
    /// `x-kvgate-decision-id`), so kvgate learns which endpoint computed the prompt. Without it
    /// kvgate takes every hand-off to have succeeded.
    #[arg(long)]
    pub report_to: Option<String>,
    /// A file holding the bearer token of kvgate's picker API (`picker_api.token_file` there),
    /// sent with each report as `authorization: Bearer <token>`; re-read every second, so a
    /// rotated Secret takes effect without a restart.
    #[arg(long, requires = "report_to")]
    pub report_token_file: Option<std::path::PathBuf>,
    /// Bound on one report; past it the decode leg goes on without it.
    #[arg(long, default_value_t = 1_000)]
    pub report_timeout_ms: u64,
}

/// The sidecar's counters.
#[derive(Debug)]
struct Counters {
    registry: Registry,
    /// `kvgate_sidecar_requests_total{kind}`: prefill-decode, decode-only, fallback.
    requests: IntCounterVec,
    /// `kvgate_sidecar_fallbacks_total{reason}`: the gateway's `kvgate_disagg_fallbacks_total`
    /// has a `pool` label as well, so the sidecar's family has its own name.
    fallbacks: IntCounterVec,
    /// `kvgate_sidecar_reports_total{result}`: hand-off reports to kvgate (`ok`, `failed`, and
    /// `skipped` while paused after one went unanswered).
    reports: IntCounterVec,
}

impl Counters {
    fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "kvgate_sidecar_requests_total",
                "Requests by how they were served: prefill-decode, decode-only, fallback.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "kvgate_sidecar_fallbacks_total",
                "Prefill hand-offs that failed and fell back to prefill on the decode endpoint, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let reports = IntCounterVec::new(
            Opts::new(
                "kvgate_sidecar_reports_total",
                "Hand-off outcomes reported to kvgate, by result (ok, failed, skipped).",
            ),
            &["result"],
        )
        .expect("valid metric");
        registry.register(Box::new(requests.clone())).expect("unique");
        registry.register(Box::new(fallbacks.clone())).expect("unique");
        registry.register(Box::new(reports.clone())).expect("unique");
        Self { registry, requests, fallbacks, reports }
    }
}

/// Which prefill endpoints a request may name.
#[derive(Debug)]
enum Allow {
    /// Those in the list.
    Listed(Subset),
    /// Any.
    Any,
}

#[derive(Debug)]
struct Sidecar {
    args: SidecarArgs,
    budget: BodyBudget,
    allow: Allow,
    client: UpstreamClient,
    counters: Counters,
    /// Where hand-off outcomes are reported.
    reports: Option<PickerClient<Channel>>,
    /// The token reports carry, if kvgate's picker API wants one.
    report_token: Option<TokenFile>,
    /// Until when reports are not tried, after one that got no answer in time (ms since the
    /// Unix epoch): a kvgate that is down does not hold up every decode leg.
    reports_paused_until: std::sync::atomic::AtomicU64,
}

/// A running sidecar. Dropping it stops it at once; [`Running::shutdown`] lets requests finish.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its admin listener is, if any.
    pub admin_addr: Option<SocketAddr>,
    stop: tokio::sync::watch::Sender<bool>,
    /// The listeners (aborted when dropped).
    listeners: Vec<Task>,
    /// The owner of the listeners' tasks.
    tasks: Tasks,
}

impl Running {
    /// Stops accepting connections and lets requests in flight (streams included) finish for up
    /// to `grace`, then waits for its tasks to end.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        drain(std::mem::take(&mut self.listeners), grace).await;
        self.tasks.shutdown(Duration::from_secs(5)).await;
    }
}

/// Binds and starts a sidecar.
pub async fn start(args: SidecarArgs) -> anyhow::Result<Running> {
    if args.prefill_timeout_ms == 0 || args.first_byte_timeout_ms == 0 || args.connect_timeout_ms == 0 {
        anyhow::bail!("--prefill-timeout-ms, --first-byte-timeout-ms and --connect-timeout-ms must be at least 1");
    }
    let allow = if args.allow_any_prefill {
        Allow::Any
    } else if args.allow_prefill.is_empty() {
        anyhow::bail!(
            "say which prefill endpoints this sidecar may hand off to: --allow-prefill IP[:PORT] (repeatable), \
             or --allow-any-prefill if only the gateway can reach it"
        );
    } else {
        Allow::Listed(
            Subset::parse(args.allow_prefill.iter().map(String::as_str))
                .map_err(|e| anyhow::anyhow!("--allow-prefill: {e}"))?,
        )
    };
    let reports = match &args.report_to {
        None => None,
        Some(url) => {
            // Keepalives find a kvgate that vanished without closing the connection.
            let endpoint = Channel::from_shared(url.clone())
                .map_err(|e| anyhow::anyhow!("--report-to `{url}`: {e}"))?
                .connect_timeout(Duration::from_millis(args.connect_timeout_ms))
                .tcp_keepalive(Some(Duration::from_secs(10)))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            if endpoint.uri().scheme_str() != Some("http") {
                anyhow::bail!("--report-to `{url}`: give kvgate's gRPC address as http://HOST:PORT");
            }
            Some(PickerClient::new(endpoint.connect_lazy()))
        }
    };
    let tasks = Tasks::new();
    let report_token = match &args.report_token_file {
        None => None,
        Some(path) => Some(TokenFile::follow(path, &tasks).map_err(|e| anyhow::anyhow!("--report-token-file: {e:#}"))?),
    };
    let state = Arc::new(Sidecar {
        reports,
        report_token,
        reports_paused_until: std::sync::atomic::AtomicU64::new(0),
        client: upstream_client(args.connect_timeout_ms),
        allow,
        counters: Counters::new(),
        budget: BodyBudget::new(args.max_buffered_bytes),
        args,
    });
    let listener = tokio::net::TcpListener::bind(state.args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the sidecar listener {}: {e}", state.args.listen))?;
    let addr = listener.local_addr()?;
    let mut listeners = Vec::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let app = Router::new().fallback(handle).with_state(state.clone());
    listeners.push(serve_http(&tasks, listener, app, "sidecar", stopped.clone(), ConnLimits::default()));
    let mut admin_addr = None;
    if let Some(a) = state.args.admin_addr {
        let l = tokio::net::TcpListener::bind(a)
            .await
            .map_err(|e| anyhow::anyhow!("binding the admin listener {a}: {e}"))?;
        admin_addr = Some(l.local_addr()?);
        let st = state.clone();
        let admin = Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let st = st.clone();
                    async move {
                        let mut buf = Vec::new();
                        let _ = TextEncoder::new().encode(&st.counters.registry.gather(), &mut buf);
                        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf)
                    }
                }),
            )
            .fallback(no_route)
            .method_not_allowed_fallback(wrong_method);
        listeners.push(serve_http(&tasks, l, admin, "sidecar admin", stopped.clone(), ConnLimits::default()));
    }
    Ok(Running { addr, admin_addr, stop, listeners, tasks })
}

/// `kvgate sidecar`: runs until Ctrl-C or SIGTERM.
pub async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    let decode = args.decode;
    let running = start(args).await?;
    tracing::info!(listen = %running.addr, %decode, admin = ?running.admin_addr, "P/D sidecar ready");
    shutdown_signal().await;
    tracing::info!("shutting down: finishing requests in flight");
    running.shutdown(Duration::from_secs(30)).await;
    Ok(())
}

/// The prefill endpoint a request names (and the rank to pin on it), if it may be used.
fn prefiller(
    st: &Sidecar,
    value: &HeaderValue,
    rank: Option<&HeaderValue>,
) -> Result<(SocketAddr, Option<u32>), Fallback> {
    let text = value.to_str().map_err(|_| Fallback::NotAllowed("not ASCII".into()))?.trim();
    let addr: SocketAddr = text.parse().map_err(|_| Fallback::NotAllowed(format!("`{text}` is not ip:port")))?;
    let rank = match rank {
        None => None,
        Some(r) => Some(
            r.to_str()
                .ok()
                .and_then(|r| r.trim().parse::<u32>().ok())
                .ok_or_else(|| Fallback::NotAllowed(format!("{PREFILLER_RANK_HEADER} is not a rank")))?,
        ),
    };
    match &st.allow {
        Allow::Any => {}
        Allow::Listed(a) if a.contains(addr) => {}
        Allow::Listed(_) => return Err(Fallback::NotAllowed(format!("{addr} is not in --allow-prefill"))),
    }
    Ok((addr, rank))
}

/// Tells kvgate how the hand-off of decision `id` went (`failed`: why it fell back), waiting at
/// most `--report-timeout-ms`: the report reaches kvgate before the decode leg's answer does.
async fn report(st: &Sidecar, id: String, failed: Option<&Fallback>) {
    use std::sync::atomic::Ordering;
    let Some(client) = &st.reports else { return };
    let now = crate::gateway::pool::now_ms();
    if now < st.reports_paused_until.load(Ordering::Relaxed) {
        st.counters.reports.with_label_values(&["skipped"]).inc();
        return;
    }
    let prefill = pb::PrefillOutcome::from(match failed {
        None => Prefill::Succeeded,
        Some(f) => Prefill::Failed(f.kind()),
    });
    let mut req =
        tonic::Request::new(pb::ReportRequest { decision_id: id, prefill: Some(prefill), ..Default::default() });
    if let Some(v) = st.report_token.as_ref().and_then(TokenFile::bearer) {
        req.metadata_mut().insert("authorization", v);
    }
    let bound = Duration::from_millis(st.args.report_timeout_ms.max(1));
    let sent = tokio::time::timeout(bound, client.clone().report(req)).await;
    let ok = matches!(sent, Ok(Ok(_)));
    match sent {
        Ok(Ok(_)) => {}
        Ok(Err(status)) => tracing::warn!(error = %status.message(), "kvgate did not take the hand-off's report"),
        Err(_) => {
            // Not answering: try again in 5 s rather than wait on every request meanwhile.
            st.reports_paused_until.store(now + 5_000, Ordering::Relaxed);
            tracing::warn!("kvgate did not answer the hand-off's report in time; reports paused for 5 s");
        }
    }
    st.counters.reports.with_label_values(&[if ok { "ok" } else { "failed" }]).inc();
}

/// A body for the local endpoint to serve alone: a client's own `kv_transfer_params` (which
/// would make it pull KV from wherever they say) are removed.
fn local(body: Bytes) -> Bytes {
    pd::without_transfer_params(&body).map_or(body, Bytes::from)
}

async fn handle(State(st): State<Arc<Sidecar>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut held = st.budget.reservation();
    let body = match read_body(body, st.args.max_body_bytes, &mut held).await {
        Ok(b) => b,
        Err(e) => return answer(&Answer::from(&e)),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let mut headers = end_to_end(&parts.headers);
    let named = headers.remove(PREFILLER_HEADER);
    let named_rank = headers.remove(PREFILLER_RANK_HEADER);
    let decision = headers.remove(DECISION_HEADER).and_then(|v| v.to_str().ok().map(str::to_owned));
    let routed_api =
        parts.method == Method::POST && ApiKind::from_path(parts.uri.path()).is_some_and(ApiKind::disaggregates);
    let body = match named {
        Some(v) if routed_api => {
            let leg = prefiller(&st, &v, named_rank.as_ref()).map(|(address, header_rank)| PrefillLeg {
                address,
                header_rank,
                path: &path,
                headers: &headers,
                timeout: Duration::from_millis(st.args.prefill_timeout_ms),
            });
            let decode = match leg {
                Ok(leg) => handoff::handoff(&st.client, leg, &body).await,
                Err(f) => Err(f),
            };
            if let Some(id) = decision {
                report(&st, id, decode.as_ref().err()).await;
            }
            match decode {
                Ok(b) => {
                    st.counters.requests.with_label_values(&["prefill-decode"]).inc();
                    Bytes::from(b)
                }
                Err(f) => {
                    tracing::warn!(reason = %f, "prefill hand-off failed; the local endpoint prefills");
                    st.counters.requests.with_label_values(&["fallback"]).inc();
                    st.counters.fallbacks.with_label_values(&[f.kind().reason()]).inc();
                    local(body)
                }
            }
        }
        _ => {
            if routed_api {
                st.counters.requests.with_label_values(&["decode-only"]).inc();
            }
            local(body)
        }
    };
    ensure_request_id(&mut headers);
    // A rank pin the picker set for the decode endpoint stays in `headers`.
    let decode = st.args.decode;
    let Ok(up) = upstream_request(parts.method, decode, &path, headers, None, body) else {
        return json_error(500, "could not build the upstream request", "internal_error");
    };
    let first_byte = Duration::from_millis(st.args.first_byte_timeout_ms);
    match tokio::time::timeout(first_byte, st.client.request(up)).await {
        Ok(Ok(resp)) => relay(resp, None, None, st.args.idle_timeout_ms, None),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, %decode, "decode endpoint unreachable");
            json_error(502, "the decode endpoint could not be reached", "upstream_unreachable")
        }
        Err(_) => json_error(504, "the decode endpoint did not answer in time", "upstream_timeout"),
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar(allow: Allow) -> Sidecar {
        let args =
            crate::tools::cli::parse_flags::<SidecarArgs, _, _>("sidecar", ["--decode", "127.0.0.1:1"]).expect("flags");
        let budget = BodyBudget::new(args.max_buffered_bytes);
        Sidecar {
            allow,
            client: upstream_client(100),
            counters: Counters::new(),
            budget,
            args,
            reports: None,
            report_token: None,
            reports_paused_until: std::sync::atomic::AtomicU64::new(0),
        }
    }

    #[test]
    fn prefiller_header_values() {
        let open = sidecar(Allow::Any);
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(prefiller(&open, &v("10.0.0.1:8000"), None), Ok(("10.0.0.1:8000".parse().expect("addr"), None)));
        assert_eq!(
            prefiller(&open, &v("[fd00::1]:8000"), Some(&v("3"))),
            Ok(("[fd00::1]:8000".parse().expect("addr"), Some(3)))
        );
        assert!(matches!(prefiller(&open, &v("prefill-0:8000"), None), Err(Fallback::NotAllowed(_))));
        assert!(matches!(prefiller(&open, &v("10.0.0.1:8000"), Some(&v("x"))), Err(Fallback::NotAllowed(_))));
        let listed = sidecar(Allow::Listed(Subset::parse(["10.0.0.1"]).expect("allow")));
        assert!(prefiller(&listed, &v("10.0.0.1:9000"), None).is_ok());
        assert!(matches!(prefiller(&listed, &v("10.0.0.2:8000"), None), Err(Fallback::NotAllowed(_))));
    }
}
