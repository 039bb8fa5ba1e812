//! The queue's bookkeeping: waiters in and out of their band and flow, the gauges, and the pump
//! that lets the next one go.

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use super::{FLOW_LABELS, Flow, FlowControl, Queue, SCAN, Turn, Waiting};
use crate::gateway::config::flow::{FlowSettings, Ordering};
use crate::routing::endpoint::Endpoint;

impl FlowControl {
    /// Queues `w` in its band and flow (at the head of its line when `front`: a waiter taken
    /// back keeps its place); returns its sequence number, or `Err` when a bound is reached.
    pub(super) fn push(
        &self,
        s: &FlowSettings,
        priority: i64,
        id: &Arc<str>,
        mut w: Waiting,
        front: bool,
    ) -> Result<u64, ()> {
        let mut q = self.queue.lock();
        let band_full = q.bands.get(&Reverse(priority)).is_some_and(|b| {
            b.requests >= s.max_requests_per_band || b.bytes.saturating_add(w.bytes) > s.max_bytes_per_band
        });
        if !front && (band_full || q.requests >= s.max_requests || q.bytes.saturating_add(w.bytes) > s.max_bytes) {
            return Err(());
        }
        if !front {
            w.seq = q.next_seq;
            q.next_seq += 1;
        }
        let seq = w.seq;
        let label = if q.labels.iter().any(|l| l == id) {
            id.clone()
        } else if q.labels.len() < FLOW_LABELS {
            q.labels.push(id.clone());
            id.clone()
        } else {
            Arc::from("other")
        };
        q.requests += 1;
        q.bytes += w.bytes;
        let bytes = w.bytes;
        let band = q.bands.entry(Reverse(priority)).or_default();
        band.requests += 1;
        band.bytes += bytes;
        let flow = match band.flows.iter().position(|f| f.id == *id) {
            Some(i) => &mut band.flows[i],
            None => {
                band.flows.push_back(Flow { id: id.clone(), label, line: VecDeque::new() });
                band.flows.back_mut().expect("just pushed")
            }
        };
        let at = match (s.ordering, front) {
            (Ordering::Fcfs, true) => 0,
            (Ordering::Fcfs, false) => flow.line.len(),
            (Ordering::Edf, _) => flow.line.partition_point(|x| (x.deadline, x.seq) <= (w.deadline, w.seq)),
        };
        flow.line.insert(at, w);
        let label = flow.label.clone();
        self.waiting.fetch_add(1, AtomicOrdering::SeqCst);
        drop(q);
        self.gauges(priority, &label, 1, bytes as i64);
        Ok(seq)
    }

    /// Takes request `seq` of flow `id` out of band `priority`, if it is still there.
    pub(super) fn remove(&self, priority: i64, id: &str, seq: u64) {
        let mut q = self.queue.lock();
        let Some(band) = q.bands.get_mut(&Reverse(priority)) else { return };
        let Some(fi) = band.flows.iter().position(|f| &*f.id == id) else { return };
        let Some(wi) = band.flows[fi].line.iter().position(|w| w.seq == seq) else { return };
        let w = band.flows[fi].line.remove(wi).expect("found");
        let label = band.flows[fi].label.clone();
        if band.flows[fi].line.is_empty() {
            band.flows.remove(fi);
        }
        Self::took(&mut q, priority, w.bytes);
        self.waiting.fetch_sub(1, AtomicOrdering::SeqCst);
        drop(q);
        self.gauges(priority, &label, -1, -(w.bytes as i64));
    }

    /// Counts a request out of band `priority`, dropping the band once empty.
    fn took(q: &mut Queue, priority: i64, bytes: u64) {
        q.requests -= 1;
        q.bytes -= bytes;
        if let Some(band) = q.bands.get_mut(&Reverse(priority)) {
            band.requests -= 1;
            band.bytes -= bytes;
            if band.requests == 0 {
                q.bands.remove(&Reverse(priority));
            }
        }
    }

    fn gauges(&self, priority: i64, label: &str, requests: i64, bytes: i64) {
        let p = priority.to_string();
        let labels = [self.pool.as_str(), p.as_str(), label];
        self.telemetry.flow_queue_size.with_label_values(&labels).add(requests);
        self.telemetry.flow_queue_bytes.with_label_values(&labels).add(bytes);
    }

    pub(super) fn observe_wait(&self, priority: i64, outcome: &str, waited: Duration) {
        let p = priority.to_string();
        self.telemetry
            .flow_queue_duration
            .with_label_values(&[self.pool.as_str(), p.as_str(), outcome])
            .observe(waited.as_secs_f64());
    }

    /// Lets the next waiter go if an endpoint is open to it: bands highest first, and in a band
    /// the head of each flow in round-robin order. Called at every capacity event; nothing to
    /// do (one atomic load) while nobody waits or a waiter holds the turn.
    pub fn pump(self: &Arc<Self>) {
        // Whoever released room (a store to the in-flight counts) and whoever queued (a store to
        // `waiting`) each look at the other's store after this fence: one of them sees it, so a
        // waiter is never left with room open and nobody to tell it.
        std::sync::atomic::fence(AtomicOrdering::SeqCst);
        if self.waiting() == 0 {
            return;
        }
        let s = self.settings();
        let snap = self.current();
        let mut q = self.queue.lock();
        if q.dispatching {
            return;
        }
        loop {
            let Some((priority, fi)) = self.next_open(&q, &s, &snap.endpoints) else { return };
            let band = q.bands.get_mut(&Reverse(priority)).expect("found");
            let mut flow = band.flows.remove(fi).expect("found");
            let w = flow.line.pop_front().expect("a flow in a band has a line");
            let label = flow.label.clone();
            // Round robin: the flow served goes to the back.
            if !flow.line.is_empty() {
                band.flows.push_back(flow);
            }
            Self::took(&mut q, priority, w.bytes);
            self.waiting.fetch_sub(1, AtomicOrdering::SeqCst);
            self.gauges(priority, &label, -1, -(w.bytes as i64));
            q.dispatching = true;
            match w.wake.send(Turn { flow: Some(self.clone()) }) {
                Ok(()) => return,
                // Its client left as it was chosen: the turn comes back, the next one is looked at.
                Err(turn) => {
                    turn.defuse();
                    q.dispatching = false;
                }
            }
        }
    }

    /// The band and flow index of the first waiter an endpoint is open to, in service order.
    fn next_open(&self, q: &Queue, s: &FlowSettings, endpoints: &[Endpoint]) -> Option<(i64, usize)> {
        let mut looked = 0;
        // Heads of the same model and band (no subset) see the same endpoints: one look each.
        let mut closed: Vec<(&str, i64)> = Vec::new();
        for (Reverse(priority), band) in &q.bands {
            for (fi, flow) in band.flows.iter().enumerate() {
                looked += 1;
                if looked > SCAN {
                    return None;
                }
                let Some(head) = flow.line.front() else { continue };
                if head.wake.is_closed() {
                    continue;
                }
                let plain = head.probe.subset.is_none();
                if plain && closed.contains(&(head.probe.model.as_str(), *priority)) {
                    continue;
                }
                if self.open_mask(s, endpoints, &head.probe, *priority).is_some() {
                    return Some((*priority, fi));
                }
                if plain {
                    closed.push((head.probe.model.as_str(), *priority));
                }
            }
        }
        None
    }
}
