//! Decisions held for their reports: a caller of kvgate's own picker API sends the request
//! itself and reports what happened by the decision's id, and behind Envoy a P/D sidecar reports
//! the prefill leg of a decision the ext_proc stream holds. [`Decisions`] keeps each by id, applies
//! reports through the one outcome API ([`Routed`]), and releases a decision whose reports stop
//! coming (no first token within `start_timeout_ms` of the pick, nothing for `report_timeout_ms`
//! after the last report), counted in `kvgate_picker_decisions_expired_total`.
//!
//! Ids are `<process nonce>-<sequence>-<tag>` in hex. The tag is the sequence keyed-hashed with a
//! secret of the process, so one id does not give away the others; the sequence tells an id this
//! process issued and has already ended from one it never issued, without keeping every id.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::gateway::config::PickerApiConfig;
use crate::gateway::events::{Event, Prefill};
use crate::gateway::outcome::Routed;
use crate::gateway::telemetry::Telemetry;

/// How many ended ids are remembered with how they ended (older ones are still known to have
/// been issued).
const ENDED_MEMORY: usize = 65_536;

/// The decisions held for reports.
#[derive(Debug)]
pub struct Decisions {
    nonce: u32,
    /// The key of ids' tags (SipHash with a random key per process).
    tags: RandomState,
    next: AtomicU64,
    /// Until the first report.
    start_timeout: Duration,
    /// After each report.
    timeout: Duration,
    max_pending: usize,
    inner: Mutex<Inner>,
    telemetry: Arc<Telemetry>,
}

#[derive(Debug, Default)]
struct Inner {
    held: HashMap<u64, Held>,
    /// Callers' decisions among `held`.
    callers: usize,
    ended: HashMap<u64, Ended>,
    order: VecDeque<u64>,
}

#[derive(Debug)]
enum Held {
    /// A decision its caller reports on entirely (locked on its own: reports for different
    /// decisions do not wait for each other).
    Caller(Arc<Mutex<Caller>>),
    /// A P/D decision an ext_proc stream holds: only its prefill leg is reported here, and handed
    /// on to the stream.
    Stream(Option<oneshot::Sender<Prefill>>),
}

#[derive(Debug)]
struct Caller {
    routed: Routed,
    deadline: Instant,
    /// Its final report was applied (a concurrent one finds it so).
    over: Option<Ended>,
}

/// How a decision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its response finished.
    Finished,
    /// It failed before a response.
    Failed,
    /// No final report came in time.
    Expired,
    /// Its ext_proc stream ended.
    StreamEnded,
    /// Long ago: how is forgotten.
    Earlier,
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Expired => "expired after the report timeout",
            Self::StreamEnded => "settled (its Envoy stream has had the decode answer, or ended)",
            Self::Earlier => "over",
        }
    }
}

/// One report: the events of the request's lifecycle it carries, applied in order (the same
/// vocabulary the proxy and the Envoy picker speak). A [`Event::Finished`] or [`Event::Failed`]
/// ends the decision.
pub type Report = Vec<Event<'static>>;

/// How the decision ends with this report's event, if it does.
fn ending(e: &Event<'_>) -> Option<Ended> {
    match e {
        Event::Finished { .. } => Some(Ended::Finished),
        Event::Failed(_) => Some(Ended::Failed),
        _ => None,
    }
}

/// Why a report was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Not an id this process issued.
    #[error("decision `{0}` is unknown here")]
    Unknown(String),
    /// Issued, and over.
    #[error("decision `{0}` is already {how}", how = .1.as_str())]
    Ended(String, Ended),
    /// A part Envoy's stream reports itself.
    #[error("decision `{0}` is held by an Envoy stream, which reports everything but its prefill leg")]
    NotHere(String),
    /// A value the decision could not have had.
    #[error("decision `{0}`: {1}")]
    Implausible(String, String),
}

/// Too many decisions wait for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} decisions are waiting for their reports, the most this server holds")]
pub struct Full(pub usize);

