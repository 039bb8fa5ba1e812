//! Listeners the front-ends are served on — proxy, admin, gRPC (ext_proc, the picker API,
//! health, reflection), the sidecar and the simulator — with one accept loop and one set of
//! connection bounds: a connection that sends no complete request within the header timeout is
//! closed whatever it sent (nothing, an HTTP/2 preface, half a request, half a TLS handshake),
//! and so is one idle that long between requests; HTTP/2 peers are pinged; at the connection
//! cap the oldest idle connection makes room for a newcomer. Also: OpenAI-shaped answers to
//! requests that are not HTTP, TLS with client certificates for gRPC, graceful shutdown, the
//! drain that lets requests in flight finish, and the signal that starts a shutdown.

mod conn;
mod paced;
mod shaped;
mod tls;

pub(crate) use paced::{Pace, Pacer, SlowBody};
pub(crate) use tls::{ClientCert, ClientCertCheck, Tls};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::gateway::budget::Client;
use crate::gateway::tasks::{Task, Tasks};
use conn::{Conn, Tracked};

/// Resolves when `stop` turns true.
pub(crate) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A response extension asking the listener to close the connection without sending the
/// response — what a client sees when a server closes a kept-alive connection as its request
/// arrives. (On HTTP/2 only the stream is reset; the simulator, which uses it, speaks HTTP/1.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropConnection;

/// Bounds on one listener's connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    /// Time a connection may go without a request in flight — from its accept (TLS handshake
    /// included) to its first request's headers, and from the end of each response to the next
    /// request's headers — before it is closed. Also the HTTP/2 ping interval, and the time a
    /// ping's answer may take.
    pub(crate) header_read_timeout: Duration,
    /// Connections open at once; past it the oldest idle one is closed to make room, or the
    /// newcomer when none is idle.
    pub(crate) max_connections: usize,
    /// How each request body must keep arriving (HTTP listeners; a gRPC stream's messages
    /// come when its peer has them).
    pub(crate) pace: Pace,
    /// Connections one client address (an IPv4 address, an IPv6 /64) may hold at once; at it,
    /// the client's own oldest idle connection makes room, or its newcomer is closed — so one
    /// client holding busy connections (streams that never end) leaves the rest to others.
    pub(crate) max_per_client: usize,
}

impl ConnLimits {
    /// The per-client bound for `percent` of `max_connections` (at least one connection).
    pub(crate) fn per_client(max_connections: usize, percent: u32) -> usize {
        (max_connections.saturating_mul(percent as usize) / 100).max(1)
    }
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            pace: Pace::default(),
            max_per_client: 2048,
        }
    }
}

/// Streams a peer may open at once on one HTTP/2 connection of an HTTP listener (hyper's
/// default).
const HTTP_MAX_STREAMS: u32 = 200;
/// On a gRPC listener: every request Envoy sends through ext_proc is one stream, held for the
/// request's whole life, and Envoy opens another connection only past this.
const GRPC_MAX_STREAMS: u32 = 1024;
/// Streams a peer may open and reset before the server accepts them (the "rapid reset" flood);
/// past it the connection is closed with ENHANCE_YOUR_CALM.
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the server may reset for a peer's protocol errors ("made you reset") before it
/// closes the connection.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Largest header list an HTTP/2 peer may send (decoded), as advertised in SETTINGS.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// How long a connection closed for idling (or at shutdown, once idle) gets to take its
/// GOAWAY and close on its own before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The same for a connection shed at the cap: the newcomer already has its slot.
const SHED_GRACE: Duration = Duration::from_millis(100);

/// The connection settings of every listener.
///
/// SETTINGS and PING floods: h2 answers each SETTINGS and PING before it reads another frame
/// and holds at most one answer of each, so a peer that floods them without reading the answers
/// stops being read (nothing grows), and one that reads them gets nothing else. Control frames
/// never count as requests: a flooding connection is closed at the header timeout like any idle
/// one. Pings go out after `header_read_timeout` without frames from the peer; one that does not
/// answer within as long is dropped, so a dead peer cannot hold a stream open for ever.
fn builder(limits: &ConnLimits, grpc: bool) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    if grpc {
        b = b.http2_only();
    }
    b.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout)
        .max_concurrent_streams(if grpc { GRPC_MAX_STREAMS } else { HTTP_MAX_STREAMS })
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    b
}

