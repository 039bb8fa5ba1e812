//! What `/debug/endpoints` shows of a pool's flow control.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::{FlowControl, key};
use crate::gateway::config::flow::FlowSettings;

/// One band's queue for `/debug/endpoints`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BandStatus {
    /// Its priority.
    pub priority: i64,
    /// Requests waiting.
    pub requests: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Requests waiting per flow.
    pub flows: BTreeMap<String, usize>,
}

/// A pool's flow control for `/debug/endpoints`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlowStatus {
    /// The settings in force.
    pub settings: FlowSettings,
    /// Each band with requests waiting, highest first.
    pub bands: Vec<BandStatus>,
    /// Known objectives and their priorities.
    pub objectives: BTreeMap<String, i64>,
    /// Per endpoint scraped while flow control is on: its request bound from its scrapes (the
    /// slow-start one until it was seen queueing).
    pub learned_requests: BTreeMap<String, u64>,
}

impl FlowControl {
    /// The queue by band, the objectives and what was learned, for `/debug/endpoints`.
    pub fn status(&self) -> FlowStatus {
        let q = self.queue.lock();
        let bands = q
            .bands
            .iter()
            .map(|(Reverse(priority), b)| BandStatus {
                priority: *priority,
                requests: b.requests,
                bytes: b.bytes,
                flows: b.flows.iter().map(|f| (f.id.to_string(), f.line.len())).collect(),
            })
            .collect();
        drop(q);
        let snap = self.current();
        let learned = self.learned.lock();
        let learned_requests =
            snap.endpoints.iter().filter_map(|e| learned.get(&key(e)).map(|l| (e.name.clone(), l.bound()))).collect();
        FlowStatus { settings: (*self.settings()).clone(), bands, objectives: self.objectives.all(), learned_requests }
    }
}
