//! The outcome half of a request: a [`Routed`] request carries its decision and in-flight counts
//! and is the one place its results are accounted — endpoint health, the prefill leg (index
//! learning, fallbacks), which candidate it is on, the request count, usage tokens and the
//! TTFT sample. The front-ends translate their wire into [`Event`]s and hand them to
//! [`Routed::on`]; none of them accounts by hand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::gateway::error::upstream_error_code;
use crate::gateway::events::{Event, Failure, Prefill, PrefillFailure, Served};
use crate::gateway::pool::cluster::{Lesson, endpoint_key};
use crate::gateway::pool::{Outcome, Pool, Snapshot, flow, now_ms};
use crate::gateway::telemetry::Usage;
use crate::gateway::usage::UsageReader;
use crate::routing::endpoint::{EndpointId, InFlightGuard};
use crate::routing::pd;
use crate::routing::plan::Planned;
use crate::routing::schedule::{Decision, DecisionKind, Target};
use crate::routing::ttft::TtftSample;

mod feedback;

/// The most tokens a reported usage may count when the model's context length is not known.
pub const MAX_REPORTED_TOKENS: u64 = 1 << 24;

/// A routed request: its decision, and its share of the target's in-flight counts, held until
/// this is dropped.
#[derive(Debug)]
pub struct Routed {
    pool: Pool,
    /// The snapshot the decision was made on (its indices are valid here).
    snapshot: Arc<Snapshot>,
    planned: Planned,
    model: String,
    /// The in-flight count on the current target.
    guard: InFlightGuard,
    /// The request asked for a streamed answer: its tokens count in flow control's token bound
    /// until its first byte.
    stream: bool,
    /// The in-flight count on the prefill endpoint, while its leg runs (P/D decisions).
    prefill_guard: Option<InFlightGuard>,
    /// Which of the decision's targets the request is on now.
    current: usize,
    /// What its TTFT model learns from, on the current target.
    timing: Timing,
    /// The prefill leg was reported, or taken as run (P/D decisions).
    prefill_over: bool,
    /// The current attempt's outcome was reported to the endpoint's health record.
    attempt_reported: bool,
    /// The current attempt failed (the request is over that way unless it is resent).
    failure: Option<Failure>,
    /// A failure after the response started was reported to the endpoint's health.
    broke_midway: bool,
    /// The response's status, once it started.
    started: Option<u16>,
    /// The response is a stream whose first byte is its first token (SSE, relayed as it comes).
    streaming: bool,
    /// The response's status was 2xx.
    succeeded: bool,
    /// Reads the usage from the response body as it passes.
    reader: UsageReader,
    /// The usage the response reported (counted so far).
    usage: Option<Usage>,
    /// The usage a caller reported with the response's end (counted when the request goes).
    reported: Option<Usage>,
    /// When it was decided.
    decided: Instant,
    /// Response body bytes seen so far.
    response_bytes: u64,
    /// The response ended (its duration and size were observed).
    finished: bool,
    /// The request was counted with the status its client got.
    counted: bool,
    /// The body to send instead of the client's (P/D: without the client's transfer parameters).
    body: Option<Vec<u8>>,
    /// Tells the pool's flow control that room opened, after the counts above are released:
    /// the last field, so it drops after them.
    room: flow::Room,
}

/// One attempt's TTFT sample in the making.
#[derive(Debug, Clone, Copy)]
struct Timing {
    sent: Instant,
    sent_ms: u64,
    /// Prefill tokens in flight on the target before this request.
    ahead: u64,
    /// Its requests in decode then.
    decodes: u64,
    /// Time to the first byte, once seen.
    ttft_ms: Option<f64>,
    /// `sent` is when the request went to this target (not so after a gateway's own retry).
    timed: bool,
}

impl Timing {
    fn start(in_flight: &crate::routing::endpoint::InFlight) -> Self {
        Self {
            sent: Instant::now(),
            sent_ms: now_ms(),
            ahead: in_flight.tokens(),
            decodes: in_flight.decoding(),
            ttft_ms: None,
            timed: true,
        }
    }
}