/// What a listener speaks.
#[derive(Debug, Clone)]
enum Wire {
    /// HTTP/1.1 and HTTP/2 (prior knowledge), told apart by their first bytes; request bodies
    /// paced; hyper's own error answers OpenAI-shaped.
    Http,
    /// gRPC: HTTP/2 only, over TLS when given.
    Grpc(Option<Tls>),
}

/// Serves `app` on `listener` until `stop`, then lets open connections finish: a task of
/// `owner` named `what`. Every connection's task belongs to the returned one: aborting it ends
/// them all.
pub(crate) fn serve_http(
    owner: &Tasks,
    listener: TcpListener,
    app: axum::Router,
    what: &'static str,
    stop: watch::Receiver<bool>,
    limits: ConnLimits,
) -> Task {
    owner.spawn(what, accept_loop(listener, app, what, stop, limits, Wire::Http))
}

/// Serves gRPC `routes` (tonic's `Routes` as an axum router) on `listener`, HTTP/2 only, over
/// `tls` if given, as [`serve_http`] serves HTTP.
pub(crate) fn serve_grpc(
    owner: &Tasks,
    listener: TcpListener,
    routes: axum::Router,
    what: &'static str,
    stop: watch::Receiver<bool>,
    limits: ConnLimits,
    tls: Option<Tls>,
) -> Task {
    owner.spawn(what, accept_loop(listener, routes, what, stop, limits, Wire::Grpc(tls)))
}

