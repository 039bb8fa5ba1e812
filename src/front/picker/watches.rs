//! The `WatchEndpoints` streams open, bounded in all (`picker_api.max_watches`) and per client
//! (`picker_api.max_watches_per_client`), each stream holding its slot while it lives.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tonic::Status;

use crate::gateway::config::PickerApiConfig;
use crate::gateway::decisions::{Client, Decisions};

/// The streams open, in all and by client.
#[derive(Debug)]
pub(crate) struct Watches {
    /// Where refusals are counted.
    decisions: Arc<Decisions>,
    max: usize,
    max_per_client: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// A client with none open has no entry.
    by_client: HashMap<Client, usize>,
}

/// One open watch, counted while it lives.
#[derive(Debug)]
pub(crate) struct WatchSlot {
    watches: Arc<Watches>,
    client: Client,
}

impl Watches {
    /// The bounds `cfg` sets; refusals counted through `decisions`.
    pub(crate) fn new(cfg: &PickerApiConfig, decisions: Arc<Decisions>) -> Self {
        let (max, max_per_client) = (cfg.max_watches.max(1), cfg.max_watches_per_client.max(1));
        Self { decisions, max, max_per_client, open: Mutex::default() }
    }

    /// A slot for another stream of `client`'s, or why there is none (RESOURCE_EXHAUSTED).
    pub(crate) fn take(self: &Arc<Self>, client: Client) -> Result<WatchSlot, Status> {
        let mut open = self.open.lock();
        if open.total >= self.max {
            self.decisions.refused("max_watches");
            let message = format!("{} endpoint watches are open, the most served (picker_api.max_watches)", open.total);
            return Err(Status::resource_exhausted(message));
        }
        let mine = open.by_client.entry(client).or_default();
        if *mine >= self.max_per_client {
            self.decisions.refused("max_watches_per_client");
            let message = format!(
                "{mine} endpoint watches of this client are open, the most one client may have \
                 (picker_api.max_watches_per_client)"
            );
            return Err(Status::resource_exhausted(message));
        }
        *mine += 1;
        open.total += 1;
        Ok(WatchSlot { watches: self.clone(), client })
    }

    /// Streams open now.
    #[cfg(test)]
    fn open(&self) -> (usize, usize) {
        let open = self.open.lock();
        (open.total, open.by_client.len())
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watches.open.lock();
        open.total -= 1;
        if let Some(n) = open.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_client_and_in_all_and_given_back() {
        let cfg = PickerApiConfig { max_watches: 3, max_watches_per_client: 2, ..PickerApiConfig::default() };
        let telemetry = Arc::new(crate::gateway::telemetry::Telemetry::new());
        let watches = Arc::new(Watches::new(&cfg, Arc::new(Decisions::new(&cfg, telemetry))));
        let client = |ip: &str| Client::of(Some(format!("{ip}:1").parse().expect("address")));
        let (a, b) = (client("127.0.0.2"), client("127.0.0.1"));
        let a1 = watches.take(a).expect("first");
        let _a2 = watches.take(a).expect("second");
        let e = watches.take(a).expect_err("a third of one client's");
        assert!(e.message().contains("max_watches_per_client"), "{}", e.message());
        let b1 = watches.take(b).expect("another client's");
        let e = watches.take(client("127.0.0.3")).expect_err("past the total");
        assert!(e.message().contains("(picker_api.max_watches)"), "{}", e.message());
        drop((a1, b1));
        assert_eq!(watches.open(), (1, 1), "a client with none open is forgotten");
        let _a3 = watches.take(a).expect("given back");
    }
}