impl Routed {
    /// A routed request on the decision's primary, counted in flight there (and on the prefill
    /// endpoint while its leg runs).
    /// `stream`: the request asked for a streamed answer (its first byte ends its prefill).
    pub(crate) fn new(pool: Pool, snapshot: Arc<Snapshot>, planned: Planned, model: String, stream: bool) -> Self {
        let target = planned.decision.primary().index;
        let in_flight = snapshot.endpoints[target].in_flight.clone();
        let timing = Timing::start(&in_flight);
        let guard = InFlightGuard::with_gate(in_flight, planned.target_tokens(), stream);
        let prefill_guard = planned.prefill_uncached_tokens.and_then(|tokens| {
            let p = planned.decision.prefill?;
            Some(InFlightGuard::new(snapshot.endpoints[p.index].in_flight.clone(), tokens))
        });
        pool.telemetry().running.with_label_values(&[model.as_str()]).inc();
        pool.telemetry().count_routed(&model);
        let room = flow::Room::new(pool.flow());
        Self {
            pool,
            snapshot,
            planned,
            model,
            guard,
            stream,
            prefill_guard,
            current: 0,
            timing,
            prefill_over: false,
            attempt_reported: false,
            failure: None,
            broke_midway: false,
            started: None,
            streaming: false,
            succeeded: false,
            reader: UsageReader::default(),
            usage: None,
            reported: None,
            decided: Instant::now(),
            response_bytes: 0,
            finished: false,
            counted: false,
            body: None,
            room,
        }
    }

    /// Takes in what happened to the request, in any order its wire produces it; each outcome
    /// is accounted once, whatever is repeated.
    pub fn on(&mut self, event: Event<'_>) {
        match event {
            Event::Prefill(p) => self.prefill(p),
            Event::Resent(k) => {
                if self.started.is_none() {
                    self.retarget(k);
                }
            }
            Event::ServedBy(Served::At(addr)) => self.served_by(addr),
            Event::ServedBy(Served::Unknown(reported)) => self.pool.served_elsewhere(reported.as_str()),
            Event::Failed(f) => self.failed(f),
            Event::Started { status, event_stream, streamed } => {
                self.guard.in_flight().heard(now_ms());
                self.start(status, event_stream, streamed);
            }
            Event::Body(bytes) => {
                self.guard.in_flight().heard(now_ms());
                self.response_bytes += bytes.len() as u64;
                self.first_byte();
                if let Some(u) = self.reader.feed(bytes) {
                    self.usage(u);
                }
            }
            Event::Finished { status, usage, body_bytes } => self.finish(status, usage, body_bytes),
        }
    }

    /// Observes the request body's size (`inference_objective_request_sizes`).
    pub(crate) fn request_bytes(&self, n: usize) {
        let l = [self.model.as_str(), self.model.as_str()];
        self.pool.telemetry().request_sizes.with_label_values(&l).observe(n as f64);
    }

    /// The prompt tokens target `k` computes: those it does not hold, none when a prefill
    /// endpoint computes them.
    fn tokens_on(&self, k: usize) -> u64 {
        match (self.planned.decision.prefill, self.planned.decision.targets.get(k)) {
            (Some(_), _) | (None, None) => 0,
            (None, Some(t)) => {
                self.planned.prompt_tokens.saturating_sub(u64::from(t.matched_blocks) * self.planned.block_tokens)
            }
        }
    }

    /// The decision.
    pub fn decision(&self) -> &Decision {
        &self.planned.decision
    }

    /// The target the request is on now (the decision's primary until retargeted).
    pub fn target(&self) -> &Target {
        &self.planned.decision.targets[self.current]
    }

    /// A token cancelled when the pool's endpoint `id` (a target of the decision, or its prefill
    /// endpoint) is found unresponsive (stopped: it accepts connections but answers nothing) —
    /// what it was sent will not be answered. `None` when the endpoint has left the pool.
    pub fn stopped(&self, id: EndpointId) -> Option<CancellationToken> {
        self.pool.stopped(id)
    }

    /// The snapshot the decision was made on (the decision's endpoint indices point into it).
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The model the request asked for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// How many endpoints to list for this decision where Envoy (or a `Pick` caller) gets a
    /// fallback list: the pool's `maxNumOfEndpoints` capped by `server` (`extproc.max_endpoints`).
    pub fn listed(&self, server: Option<usize>) -> usize {
        crate::routing::plan::endpoints_listed(self.pool.planner().scheduler().max_endpoints(), server)
    }

    /// The pool's name.
    pub fn pool_name(&self) -> &str {
        self.pool.name()
    }

    /// The pool's admission limits.
    pub fn admission(&self) -> &crate::gateway::config::Admission {
        self.pool.admission()
    }

    /// Why `event` is not one this request could have had, if it is not: reported usage beyond
    /// what its model's context holds (its `max_model_len` when the endpoints report it, else
    /// [`MAX_REPORTED_TOKENS`]), so a caller's report cannot inflate the token counts.
    pub fn implausible(&self, event: &Event<'_>) -> Option<String> {
        let Event::Finished { usage: Some(u), .. } = event else { return None };
        let ceiling = self.snapshot.max_model_len.get(&self.model).copied().unwrap_or(MAX_REPORTED_TOKENS);
        let total = u.prompt.saturating_add(u.completion);
        (total > ceiling).then(|| {
            format!("usage of {total} tokens is more than a request for `{}` can have ({ceiling})", self.model)
        })
    }

