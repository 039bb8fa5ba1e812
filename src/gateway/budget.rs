//! The bound on request bytes held in memory at once, over every request of a front-end: a body
//! is reserved chunk by chunk as it arrives, and released when the request lets go of it. Past
//! the bound a new chunk is refused (503 with `Retry-After`) instead of taking more memory, so
//! many slow uploaders cannot add up to more than the bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::gateway::error::RouteError;

/// Bytes held by every reservation, and the bound on them.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    held: Arc<AtomicUsize>,
    limit: usize,
}

impl BodyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { held: Arc::new(AtomicUsize::new(0)), limit }
    }

    /// An empty reservation, to grow as a body arrives.
    pub fn reservation(&self) -> Reservation {
        Reservation { budget: self.clone(), bytes: 0 }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// One request's share of a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: BodyBudget,
    bytes: usize,
}

impl Reservation {
    /// Reserves `more` bytes, or refuses them when the budget would be exceeded.
    pub fn grow(&mut self, more: usize) -> Result<(), RouteError> {
        let held = &self.budget.held;
        let mut now = held.load(Ordering::Relaxed);
        loop {
            let next = now.saturating_add(more);
            if next > self.budget.limit {
                return Err(RouteError::Overloaded { held: now, limit: self.budget.limit });
            }
            match held.compare_exchange_weak(now, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => now = actual,
            }
        }
        self.bytes += more;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_to_the_limit_and_give_back_when_dropped() {
        let budget = BodyBudget::new(100);
        let mut a = budget.reservation();
        a.grow(60).expect("fits");
        let mut b = budget.reservation();
        b.grow(40).expect("fits exactly");
        let e = b.grow(1).expect_err("over");
        assert_eq!((e.status(), e.code()), (503, "overloaded"));
        assert_eq!(budget.held(), 100, "a refused chunk is not held");
        drop(a);
        assert_eq!(budget.held(), 40);
        b.grow(60).expect("room again");
        drop(b);
        assert_eq!(budget.held(), 0);
    }
}