/// The one accept loop.
async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    what: &'static str,
    stop: watch::Receiver<bool>,
    limits: ConnLimits,
    wire: Wire,
) {
    let builder = Arc::new(builder(&limits, matches!(wire, Wire::Grpc(_))));
    let local = listener.local_addr().ok();
    let epoch = tokio::time::Instant::now();
    // Open connections by their task, and how many each client holds: kept by this loop alone,
    // no lock.
    let mut open = Open::default();
    let mut connections = JoinSet::new();
    // A flood of refusals is one line per interval, not one each.
    let mut failed_accepts = Repeated::new(LOG_EVERY);
    let (mut refused, mut shed) = (Repeated::new(LOG_EVERY), Repeated::new(LOG_EVERY));
    let stopping = stopped(stop.clone());
    tokio::pin!(stopping);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stopping => break,
            // Reap finished connections as they end, so the set stays the size of the open ones.
            Some(done) = connections.join_next_with_id(), if !connections.is_empty() => {
                open.forget(done);
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to be freed.
                    if let Some(n) = failed_accepts.hit(std::time::Instant::now()) {
                        tracing::warn!(error = %e, times = n, "{what} listener: accept failed ({n} since the last such line)");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while let Some(done) = connections.try_join_next_with_id() {
            open.forget(done);
        }
        let client = Client::of(peer.ip());
        if open.of(client) >= limits.max_per_client {
            // A client at its own bound makes room among its own connections only.
            let max = limits.max_per_client;
            let Some(oldest) = conn::oldest_idle(open.held_by(client)) else {
                if let Some(n) = refused.hit(std::time::Instant::now()) {
                    tracing::warn!(%peer, max, closed = n, "{what} listener: a client at its connection bound, none idle; closed {n} new ones since the last such line");
                }
                continue;
            };
            open.remove(oldest);
            if let Some(n) = shed.hit(std::time::Instant::now()) {
                tracing::warn!(%peer, max, closed = n, "{what} listener: a client at its connection bound; closed its oldest idle one for its new one ({n} since the last such line)");
            }
        } else if open.len() >= limits.max_connections {
            let max = limits.max_connections;
            // Room is made by closing the connection idle the longest; with none idle, the
            // newcomer is closed.
            let Some(oldest) = conn::oldest_idle(open.all()) else {
                if let Some(n) = refused.hit(std::time::Instant::now()) {
                    tracing::warn!(%peer, max, closed = n, "{what} listener: too many connections, none idle; closed {n} new ones since the last such line");
                }
                continue;
            };
            open.remove(oldest);
            if let Some(n) = shed.hit(std::time::Instant::now()) {
                tracing::warn!(
                    max,
                    closed = n,
                    "{what} listener: at the connection cap; closed the oldest idle one for a new one ({n} since the last such line)"
                );
            }
        }
        let _ = tcp.set_nodelay(true);
        let conn = Conn::new(epoch);
        let requests = Requests { app: app.clone(), peer, local, client_cert: false, pace: None, conn: conn.clone() };
        let task = connection(tcp, requests, builder.clone(), wire.clone(), limits, stop.clone());
        let handle = connections.spawn(task);
        open.insert(handle.id(), conn, client);
    }
    drop(listener);
    // Open connections were told to stop too: they finish their requests and close; the
    // caller bounds the wait.
    while connections.join_next().await.is_some() {}
}

/// The open connections of one listener, and how many each client holds.
#[derive(Debug, Default)]
struct Open {
    conns: HashMap<tokio::task::Id, (Arc<Conn>, Client)>,
    per_client: HashMap<Client, usize>,
}

impl Open {
    fn len(&self) -> usize {
        self.conns.len()
    }

    fn of(&self, client: Client) -> usize {
        self.per_client.get(&client).copied().unwrap_or(0)
    }

    fn all(&self) -> impl Iterator<Item = (&tokio::task::Id, &Arc<Conn>)> {
        self.conns.iter().map(|(id, (conn, _))| (id, conn))
    }

    fn held_by(&self, client: Client) -> impl Iterator<Item = (&tokio::task::Id, &Arc<Conn>)> {
        self.conns.iter().filter(move |(_, (_, c))| *c == client).map(|(id, (conn, _))| (id, conn))
    }

    fn insert(&mut self, id: tokio::task::Id, conn: Arc<Conn>, client: Client) {
        self.conns.insert(id, (conn, client));
        *self.per_client.entry(client).or_default() += 1;
    }

    fn remove(&mut self, id: tokio::task::Id) {
        let Some((_, client)) = self.conns.remove(&id) else { return };
        if let Some(n) = self.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&client);
            }
        }
    }

    /// Drops a finished connection.
    fn forget(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => e.id(),
        };
        self.remove(id);
    }
}

/// One connection, from its accept to its close.
async fn connection(
    tcp: TcpStream,
    mut requests: Requests,
    builder: Arc<auto::Builder<TokioExecutor>>,
    wire: Wire,
    limits: ConnLimits,
    stop: watch::Receiver<bool>,
) {
    let conn = requests.conn.clone();
    match wire {
        Wire::Http => {
            requests.pace = Some(limits.pace);
            serve_connection(&builder, shaped::ShapedErrors::new(tcp), requests, &conn, limits, stop).await;
        }
        Wire::Grpc(None) => serve_connection(&builder, tcp, requests, &conn, limits, stop).await,
        Wire::Grpc(Some(tls)) => {
            // The handshake counts towards the time to the first request.
            let tls = tokio::select! {
                done = tls.acceptor.accept(tcp) => match done {
                    Ok(tls) => tls,
                    Err(e) => {
                        tracing::debug!(peer = %requests.peer, error = %e, "TLS handshake failed");
                        return;
                    }
                },
                () = conn.idle_for(limits.header_read_timeout) => return,
                () = conn.shed() => return,
                () = stopped(stop.clone()) => return,
            };
            requests.client_cert = tls::verified_client(&tls);
            serve_connection(&builder, tls, requests, &conn, limits, stop).await;
        }
    }
}

/// Why a connection is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    Idle,
    Shed,
    Stop,
}

