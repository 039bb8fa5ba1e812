//! A request body that must keep arriving, or it ends in a [`SlowBody`] error (a 408): each
//! piece within the stall timeout, at the least rate over every stretch of its time, and all of
//! it within an overall deadline. A client that sends a byte now and then, stops half-way,
//! announces a chunk it never sends, or sends most of a body fast and then trickles the rest
//! cannot hold a request (and its buffered bytes) open.
//!
//! The rate rule is a bucket of credit: it holds `min_rate × window` bytes when the body starts
//! (the window is the body's grace), drains at `min_rate` bytes a second, takes back one byte
//! per byte received, and never holds more than it started with. The body is cut when it runs
//! dry. Said otherwise: every stretch of `T` of a body's time brings at least
//! `min_rate × (T − window)` bytes — whatever came before, so bytes sent fast early buy no more
//! than one window of silence later.
//!
//! [`Pacer`] is the rule itself, on times it is given (the ext_proc stream runs it on its body
//! messages); [`Paced`] holds a hyper body to it.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::gateway::config::ConnectionsConfig;

/// How a request body must keep arriving.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// Longest wait for the body's next bytes.
    pub(crate) stall: Duration,
    /// Least rate, bytes per second, over every stretch of the body's time (0: none).
    pub(crate) min_rate: u64,
    /// How far behind `min_rate` the body may fall, as time; also its grace.
    pub(crate) window: Duration,
    /// Longest time the whole body may take.
    pub(crate) deadline: Duration,
}

impl Pace {
    /// The pace the `connections` section sets.
    pub(crate) fn of(c: &ConnectionsConfig) -> Self {
        Self {
            stall: Duration::from_millis(c.body_read_timeout_ms),
            min_rate: c.min_body_bytes_per_s,
            window: Duration::from_millis(c.body_rate_window_ms),
            deadline: Duration::from_millis(c.body_timeout_ms),
        }
    }
}

impl Default for Pace {
    fn default() -> Self {
        Self::of(&ConnectionsConfig::default())
    }
}

/// Why a body was cut off.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SlowBody {
    /// No bytes for the stall timeout.
    #[error("the request body stalled: no bytes for {0:?}")]
    Stalled(Duration),
    /// Too few bytes for the time taken.
    #[error(
        "the request body arrived too slowly: {received} bytes in {elapsed:?}, more than {window:?} behind {min_rate} bytes/s"
    )]
    TooSlow {
        /// Bytes received.
        received: u64,
        /// Since the body started.
        elapsed: Duration,
        /// The least rate.
        min_rate: u64,
        /// How far behind it the body may fall.
        window: Duration,
    },
    /// The body was still arriving at the overall deadline.
    #[error("the request body took too long: still arriving after {0:?}")]
    Overdue(Duration),
}

/// A day stands in for "never" where a time would overflow the clock.
const NEVER: Duration = Duration::from_secs(86_400);

/// The pace rule run on one body: told of its bytes as they come, it says when the next are
/// due and, once they are late, why the body is cut.
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    pace: Pace,
    started: Instant,
    /// When bytes last came (or the body started).
    last: Instant,
    /// The rate rule's credit at `last`, in bytes.
    credit: f64,
    received: u64,
}

impl Pacer {
    /// A body starting at `now`.
    pub(crate) fn new(pace: Pace, now: Instant) -> Self {
        Self { pace, started: now, last: now, credit: Self::full(pace), received: 0 }
    }

    /// The most credit the body may have: a window's worth of the least rate.
    fn full(pace: Pace) -> f64 {
        pace.min_rate as f64 * pace.window.as_secs_f64()
    }

    fn after(&self, from: Instant, by: Duration) -> Instant {
        from.checked_add(by).unwrap_or(self.last + NEVER)
    }

    /// When the body must have sent more bytes (or ended): the stall timeout, the moment its
    /// credit runs dry, and its deadline, whichever comes first.
    pub(crate) fn due(&self) -> Instant {
        let mut due = self.after(self.last, self.pace.stall).min(self.after(self.started, self.pace.deadline));
        if self.pace.min_rate > 0 {
            let dry = Duration::try_from_secs_f64(self.credit / self.pace.min_rate as f64).unwrap_or(NEVER);
            due = due.min(self.after(self.last, dry));
        }
        due
    }

    /// `n` more bytes came at `now`; an error if they came after the body was due.
    pub(crate) fn received(&mut self, n: usize, now: Instant) -> Result<(), SlowBody> {
        if now > self.due() {
            return Err(self.verdict(now));
        }
        // Empty pieces (an empty HTTP/2 DATA frame, an empty body message) are no progress.
        if n == 0 {
            return Ok(());
        }
        let spent = self.pace.min_rate as f64 * now.saturating_duration_since(self.last).as_secs_f64();
        self.credit = (self.credit - spent + n as f64).min(Self::full(self.pace));
        self.received += n as u64;
        self.last = now;
        Ok(())
    }

    /// Why the body is cut at `now`, at or after [`due`](Self::due) with nothing more sent.
    pub(crate) fn verdict(&self, now: Instant) -> SlowBody {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed >= self.pace.deadline {
            SlowBody::Overdue(self.pace.deadline)
        } else if now.saturating_duration_since(self.last) >= self.pace.stall {
            SlowBody::Stalled(self.pace.stall)
        } else {
            let (received, min_rate, window) = (self.received, self.pace.min_rate, self.pace.window);
            SlowBody::TooSlow { received, elapsed, min_rate, window }
        }
    }
}

/// `inner`, held to `pace` from when it is first read.
pub(crate) struct Paced<B> {
    inner: B,
    pace: Pace,
    /// Started at the first read: time a handler takes before it reads is not the client's.
    pacer: Option<Pacer>,
    timer: Pin<Box<Sleep>>,
    done: bool,
}

impl<B> Paced<B> {
    pub(crate) fn new(inner: B, pace: Pace) -> Self {
        Self { inner, pace, pacer: None, timer: Box::pin(tokio::time::sleep(Duration::ZERO)), done: false }
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
        let pace = me.pace;
        let pacer = me.pacer.get_or_insert_with(|| Pacer::new(pace, Instant::now()));
        if let Poll::Ready(frame) = Pin::new(&mut me.inner).poll_frame(cx) {
            match &frame {
                Some(Ok(f)) => {
                    let n = f.data_ref().map_or(0, Bytes::len);
                    if let Err(slow) = pacer.received(n, Instant::now()) {
                        me.done = true;
                        return Poll::Ready(Some(Err(Box::new(slow))));
                    }
                }
                _ => me.done = true,
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        // Nothing yet: wake when the next bytes are due, and cut the body then.
        let due = pacer.due();
        if me.timer.deadline() != due {
            me.timer.as_mut().reset(due);
        }
        ready!(me.timer.as_mut().poll(cx));
        me.done = true;
        Poll::Ready(Some(Err(Box::new(pacer.verdict(Instant::now().max(due))))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
