//! Listeners the front-ends are served on: HTTP with graceful shutdown, accepted connections
//! with TCP_NODELAY for gRPC, the drain that lets requests in flight finish, and the signal that
//! starts a shutdown.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

/// Resolves when `stop` turns true.
pub(crate) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves `app` on `listener` until `stop`, then lets open connections finish.
pub(crate) fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    what: &'static str,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        // Connect info: the proxy names the client in `X-Forwarded-For`.
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped(stop)).await {
            tracing::error!(error = %e, "{what} listener stopped");
        }
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

/// Waits up to `grace` for stopping listeners to finish their connections, then aborts them.
pub(crate) async fn drain(listeners: Vec<JoinHandle<()>>, grace: Duration) {
    let aborts: Vec<_> = listeners.iter().map(|h| h.abort_handle()).collect();
    if tokio::time::timeout(grace, futures_util::future::join_all(listeners)).await.is_err() {
        tracing::warn!(?grace, "requests still in flight after the grace period; stopping anyway");
        for a in aborts {
            a.abort();
        }
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