/// Serves HTTP on `io` until the peer closes it, it idles past the header timeout, the accept
/// loop sheds it, or the listener stops; then closes it gracefully — an HTTP/2 peer gets a
/// GOAWAY, requests in flight finish — and drops it if it is not closed a grace period after
/// its last request.
async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    requests: Requests,
    conn: &Conn,
    limits: ConnLimits,
    stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| requests.call(req));
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    let why = tokio::select! {
        _ = served.as_mut() => return,
        () = conn.idle_for(limits.header_read_timeout) => Closing::Idle,
        () = conn.shed() => Closing::Shed,
        () = stopped(stop) => Closing::Stop,
    };
    served.as_mut().graceful_shutdown();
    let grace = if why == Closing::Shed { SHED_GRACE } else { CLOSE_GRACE };
    let deadline = async {
        conn.until_idle().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        _ = served => {}
        () = deadline => {}
    }
}

/// What every request of one connection gets: the app, and what the connection knows.
#[derive(Debug, Clone)]
struct Requests {
    app: axum::Router,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    /// The peer presented a client certificate the listener verified.
    client_cert: bool,
    /// How request bodies must arrive (HTTP listeners).
    pace: Option<Pace>,
    conn: Arc<Conn>,
}

/// A response, its request in flight until its body ends.
type Answer = hyper::Response<Tracked<axum::body::Body>>;

impl Requests {
    /// One request: in flight on its connection from now until its response body ends.
    fn call(
        &self,
        mut req: hyper::Request<hyper::body::Incoming>,
    ) -> impl Future<Output = Result<Answer, std::io::Error>> + Send + use<> {
        let busy = self.conn.busy();
        let ext = req.extensions_mut();
        // The client's address, as axum's `ConnectInfo` (the proxy names it in
        // `X-Forwarded-For`) and as tonic's (`Request::remote_addr`).
        ext.insert(ConnectInfo(self.peer));
        ext.insert(tonic::transport::server::TcpConnectInfo { local_addr: self.local, remote_addr: Some(self.peer) });
        if self.client_cert {
            ext.insert(ClientCert);
        }
        let req = match self.pace {
            Some(pace) => req.map(|body| axum::body::Body::new(paced::Paced::new(body, pace))),
            None => req.map(axum::body::Body::new),
        };
        let answer = self.app.clone().oneshot(req);
        async move {
            let Ok(resp) = answer.await;
            if resp.extensions().get::<DropConnection>().is_some() {
                return Err(std::io::Error::other("the handler dropped the connection"));
            }
            Ok(resp.map(|body| Tracked::new(body, busy)))
        }
    }
}

/// Waits up to `grace` for stopping listeners to finish their connections, then aborts them
/// (dropping their handles).
pub(crate) async fn drain(listeners: Vec<Task>, grace: Duration) {
    if tokio::time::timeout(grace, futures_util::future::join_all(listeners)).await.is_err() {
        tracing::warn!(?grace, "requests still in flight after the grace period; stopping anyway");
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
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

/// How often a repeated listener warning is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A warning that may repeat fast: logged once per interval, with how many times it happened
/// since the last line.
#[derive(Debug)]
struct Repeated {
    interval: Duration,
    last: Option<std::time::Instant>,
    count: u64,
}

impl Repeated {
    fn new(interval: Duration) -> Self {
        Self { interval, last: None, count: 0 }
    }

    /// Counts one occurrence at `now`; returns the count to log when a line is due (the first
    /// occurrence logs at once).
    fn hit(&mut self, now: std::time::Instant) -> Option<u64> {
        self.count += 1;
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.interval => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.count))
            }
        }
    }
}

#[cfg(test)]
mod repeated_tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_one_line_per_interval_with_its_count() {
        let mut r = Repeated::new(Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        assert_eq!(r.hit(t0), Some(1), "the first logs at once");
        let lines: Vec<_> = (1..1_000).filter_map(|i| r.hit(t0 + Duration::from_millis(i))).collect();
        assert!(lines.is_empty(), "none within the interval");
        assert_eq!(r.hit(t0 + Duration::from_secs(10)), Some(1_000), "the next line counts them all");
        assert_eq!(r.hit(t0 + Duration::from_secs(11)), None);
    }
}
