//! A request body that must keep arriving: each piece within the stall timeout, and — after a
//! grace period — at a minimum average rate, or the body ends in a [`SlowBody`] error. A client
//! that sends a byte now and then, stops half-way, or announces a chunk it never sends cannot
//! hold a request (and its buffered bytes) open.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Time a body may take before its average rate is held to the minimum.
pub(crate) const GRACE: Duration = Duration::from_secs(5);

/// How a request body must keep arriving.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// Longest wait for the body's next bytes.
    pub(crate) stall: Duration,
    /// Least average rate, bytes per second, once the body has taken [`GRACE`] (0: none).
    pub(crate) min_rate: u64,
}

/// Why a body was cut off.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SlowBody {
    /// No bytes for the stall timeout.
    #[error("the request body stalled: no bytes for {0:?}")]
    Stalled(Duration),
    /// Too few bytes for the time taken.
    #[error("the request body arrived too slowly: {received} bytes in {elapsed:?}, under {min_rate} bytes/s")]
    TooSlow {
        /// Bytes received.
        received: u64,
        /// Since the body started.
        elapsed: Duration,
        /// The least rate.
        min_rate: u64,
    },
}

/// `inner`, held to `pace`.
pub(crate) struct Paced<B> {
    inner: B,
    pace: Pace,
    started: Instant,
    received: u64,
    deadline: Pin<Box<Sleep>>,
    done: bool,
}

impl<B> Paced<B> {
    pub(crate) fn new(inner: B, pace: Pace) -> Self {
        let started = Instant::now();
        let mut me = Self {
            inner,
            pace,
            started,
            received: 0,
            deadline: Box::pin(tokio::time::sleep(Duration::ZERO)),
            done: false,
        };
        me.rearm(started);
        me
    }

    /// The next bytes are due by the stall timeout, and by the time the rate would fall under
    /// the minimum.
    fn rearm(&mut self, now: Instant) {
        // A day stands in for "never" when a bound would overflow the clock.
        let later = |from: Instant, by: Duration| from.checked_add(by).unwrap_or(now + Duration::from_secs(86_400));
        let mut due = later(now, self.pace.stall);
        if self.pace.min_rate > 0 {
            let earned =
                Duration::try_from_secs_f64(self.received as f64 / self.pace.min_rate as f64).unwrap_or(Duration::MAX);
            due = due.min(later(self.started, GRACE.max(earned)));
        }
        self.deadline.as_mut().reset(due.max(now));
    }

    fn verdict(&self, now: Instant) -> SlowBody {
        let elapsed = now - self.started;
        if self.pace.min_rate > 0
            && elapsed >= GRACE
            // Slightly under the rate: the deadline fell when the body had earned just this much.
            && (self.received as f64) < self.pace.min_rate as f64 * elapsed.as_secs_f64() * 0.999
        {
            SlowBody::TooSlow { received: self.received, elapsed, min_rate: self.pace.min_rate }
        } else {
            SlowBody::Stalled(self.pace.stall)
        }
    }
}

impl<B> Body for Paced<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let me = &mut *self;
        if me.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut me.inner).poll_frame(cx) {
            match &frame {
                Some(Ok(f)) => {
                    me.received += f.data_ref().map_or(0, |d| d.len() as u64);
                    me.rearm(Instant::now());
                }
                _ => me.done = true,
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        ready!(me.deadline.as_mut().poll(cx));
        me.done = true;
        Poll::Ready(Some(Err(Box::new(me.verdict(Instant::now())))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;
    use crate::gateway::tasks::Tasks;

    type Chunk = Result<Frame<Bytes>, std::io::Error>;
    type Fed = Paced<StreamBody<tokio_stream::wrappers::ReceiverStream<Chunk>>>;

    /// A paced body, and what feeds it.
    fn body(pace: Pace) -> (tokio::sync::mpsc::Sender<Chunk>, Fed) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        (tx, Paced::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)), pace))
    }

    fn slow(e: Box<dyn std::error::Error + Send + Sync>) -> SlowBody {
        *e.downcast::<SlowBody>().expect("a SlowBody")
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_ends_at_the_stall_timeout() {
        let (tx, mut b) = body(Pace { stall: Duration::from_secs(2), min_rate: 0 });
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc")))).await.expect("send");
        assert_eq!(b.frame().await.expect("a frame").expect("data").into_data().expect("data"), "abc");
        let t = Instant::now();
        let e = b.frame().await.expect("an error frame").expect_err("an error");
        assert!(matches!(slow(e), SlowBody::Stalled(_)));
        assert_eq!(t.elapsed(), Duration::from_secs(2));
        assert!(b.frame().await.is_none(), "nothing after the error");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_cut_once_under_the_rate_after_the_grace() {
        let (tx, mut b) = body(Pace { stall: Duration::from_secs(30), min_rate: 100 });
        // 50 bytes a second: under 100/s, cut at the end of the grace period.
        let feeder = Tasks::new().spawn("feeder", async move {
            for _ in 0..20 {
                if tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 50])))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let t = Instant::now();
        let mut got = 0;
        let e = loop {
            match b.frame().await.expect("a frame") {
                Ok(f) => got += f.into_data().expect("data").len(),
                Err(e) => break e,
            }
        };
        assert!(matches!(slow(e), SlowBody::TooSlow { .. }));
        assert_eq!(t.elapsed(), GRACE);
        assert_eq!(got, 250);
        drop(feeder);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_rate_is_read_whole() {
        let (tx, b) = body(Pace { stall: Duration::from_secs(30), min_rate: 100 });
        let _feeder = Tasks::new().spawn("feeder", async move {
            for _ in 0..10 {
                let _ = tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 150])))).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let all = b.collect().await.expect("the whole body").to_bytes();
        assert_eq!(all.len(), 1500);
    }
}