    /// Keeps the body to send for a request whose body was `body`: in a P/D pool, without a
    /// client's own `kv_transfer_params` (they name where an endpoint pulls KV from, which is
    /// kvgate's to decide).
    pub(crate) fn sanitize(&mut self, body: &[u8]) {
        if self.pool.planner().disaggregates() {
            self.body = pd::without_transfer_params(body);
        }
    }

    /// The body to send instead of the request's own; `None` when that can go as it is.
    pub fn take_body(&mut self) -> Option<Vec<u8>> {
        self.body.take()
    }

    /// The prefill leg's first report (later ones, and any for a decision without a leg, change
    /// nothing). A failed leg is reported with what it learned of the prefill endpoint and
    /// counted as a fallback; the decision becomes decode-only and the prefill work moves onto
    /// the decode endpoint's in-flight count.
    fn prefill(&mut self, p: Prefill) {
        if self.planned.decision.prefill.is_none() || std::mem::replace(&mut self.prefill_over, true) {
            return;
        }
        match p {
            Prefill::Succeeded => {
                if let Some(t) = self.planned.decision.prefill {
                    self.pool.report(t.id, Outcome::Answered(200));
                }
                self.learn_prefill();
                self.release_prefill_leg();
            }
            Prefill::Failed(f) => self.prefill_failed(f),
        }
    }

    fn prefill_failed(&mut self, f: PrefillFailure) {
        if let (Some(p), Some(outcome)) = (self.planned.decision.prefill, f.learned()) {
            self.pool.report(p.id, outcome);
        }
        let labels = [self.pool.name(), f.reason()];
        self.pool.telemetry().disagg_fallbacks.with_label_values(&labels).inc();
        self.release_prefill_leg();
        self.planned.decision.prefill = None;
        self.planned.decision.kind = DecisionKind::DecodeOnly;
        self.retarget(self.current);
    }

    /// A response came with no report of the prefill leg: the leg is taken as run (a sidecar
    /// that does not report hands off all the same).
    fn prefill_ran(&mut self) {
        if self.planned.decision.prefill.is_some() && !std::mem::replace(&mut self.prefill_over, true) {
            self.learn_prefill();
        }
    }

    /// The prompt is held by endpoint `index` of the snapshot now: the prefix index records it,
    /// and the peer replicas are told.
    fn record_on(&self, index: usize) {
        let e = &self.snapshot.endpoints[index];
        self.pool.planner().index().record(e.id, &self.planned.prompt.hashes);
        if let Some(c) = self.pool.cluster() {
            c.placed(self.pool.name(), e, &self.planned.prompt.hashes);
        }
    }

    fn learn_prefill(&self) {
        if let Some(p) = &self.planned.decision.prefill {
            self.record_on(p.index);
        }
    }

    /// Moves the request (and its in-flight count) to target `k` of the decision. Unless a
    /// prefill endpoint computes it, the prompt is computed there: the prefix index learns it
    /// holds the prompt. (The first target keeps what the decision recorded: the index cannot
    /// take a prompt's tail out of an endpoint without orphaning longer prompts it holds, so
    /// those entries age out.)
    fn retarget(&mut self, k: usize) {
        if let Some(t) = self.planned.decision.targets.get(k) {
            self.attempt_reported = false;
            self.failure = None;
            if k != self.current && self.planned.decision.prefill.is_none() {
                self.record_on(t.index);
            }
            let in_flight = self.snapshot.endpoints[t.index].in_flight.clone();
            self.timing = Timing::start(&in_flight);
            self.guard = InFlightGuard::with_gate(in_flight, self.tokens_on(k), self.stream);
            self.current = k;
            // The endpoint it left has room again.
            self.room.pump();
        }
    }

    /// The prefill leg is over: its endpoint's counts are released, and waiters may have room.
    fn release_prefill_leg(&mut self) {
        if self.prefill_guard.take().is_some() {
            self.room.pump();
        }
    }