impl Decisions {
    /// Decisions held as `cfg` says, `cfg.max_pending` at once.
    pub fn new(cfg: &PickerApiConfig, telemetry: Arc<Telemetry>) -> Self {
        Self {
            nonce: fastrand::u32(..),
            tags: RandomState::new(),
            next: AtomicU64::new(1),
            start_timeout: Duration::from_millis(cfg.start_timeout_ms.max(1)),
            timeout: Duration::from_millis(cfg.report_timeout_ms.max(1)),
            max_pending: cfg.max_pending.max(1),
            inner: Mutex::new(Inner::default()),
            telemetry,
        }
    }

    fn id(&self, seq: u64) -> String {
        format!("{:08x}-{seq:x}-{:016x}", self.nonce, self.tags.hash_one(seq))
    }

    fn issue(&self) -> (u64, String) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        (seq, self.id(seq))
    }

    /// The sequence number of an id this process issued (exactly as it was written).
    fn sequence(&self, id: &str) -> Option<u64> {
        let seq = id.split('-').nth(1)?;
        let seq = u64::from_str_radix(seq, 16).ok()?;
        (seq >= 1 && seq < self.next.load(Ordering::Relaxed) && self.id(seq) == id).then_some(seq)
    }

    /// Whether another caller's decision may be held now (checked before deciding, so a pick
    /// that could not be held records nothing).
    pub fn has_room(&self) -> Result<(), Full> {
        let inner = self.inner.lock();
        if inner.callers >= self.max_pending { Err(Full(inner.callers)) } else { Ok(()) }
    }

    /// Holds `routed` until its final report or until its reports stop coming; returns its id.
    pub fn hold(&self, routed: Routed) -> Result<String, Full> {
        let mut inner = self.inner.lock();
        if inner.callers >= self.max_pending {
            return Err(Full(inner.callers));
        }
        let (seq, id) = self.issue();
        let deadline = Instant::now() + self.start_timeout;
        let caller = Caller { routed, deadline, over: None };
        inner.held.insert(seq, Held::Caller(Arc::new(Mutex::new(caller))));
        inner.callers += 1;
        self.telemetry.picker_pending.set(inner.held.len() as i64);
        Ok(id)
    }

    /// An id for a P/D decision an ext_proc stream holds, and where its prefill report arrives.
    /// Dropping the ticket ends it.
    pub fn stream(self: &Arc<Self>) -> StreamTicket {
        let (tx, rx) = oneshot::channel();
        let (seq, id) = self.issue();
        let mut inner = self.inner.lock();
        inner.held.insert(seq, Held::Stream(Some(tx)));
        self.telemetry.picker_pending.set(inner.held.len() as i64);
        StreamTicket { decisions: self.clone(), seq, id, report: rx }
    }

    /// Applies a report; returns whether the decision is over.
    pub fn report(&self, id: &str, report: Report) -> Result<bool, ReportError> {
        let result = self.apply(id, report);
        let label = match &result {
            Ok(_) => "accepted",
            Err(ReportError::Unknown(_)) => "unknown",
            Err(ReportError::Ended(..)) => "ended",
            Err(ReportError::NotHere(_)) => "refused",
            Err(ReportError::Implausible(..)) => "invalid",
        };
        self.telemetry.picker_reports.with_label_values(&[label]).inc();
        result
    }

    /// Applies a report; returns whether it ended the decision.
    fn apply(&self, id: &str, report: Report) -> Result<bool, ReportError> {
        let seq = self.sequence(id).ok_or_else(|| ReportError::Unknown(id.to_owned()))?;
        let caller = {
            let mut inner = self.inner.lock();
            match inner.held.get_mut(&seq) {
                None => {
                    let how = inner.ended.get(&seq).copied().unwrap_or(Ended::Earlier);
                    return Err(ReportError::Ended(id.to_owned(), how));
                }
                Some(Held::Stream(tx)) => {
                    let only_prefill = report.iter().all(|e| matches!(e, Event::Prefill(_)));
                    let prefill = report.iter().find_map(|e| match e {
                        Event::Prefill(p) => Some(*p),
                        _ => None,
                    });
                    return match (prefill, only_prefill) {
                        (Some(p), true) => {
                            // A second prefill report for the same leg changes nothing.
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(p);
                            }
                            Ok(false)
                        }
                        _ => Err(ReportError::NotHere(id.to_owned())),
                    };
                }
                Some(Held::Caller(c)) => c.clone(),
            }
        };
        // The map is not locked while the report is applied.
        let mut c = caller.lock();
        if let Some(how) = c.over {
            return Err(ReportError::Ended(id.to_owned(), how));
        }
        if let Some(problem) = report.iter().find_map(|e| c.routed.implausible(e)) {
            return Err(ReportError::Implausible(id.to_owned(), problem));
        }
        let end = report.iter().find_map(ending);
        for e in report {
            c.routed.on(e);
        }
        c.deadline = Instant::now() + self.timeout;
        let Some(how) = end else { return Ok(false) };
        c.over = Some(how);
        drop(c);
        let mut inner = self.inner.lock();
        if inner.held.remove(&seq).is_some() {
            inner.callers -= 1;
        }
        inner.remember(seq, how);
        self.telemetry.picker_pending.set(inner.held.len() as i64);
        Ok(true)
    }

    /// Releases the decisions whose reports stopped coming; returns how many.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<Arc<Mutex<Caller>>> = {
            let mut inner = self.inner.lock();
            // One being reported on now (locked) is not due.
            let due: Vec<u64> = inner
                .held
                .iter()
                .filter_map(|(&seq, h)| match h {
                    Held::Caller(c) => {
                        c.try_lock().is_some_and(|c| c.over.is_none() && c.deadline <= now).then_some(seq)
                    }
                    Held::Stream(_) => None,
                })
                .collect();
            let mut out = Vec::with_capacity(due.len());
            for seq in due {
                let Some(Held::Caller(c)) = inner.held.get(&seq) else { continue };
                let c = c.clone();
                // Marked over before it leaves the map, so a report that found it just before
                // is refused; one being applied now (locked) is left for the next sweep.
                let Some(mut held) = c.try_lock() else { continue };
                held.over = Some(Ended::Expired);
                drop(held);
                inner.held.remove(&seq);
                inner.callers -= 1;
                inner.remember(seq, Ended::Expired);
                out.push(c);
            }
            self.telemetry.picker_pending.set(inner.held.len() as i64);
            out
        };
        for c in &expired {
            let c = c.lock();
            let pool = c.routed.pool_name();
            tracing::debug!(pool, "a picked decision's reports stopped coming; released");
            self.telemetry.picker_expired.with_label_values(&[pool]).inc();
        }
        expired.len()
    }

    /// Sweeps for expired decisions until dropped (at a quarter of the shorter timeout, 10 ms
    /// to 1 s).
    pub async fn run(self: Arc<Self>) {
        let period =
            (self.start_timeout.min(self.timeout) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep();
        }
    }

    /// Decisions held now (callers' and streams').
    pub fn pending(&self) -> usize {
        self.inner.lock().held.len()
    }
}

impl Inner {
    fn remember(&mut self, seq: u64, how: Ended) {
        self.ended.insert(seq, how);
        self.order.push_back(seq);
        while self.order.len() > ENDED_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.ended.remove(&old);
            }
        }
    }
}

/// A P/D decision's id while an ext_proc stream holds it, and where its prefill report arrives.
#[derive(Debug)]
pub struct StreamTicket {
    decisions: Arc<Decisions>,
    seq: u64,
    id: String,
    /// The sidecar's report of the prefill leg, if one comes.
    pub report: oneshot::Receiver<Prefill>,
}

impl StreamTicket {
    /// The decision's id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        let mut inner = self.decisions.inner.lock();
        inner.held.remove(&self.seq);
        inner.remember(self.seq, Ended::StreamEnded);
        self.decisions.telemetry.picker_pending.set(inner.held.len() as i64);
    }
}
