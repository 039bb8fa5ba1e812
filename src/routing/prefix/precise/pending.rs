//! Pending keys: blocks kvgate has just sent to an endpoint, matched as held until its events
//! can have said so, each for a bounded time and all of them within a bound.

use super::keys::KeyMap;

/// Pending entries held at most (every endpoint together).
const MAX_PENDING: usize = 1 << 20;

/// Blocks kvgate has just sent to endpoints, before their events can have said so: a request
/// in flight (a burst of one prefix, say) is matched by the next ones. Each entry lives until
/// its time is up; the events then confirm it, or it is gone.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Key → (endpoint, when it was last recorded there): one entry per endpoint however often
    /// the key is sent (a hot prefix is sent many times a second).
    pub(super) holders: KeyMap<Vec<(u32, u64)>>,
    /// (recorded at, endpoint, key), oldest first; an entry refreshed since is skipped.
    queue: std::collections::VecDeque<(u64, u32, u64)>,
}

impl Pending {
    pub(super) fn pop(&mut self) {
        let Some((t, ep, key)) = self.queue.pop_front() else { return };
        if let Some(list) = self.holders.get_mut(&key)
            && let Some(pos) = list.iter().position(|&(e, at)| e == ep && at == t)
        {
            list.swap_remove(pos);
            if list.is_empty() {
                self.holders.remove(&key);
            }
        }
    }

    pub(super) fn record(&mut self, ep: u32, key: u64, now_ms: u64, ttl_ms: u64) {
        let list = self.holders.entry(key).or_default();
        match list.iter_mut().find(|(e, _)| *e == ep) {
            // Recorded a moment ago: it lives on (a refresh every quarter of its life).
            Some((_, at)) if now_ms.saturating_sub(*at) < ttl_ms / 4 => {}
            Some((_, at)) => {
                *at = now_ms;
                self.queue.push_back((now_ms, ep, key));
            }
            None => {
                list.push((ep, now_ms));
                self.queue.push_back((now_ms, ep, key));
            }
        }
    }

    pub(super) fn expire(&mut self, before_ms: u64) {
        while self.queue.front().is_some_and(|(t, ..)| *t < before_ms) || self.queue.len() > MAX_PENDING {
            self.pop();
        }
    }

    pub(super) fn forget(&mut self, ep: u32) {
        self.queue.retain(|&(_, e, _)| e != ep);
        self.holders.retain(|_, list| {
            list.retain(|&(e, _)| e != ep);
            !list.is_empty()
        });
    }
}