    /// The gateway reports that `addr` served the request (after its own retries, or by a
    /// choice of its own): the request's in-flight count, its prompt's place in the prefix
    /// index, its health record, usage feedback and TTFT sample follow that endpoint, whether
    /// or not it was among the decision's targets, as long as it is an endpoint of the pool.
    /// Any other address is ignored (counted; the first one logged).
    fn served_by(&mut self, addr: SocketAddr) {
        if self.target().address == addr {
            return;
        }
        let k = match self.planned.decision.targets.iter().position(|t| t.address == addr) {
            Some(k) => k,
            None => match self.snapshot.endpoints.iter().position(|e| e.address == addr) {
                Some(index) => self.add_target(index),
                None => return self.pool.served_elsewhere(addr),
            },
        };
        let (sent, ttft_ms, computed) = (self.timing.sent, self.timing.ttft_ms, !self.guard.in_prefill());
        self.retarget(k);
        // The gateway sent it as soon as it had the decision; a retry of its own makes the
        // sample long, never short (the TTFT model's fit is robust to such outliers).
        self.timing.sent = sent;
        if let Some(status) = self.started {
            // Reported after the response's start: the start was this endpoint's, and so is
            // its first byte, if it came.
            self.timing.ttft_ms = ttft_ms;
            if computed {
                self.guard.prefill_done();
            }
            self.report_attempt(Some(Outcome::Answered(status)));
        }
    }

    /// Appends the snapshot's endpoint `index` to the decision's targets; returns its place.
    fn add_target(&mut self, index: usize) -> usize {
        let e = &self.snapshot.endpoints[index];
        // A precise pool counts its matches in tokens, which only its plan knows: none held.
        let planner = self.pool.planner();
        let matched =
            if planner.precise().is_some() { 0 } else { planner.index().matched(e.id, &self.planned.prompt.hashes) };
        self.planned.decision.targets.push(Target {
            index,
            id: e.id,
            address: e.address,
            rank: e.rank,
            header_rank: None,
            matched_blocks: u32::try_from(matched).unwrap_or(u32::MAX),
        });
        self.planned.precise_targets.push(false);
        self.planned.decision.targets.len() - 1
    }

    /// The current attempt failed: the endpoint's health learns it (once per attempt).
    fn failed(&mut self, f: Failure) {
        if self.started.is_some() {
            // It broke part-way (a caller reports the endpoint died mid-stream): its health
            // learns that too, once; the client got the response's status.
            if let Some(o) = f.learned()
                && !std::mem::replace(&mut self.broke_midway, true)
            {
                self.pool.report(self.target().id, o);
            }
            return;
        }
        self.report_attempt(f.learned());
        if matches!(f, Failure::Status(_)) {
            // Only a prompt that was computed stores blocks.
            self.planned.expects_events = false;
        }
        self.failure = Some(f);
    }

    /// Reports the current attempt's outcome to its endpoint's health record, once.
    fn report_attempt(&mut self, outcome: Option<Outcome>) {
        if let Some(o) = outcome
            && !std::mem::replace(&mut self.attempt_reported, true)
        {
            self.pool.report(self.target().id, o);
        }
    }

    /// The response started with `status` (5xx count towards the endpoint's error rate unless
    /// its load explains them). The prefill leg, if any, is over by now: one not reported is
    /// taken as run (a sidecar that does not report hands off all the same).
    fn start(&mut self, status: u16, event_stream: bool, streamed: bool) {
        if self.started.is_some() {
            return;
        }
        self.prefill_ran();
        self.report_attempt(Some(Outcome::Answered(status)));
        self.started = Some(status);
        self.failure = None;
        self.succeeded = (200..300).contains(&status);
        if !self.succeeded {
            self.planned.expects_events = false;
        }
        self.release_prefill_leg();
        self.streaming = event_stream && streamed;
        // A body that passed already was read as one JSON document, as a body with no start is.
        if event_stream && self.response_bytes == 0 {
            self.reader = UsageReader::new(true);
        }
    }

    /// The response ended. What it ends with is kept; the request is accounted when it goes
    /// ([`Routed::settle`]), so events that come after this one count as well.
    fn finish(&mut self, status: Option<u16>, usage: Option<Usage>, body_bytes: Option<u64>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        if let Some(s) = status {
            // A response whose start was not reported gives no first-token time.
            self.start(s, false, false);
        }
        // A response came: the prefill leg, if any, ran.
        self.prefill_ran();
        if let Some(n) = body_bytes {
            self.response_bytes = self.response_bytes.max(n);
            self.first_byte();
        }
        self.reported = usage;
    }

    /// The first byte of the response body: the prompt is computed, its tokens leave the
    /// target's prefill count.
    fn first_byte(&mut self) {
        if !self.guard.in_prefill() {
            return self.answered_events();
        }
        if self.timing.timed {
            self.timing.ttft_ms = Some(self.timing.sent.elapsed().as_secs_f64() * 1000.0);
        }
        self.guard.prefill_done();
        // Its prefill tokens left the endpoint's bound.
        self.room.pump();
        self.answered_events();
    }

