//! Decisions held for their reports: a caller of kvgate's own picker API sends the request
//! itself and reports what happened by the decision's id, and behind Envoy a P/D sidecar reports
//! the prefill leg of a decision the ext_proc stream holds. [`Decisions`] keeps each by id, applies
//! reports through the one outcome API ([`Routed`]), and releases a decision whose reports stop
//! coming (no first token within `start_timeout_ms` of the pick, nothing for `report_timeout_ms`
//! after the last report), counted in `kvgate_picker_decisions_expired_total`.
//!
//! What callers may hold is bounded three ways: `max_pending` in all, `max_pending_per_client`
//! for one [`Client`], and, for each pool with `admission.max_in_flight`, `admission_share` of
//! that limit — so decisions nobody reports cannot fill the pool's admission for the proxy and
//! Envoy. Held decisions still count as their endpoints' load; only the picker API's own picks
//! are refused past its share.
//!
//! Ids are `<process nonce>-<sequence>-<tag>` in hex. The tag is the sequence keyed-hashed with a
//! secret of the process, so one id does not give away the others; the sequence tells an id this
//! process issued and has already ended from one it never issued, without keeping every id.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::gateway::config::{Admission, PickerApiConfig};
use crate::gateway::error::RouteError;
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
    /// Most held for one client.
    max_per_client: usize,
    /// The share of a pool's `admission.max_in_flight` callers' decisions may take.
    admission_share: f64,
    inner: Mutex<Inner>,
    telemetry: Arc<Telemetry>,
}

#[derive(Debug, Default)]
struct Inner {
    held: HashMap<u64, Held>,
    /// Callers' decisions among `held`.
    callers: usize,
    /// Callers' decisions by client (a client holding none has no entry).
    per_client: HashMap<Client, usize>,
    /// Callers' decisions by pool name (a pool with none has no entry).
    per_pool: HashMap<String, usize>,
    ended: HashMap<u64, Ended>,
    order: VecDeque<u64>,
}

#[derive(Debug)]
enum Held {
    /// A decision its caller reports on entirely (locked on its own: reports for different
    /// decisions do not wait for each other), with the client that picked it and its pool.
    Caller(Arc<Mutex<Caller>>, Client, String),
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

/// Why another decision is not held for a caller.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// Too many decisions wait for reports (`picker_api.max_pending`).
    #[error("{0} decisions are waiting for their reports, the most this server holds (picker_api.max_pending)")]
    Full(usize),
    /// Too many of this client's (`picker_api.max_pending_per_client`).
    #[error(
        "{0} decisions of this client are waiting for their reports, the most one client may hold \
         (picker_api.max_pending_per_client)"
    )]
    ClientFull(usize),
    /// The pool's admission share for held decisions is taken (`picker_api.admission_share`):
    /// answered as a saturated pool is.
    #[error(transparent)]
    Share(RouteError),
}

/// Who holds a decision: the peer's IP address (an IPv6 address's /64, what one host is
/// usually given), or an unknown peer (every such one counted as one client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(Option<IpAddr>);

impl Client {
    /// The client at `peer`, if known.
    pub fn of(peer: Option<SocketAddr>) -> Self {
        Self(peer.map(|p| match p.ip().to_canonical() {
            IpAddr::V6(v6) => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
            v4 => v4,
        }))
    }

