//! Memory a burst left behind, given back. glibc's allocator keeps what it frees in its arenas
//! for reuse: after thousands of connections or a wave of large bodies have come and gone, the
//! process stays at its high-water mark (110–500 MB measured with `benches/memory.sh` and
//! `benches/abuse.sh`) although it uses a few tens of MB. Every [`EVERY`], kvgate compares its
//! resident memory with what the allocator has handed out; when the difference — memory resident
//! but in no allocation — has grown by more than [`SLACK`] since the last look, it hands the free
//! pages back to the system (`malloc_trim`). At rest that is one `mallinfo2` call and one read of
//! `/proc/self/statm` (microseconds); a trim costs a few milliseconds of one thread, and only
//! follows a burst.

use std::time::Duration;

/// Time between looks at the allocator.
pub(crate) const EVERY: Duration = Duration::from_secs(10);

/// Growth of the resident memory no allocation holds that is worth a trim.
pub(crate) const SLACK: usize = 32 << 20;

/// Looks at the allocator every [`EVERY`] and trims after a burst; runs until its task ends.
pub(crate) async fn give_back() {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut watch = Watch::default();
    loop {
        tick.tick().await;
        let Some(unused) = allocator::unused() else { return };
        if watch.should_trim(unused) {
            allocator::trim();
            if let Some(after) = allocator::unused() {
                watch.trimmed(after);
            }
        }
    }
}

/// When a trim is due: resident memory in no allocation, against what there was after the last
/// trim, or the least seen since (freed memory is reused; the binary's pages and the threads'
/// stacks are resident and in no allocation for good).
#[derive(Debug, Default)]
struct Watch {
    baseline: Option<usize>,
}

impl Watch {
    fn should_trim(&mut self, unused: usize) -> bool {
        let baseline = self.baseline.map_or(unused, |b| b.min(unused));
        self.baseline = Some(baseline);
        unused > baseline.saturating_add(SLACK)
    }

    fn trimmed(&mut self, unused: usize) {
        self.baseline = Some(unused);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod allocator {
    /// Resident bytes that no allocation holds: the process's resident set less what the
    /// allocator has handed out (from its arenas and in mappings of their own).
    pub(super) fn unused() -> Option<usize> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
        // SAFETY: `sysconf` only reads a system constant.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        // SAFETY: `mallinfo2` only reads the allocator's statistics (under its own locks).
        let info = unsafe { libc::mallinfo2() };
        Some((pages * page).saturating_sub(info.uordblks + info.hblkhd))
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
    pub(super) fn unused() -> Option<usize> {
        None
    }

    pub(super) fn trim() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_growth_of_unused_memory_past_the_slack() {
        let mut w = Watch::default();
        assert!(!w.should_trim(0), "the first look is the baseline");
        assert!(!w.should_trim(SLACK), "up to the slack: nothing");
        assert!(w.should_trim(SLACK + 1), "past it: a trim");
        w.trimmed(SLACK + 1);
        assert!(!w.should_trim(SLACK + 1), "what the last trim left is the new baseline");
        assert!(!w.should_trim(10), "freed memory reused");
        assert!(w.should_trim(10 + SLACK + 1), "growth is counted from the least seen since");
    }

    #[test]
    fn freed_holes_count_as_unused_until_a_trim_returns_them() {
        if !cfg!(all(target_os = "linux", target_env = "gnu")) {
            return;
        }
        const MIB: usize = 1 << 20;
        let before = allocator::unused().expect("resident and allocated bytes");
        // 64 MiB in 64 KiB blocks, each followed by a small block that stays: freed, they are
        // holes the allocator keeps (not the top of a heap, which it would return by itself).
        let (mut blocks, mut keepers) = (Vec::new(), Vec::new());
        for i in 0..1024 {
            blocks.push(vec![(i % 251) as u8 + 1; 64 << 10]);
            keepers.push(vec![1u8; 64]);
        }
        drop(blocks);
        let freed = allocator::unused().expect("after the free");
        allocator::trim();
        let trimmed = allocator::unused().expect("after the trim");
        drop(keepers);
        assert!(freed >= before + 48 * MIB, "freed holes stay resident: {before} -> {freed} bytes");
        assert!(trimmed + 32 * MIB <= freed, "a trim returns them: {freed} -> {trimmed} bytes");
    }
}