    /// A precise endpoint answered the request's prefill: its blocks' events should follow.
    fn answered_events(&mut self) {
        // Its prefill stored blocks on a precise endpoint: their events should follow.
        if self.planned.expects_events && self.current == 0 {
            self.planned.expects_events = false;
            self.pool.answered_precise(self.target().id);
        }
    }

    /// Counts the request with the status its client got (once).
    fn count(&mut self, status: u16, code: &str) {
        if !std::mem::replace(&mut self.counted, true) {
            let kind = Some(self.planned.decision.kind);
            self.pool.telemetry().count_request(self.pool.name(), &self.model, kind, status, code);
        }
    }

    /// The request is over: the usage that passed (or was reported) is counted, and the
    /// request with the status its client got — its response's, once it ended or started (a
    /// client that left part-way), else its last attempt's failure. One cancelled before any
    /// answer has no status and is not counted. A response that ended is observed (duration,
    /// size, usage).
    fn settle(&mut self) {
        if let Some(u) = self.reader.finish() {
            self.usage(u);
        }
        if let Some(u) = self.reported.take() {
            self.usage(u);
        }
        if self.finished {
            let seconds = self.decided.elapsed().as_secs_f64();
            self.pool.telemetry().observe_response(&self.model, seconds, self.response_bytes, self.usage);
            let status = self.started.unwrap_or(0);
            self.count(status, upstream_error_code(status));
        } else if let Some(status) = self.started {
            self.count(status, upstream_error_code(status));
        } else if let Some(status) = self.failure.and_then(Failure::status) {
            self.count(status, "upstream_error");
        }
    }

    /// Counts a retry a front-end sent (`sent`), or held back for its budget (a metric of the
    /// front-end's own retries, not an outcome of the request).
    pub fn count_retry(&self, sent: bool) {
        let outcome = if sent { "sent" } else { "budget_exhausted" };
        self.pool.telemetry().retries.with_label_values(&[self.pool.name(), outcome]).inc();
    }

    /// Counts the usage the response reported, and learns from it: the pool's bytes per
    /// token, and (cache feedback) whether the target held what the index believed. May come
    /// again as a stream reports more (`continuous_usage_stats`): only what grew is counted, and
    /// the prompt is learnt from once.
    fn usage(&mut self, usage: Usage) {
        let before = self.usage.replace(usage);
        let counted = before.unwrap_or_default();
        let grown = Usage {
            prompt: usage.prompt.saturating_sub(counted.prompt),
            completion: usage.completion.saturating_sub(counted.completion),
            cached: usage.cached.saturating_sub(counted.cached),
            cached_reported: usage.cached_reported,
        };
        self.pool.telemetry().count_tokens(self.pool.name(), grown);
        let bytes = self.planned.prompt.prompt_bytes;
        if before.is_some() || !self.succeeded || usage.prompt == 0 {
            return;
        }
        self.pool.planner().bytes_per_token().observe(bytes, usage.prompt);
        if let Some(c) = self.pool.cluster() {
            c.learned(self.pool.name(), Lesson::PromptSize { bytes: bytes as u64, tokens: usage.prompt });
        }
        self.cache_feedback(usage);
    }
}

impl Drop for Routed {
    /// The request is over: a streamed, successful decode-only response teaches its target's
    /// TTFT model (with the target's real uncached tokens when usage reported them).
    fn drop(&mut self) {
        self.settle();
        self.pool.telemetry().running.with_label_values(&[self.model.as_str()]).dec();
        let Some(ttft_ms) = self.timing.ttft_ms else { return };
        if !self.streaming || !self.succeeded || self.planned.decision.prefill.is_some() {
            return;
        }
        let own = match self.usage {
            Some(u) if u.prompt > 0 && u.cached_reported => u.prompt.saturating_sub(u.cached),
            _ => self.tokens_on(self.current),
        };
        let sample = TtftSample {
            work_tokens: self.timing.ahead + own,
            decodes: self.timing.decodes,
            ttft_ms,
            at_ms: self.timing.sent_ms,
        };
        let e = &self.snapshot.endpoints[self.target().index];
        e.ttft.observe(sample);
        if let Some(c) = self.pool.cluster() {
            let lesson = Lesson::Ttft {
                endpoint: endpoint_key(e),
                work_tokens: sample.work_tokens,
                decodes: sample.decodes,
                ttft_ms,
            };
            c.learned(self.pool.name(), lesson);
        }
    }
}