    /// The peer address, as far as it is known.
    pub fn ip(&self) -> Option<IpAddr> {
        self.0
    }
}

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
            max_per_client: cfg.pending_per_client(),
            admission_share: cfg.admission_share.clamp(0.0, 1.0),
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

    /// Whether another decision of `client`'s may be held now (checked before deciding, so a
    /// pick that could not be held records nothing).
    pub fn has_room(&self, client: Client) -> Result<(), HoldError> {
        self.room(&self.inner.lock(), client)
    }

    fn room(&self, inner: &Inner, client: Client) -> Result<(), HoldError> {
        if inner.callers >= self.max_pending {
            self.refused("max_pending");
            return Err(HoldError::Full(inner.callers));
        }
        let mine = inner.per_client.get(&client).copied().unwrap_or(0);
        if mine >= self.max_per_client {
            self.refused("max_pending_per_client");
            return Err(HoldError::ClientFull(mine));
        }
        Ok(())
    }

    /// Counts a picker API call refused by `reason` (a fixed name) in
    /// `kvgate_picker_refused_total`.
    pub fn refused(&self, reason: &'static str) {
        self.telemetry.picker_refused.with_label_values(&[reason]).inc();
    }

    /// Whether another decision may be held in `pool` (whose admission is `limits`): not while
    /// callers' decisions there take `admission_share` of its `max_in_flight`. Refused as a
    /// saturated pool is.
    pub fn share_left(&self, pool: &str, limits: &Admission) -> Result<(), RouteError> {
        self.share_of(&self.inner.lock(), pool, limits)
    }

    fn share_of(&self, inner: &Inner, pool: &str, limits: &Admission) -> Result<(), RouteError> {
        let Some(max) = limits.max_in_flight else { return Ok(()) };
        // Rounded down, so the proxy and Envoy keep the rest of the limit; but at least one, or
        // a pool limited to one request could never be picked through this API.
        let share = ((max as f64 * self.admission_share).floor() as u64).max(1);
        let held = inner.per_pool.get(pool).copied().unwrap_or(0) as u64;
        if held < share {
            return Ok(());
        }
        self.refused("admission_share");
        let reason = format!(
            "{held} picked requests wait for their reports, the picker API's share of max_in_flight {max} \
             (picker_api.admission_share {})",
            self.admission_share
        );
        Err(RouteError::Saturated { pool: pool.to_owned(), reason, shed: false })
    }

    /// This process's nonce, the first part of every id it issues: its replica id.
    pub fn replica_id(&self) -> String {
        format!("{:08x}", self.nonce)
    }

    /// The replica id an id names (its first part), whichever process issued it.
    pub fn replica_of(id: &str) -> Option<&str> {
        id.split_once('-').map(|(replica, _)| replica)
    }

    /// Holds `routed` for `client` until its final report or until its reports stop coming;
    /// returns its id.
    pub fn hold(&self, routed: Routed, client: Client) -> Result<String, HoldError> {
        let mut inner = self.inner.lock();
        self.room(&inner, client)?;
        let pool = routed.pool_name().to_owned();
        self.share_of(&inner, &pool, routed.admission()).map_err(HoldError::Share)?;
        let (seq, id) = self.issue();
        let deadline = Instant::now() + self.start_timeout;
        let caller = Caller { routed, deadline, over: None };
        *inner.per_client.entry(client).or_default() += 1;
        *inner.per_pool.entry(pool.clone()).or_default() += 1;
        inner.held.insert(seq, Held::Caller(Arc::new(Mutex::new(caller)), client, pool));
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
                Some(Held::Caller(c, ..)) => c.clone(),
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
        inner.release(seq);
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
                    Held::Caller(c, ..) => {
                        c.try_lock().is_some_and(|c| c.over.is_none() && c.deadline <= now).then_some(seq)
                    }
                    Held::Stream(_) => None,
                })
                .collect();
            let mut out = Vec::with_capacity(due.len());
            for seq in due {
                let Some(Held::Caller(c, ..)) = inner.held.get(&seq) else { continue };
                let c = c.clone();
                // Marked over before it leaves the map, so a report that found it just before
                // is refused; one being applied now (locked) is left for the next sweep.
                let Some(mut held) = c.try_lock() else { continue };
                held.over = Some(Ended::Expired);
                drop(held);
                inner.release(seq);
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
    /// Takes decision `seq` out of the held ones (a caller's with its counts).
    fn release(&mut self, seq: u64) {
        let Some(Held::Caller(_, client, pool)) = self.held.remove(&seq) else { return };
        self.callers -= 1;
        lower(&mut self.per_pool, pool);
        lower(&mut self.per_client, client);
    }

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

/// Lowers `key`'s count in `map`, forgetting it at zero (the maps hold only clients and pools
/// with decisions held).
fn lower<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let std::collections::hash_map::Entry::Occupied(mut e) = map.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
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
        inner.release(self.seq);
        inner.remember(self.seq, Ended::StreamEnded);
        self.decisions.telemetry.picker_pending.set(inner.held.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(peer: Option<&str>, client: Option<&str>) {
        let peer = peer.map(|p| p.parse::<SocketAddr>().expect("a socket address"));
        let want = client.map(|c| c.parse::<IpAddr>().expect("an IP"));
        assert_eq!(Client::of(peer).ip(), want, "{peer:?}");
    }

    #[test]
    fn a_client_is_its_ip_or_its_ipv6_slash_64() {
        check(Some("127.0.0.2:4000"), Some("127.0.0.2"));
        check(Some("[::ffff:10.1.2.3]:4000"), Some("10.1.2.3"));
        check(Some("[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:1"), Some("2001:db8:1:2::"));
        check(Some("[::1]:1"), Some("::"));
        check(None, None);
    }
}
