//! Memory a burst left behind, given back. glibc's allocator keeps what it frees in its arenas
//! for reuse: after thousands of connections or a wave of large bodies have come and gone, the
//! process stays at its high-water mark (110–500 MB measured with `benches/memory.sh` and
//! `benches/abuse.sh`) although it uses a few tens of MB. Every [`EVERY`], kvgate asks the
//! allocator how much it holds free; when that has grown by more than [`SLACK`] since the last
//! look, it hands the free pages back to the system (`malloc_trim`). At rest that is one
//! `mallinfo2` call (microseconds); a trim costs a few milliseconds of one thread, and only
//! follows a burst.

use std::time::Duration;

/// Time between looks at the allocator.
pub(crate) const EVERY: Duration = Duration::from_secs(10);

/// Growth of the allocator's free memory that is worth a trim.
pub(crate) const SLACK: usize = 32 << 20;

/// Looks at the allocator every [`EVERY`] and trims after a burst; runs until its task ends.
pub(crate) async fn give_back() {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut watch = Watch::default();
    loop {
        tick.tick().await;
        let Some(free) = allocator::free() else { return };
        if watch.should_trim(free) {
            allocator::trim();
            if let Some(after) = allocator::free() {
                watch.trimmed(after);
            }
        }
    }
}

/// When a trim is due: the free memory the allocator holds, against what it held after the last
/// trim (or the least seen since, as freed memory is reused).
#[derive(Debug, Default)]
struct Watch {
    baseline: usize,
}

impl Watch {
    fn should_trim(&mut self, free: usize) -> bool {
        self.baseline = self.baseline.min(free);
        free > self.baseline.saturating_add(SLACK)
    }

    fn trimmed(&mut self, free: usize) {
        self.baseline = free;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod allocator {
    /// Bytes in free chunks of the allocator's arenas (released to the system or not: a trim
    /// returns their pages but keeps them as free chunks).
    pub(super) fn free() -> Option<usize> {
        // SAFETY: `mallinfo2` only reads the allocator's statistics (under its own locks).
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }

    /// Returns every free page of every arena to the system.
    pub(super) fn trim() {
        // SAFETY: `malloc_trim` is thread-safe and only releases memory no allocation holds.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod allocator {
    pub(super) fn free() -> Option<usize> {
        None
    }

    pub(super) fn trim() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_growth_of_free_memory_past_the_slack() {
        let mut w = Watch::default();
        assert!(!w.should_trim(SLACK), "up to the slack: nothing");
        assert!(w.should_trim(SLACK + 1), "past it: a trim");
        w.trimmed(SLACK + 1);
        assert!(!w.should_trim(SLACK + 1), "what the last trim left is the new baseline");
        assert!(!w.should_trim(10), "freed memory reused");
        assert!(w.should_trim(10 + SLACK + 1), "growth is counted from the least seen since");
    }
}
