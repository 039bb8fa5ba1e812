//! What a listener knows of each open connection: its requests in flight and since when it has
//! had none. A request counts from its headers until its response body ends (or is dropped), so
//! a long stream — a gRPC server stream, an ext_proc exchange waiting for a prefill, a streamed
//! chat answer — keeps its connection busy however quiet it is. An idle connection is closed
//! once it has been idle for the header timeout ([`Conn::idle_for`]), and at the connection cap
//! the oldest idle one makes room for a newcomer ([`oldest_idle`]).
//!
//! Per request this is two atomic updates and a reference count; no lock, no allocation.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// One open connection, shared by its task, its requests and the accept loop.
#[derive(Debug)]
pub(super) struct Conn {
    /// The listener's clock origin: `idle_since_ns` counts from it.
    epoch: Instant,
    /// Requests whose response has not ended.
    in_flight: AtomicU32,
    /// When the last request ended (or the connection was accepted), in ns since `epoch`: fine
    /// enough to tell apart connections a client opens one after another.
    idle_since_ns: AtomicU64,
    /// Woken when the last request in flight ends.
    idle: Notify,
    /// Woken when the accept loop sheds this connection.
    shed: Notify,
    /// Set once the accept loop has chosen it, so it is never chosen twice.
    shedding: AtomicBool,
}

impl Conn {
    /// A connection accepted now: idle since now.
    pub(super) fn new(epoch: Instant) -> Arc<Self> {
        let me = Self {
            epoch,
            in_flight: AtomicU32::new(0),
            idle_since_ns: AtomicU64::new(0),
            idle: Notify::new(),
            shed: Notify::new(),
            shedding: AtomicBool::new(false),
        };
        me.idle_since_ns.store(me.now_ns(), Ordering::Relaxed);
        Arc::new(me)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// When it went idle, if it is (no request in flight).
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.epoch + Duration::from_nanos(self.idle_since_ns.load(Ordering::Acquire)))
    }

    /// A request starts: the connection is busy until the returned guard drops.
    pub(super) fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `limit` on end.
    pub(super) async fn idle_for(&self, limit: Duration) {
        loop {
            let Some(since) = self.idle_since() else {
                self.idle.notified().await;
                continue;
            };
            let due = since.checked_add(limit).unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
            if Instant::now() >= due {
                return;
            }
            // A request may start and end meanwhile: look again when the time is up or when
            // the connection goes idle again.
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = self.idle.notified() => {}
            }
        }
    }

    /// Resolves once no request is in flight.
    pub(super) async fn until_idle(&self) {
        while self.idle_since().is_none() {
            self.idle.notified().await;
        }
    }

    /// Resolves when the accept loop sheds the connection.
    pub(super) async fn shed(&self) {
        self.shed.notified().await;
    }
}

/// A request in flight on its connection; dropping it ends the request.
#[derive(Debug)]
pub(super) struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        let conn = &self.0;
        // The time first: whoever sees no request in flight reads a current one.
        conn.idle_since_ns.store(conn.now_ns(), Ordering::Release);
        if conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            conn.idle.notify_one();
        }
    }
}

/// Among `conns`, the one idle the longest (no request in flight, not already being shed);
/// marks it as being shed.
pub(super) fn oldest_idle<'a, K: Copy + 'a>(conns: impl Iterator<Item = (&'a K, &'a Arc<Conn>)>) -> Option<K> {
    let (key, conn) = conns
        .filter(|(_, c)| !c.shedding.load(Ordering::Relaxed))
        .filter_map(|(k, c)| Some((k, c, c.idle_since()?)))
        .min_by_key(|(_, _, since)| *since)
        .map(|(k, c, _)| (*k, c))?;
    conn.shedding.store(true, Ordering::Relaxed);
    conn.shed.notify_one();
    Some(key)
}

/// A response body that keeps its request in flight until it ends or is dropped.
#[derive(Debug)]
pub(super) struct Tracked<B> {
    inner: B,
    busy: Option<Busy>,
}

impl<B> Tracked<B> {
    pub(super) fn new(inner: B, busy: Busy) -> Self {
        Self { inner, busy: Some(busy) }
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_requests_in_flight() {
        let conn = Conn::new(Instant::now());
        let t0 = Instant::now();
        // Idle since it was accepted.
        conn.idle_for(Duration::from_secs(2)).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
        // A request in flight for 10 s keeps it busy; the clock starts again when it ends.
        let busy = conn.busy();
        let conn2 = conn.clone();
        let waiter = tokio::time::timeout(Duration::from_secs(60), async move {
            let t = Instant::now();
            conn2.idle_for(Duration::from_secs(2)).await;
            t.elapsed()
        });
        let ender = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(busy);
        };
        let (waited, ()) = tokio::join!(waiter, ender);
        assert_eq!(waited.expect("idle in time"), Duration::from_secs(12));
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_idle_connection_is_shed_once() {
        let epoch = Instant::now();
        let old = Conn::new(epoch);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let newer = Conn::new(epoch);
        let busy_old = Conn::new(epoch);
        let _busy = busy_old.busy();
        let conns = [(1, busy_old), (2, newer), (3, old)];
        let iter = || conns.iter().map(|(k, c)| (k, c));
        assert_eq!(oldest_idle(iter()), Some(3), "the busy one is never shed");
        assert_eq!(oldest_idle(iter()), Some(2), "nor one already being shed");
        assert_eq!(oldest_idle(iter()), None);
        // The one shed was told.
        tokio::time::timeout(Duration::from_secs(1), conns[2].1.shed()).await.expect("told");
    }
}
