//! Listeners the front-ends are served on: HTTP with bounded connections (a header-read and
//! idle timeout, a paced body, a connection cap), OpenAI-shaped answers to requests that are not
//! HTTP, and graceful shutdown; accepted connections with TCP_NODELAY for gRPC; the drain that
//! lets requests in flight finish, and the signal that starts a shutdown.

mod paced;
mod shaped;

pub(crate) use paced::{Pace, Pacer, SlowBody};

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tower::ServiceExt;

use crate::gateway::tasks::{Task, Tasks};

/// Resolves when `stop` turns true.
pub(crate) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A response extension asking the listener to close the connection without sending the
/// response — what a client sees when a server closes a kept-alive connection as its request
/// arrives. (On HTTP/2 only the stream is reset; the simulator, which uses it, speaks HTTP/1.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropConnection;

/// Bounds on one HTTP listener's connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    /// Time a connection may take to send a request's headers — counted from when it is ready
    /// for the next request, so it is also the idle timeout of a kept-alive connection.
    pub(crate) header_read_timeout: Duration,
    /// Connections open at once; past it new ones are closed at accept.
    pub(crate) max_connections: usize,
    /// How each request body must keep arriving.
    pub(crate) pace: Pace,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(30), max_connections: 4096, pace: Pace::default() }
    }
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
    owner.spawn(what, async move {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let mut connections = JoinSet::new();
        // A flood of refusals is one line per interval, not one each.
        let (mut failed_accepts, mut refused) = (Repeated::new(LOG_EVERY), Repeated::new(LOG_EVERY));
        let stopping = stopped(stop);
        tokio::pin!(stopping);
        loop {
            let (tcp, peer) = tokio::select! {
                () = &mut stopping => break,
                // Reap finished connections as they end, so the set stays the size of the open ones.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
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
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(n) = refused.hit(std::time::Instant::now()) {
                    let max = limits.max_connections;
                    tracing::warn!(%peer, max, closed = n, "{what} listener: too many connections; closed {n} new ones since the last such line");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let app = app.clone();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                // The client's address, as axum's `ConnectInfo` (the proxy names it in
                // `X-Forwarded-For`).
                req.extensions_mut().insert(ConnectInfo(peer));
                let req = req.map(|body| axum::body::Body::new(paced::Paced::new(body, limits.pace)));
                let answer = app.clone().oneshot(req);
                async move {
                    let Ok(resp) = answer.await;
                    if resp.extensions().get::<DropConnection>().is_some() {
                        return Err(std::io::Error::other("the handler dropped the connection"));
                    }
                    Ok(resp)
                }
            });
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(shaped::ShapedErrors::new(tcp)), service)
                .into_owned();
            let conn = graceful.watch(conn);
            connections.spawn(async move {
                let _ = conn.await;
                drop(slot);
            });
        }
        drop(listener);
        // Open connections finish their requests and close; the caller bounds the wait.
        graceful.shutdown().await;
        while connections.join_next().await.is_some() {}
    })
}

/// Accepted connections with TCP_NODELAY: gRPC messages are small writes that Nagle's algorithm
/// (with the peer's delayed ACKs) would hold back by up to 40 ms each.
pub(crate) fn nodelay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    })
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
