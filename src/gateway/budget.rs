//! The bound on request bytes held in memory at once, over every request of a front-end: a body
//! is reserved chunk by chunk as it arrives, and released when the request lets go of it. Past
//! the bound a new chunk is refused (503 with `Retry-After`) instead of taking more memory, so
//! many slow uploaders cannot add up to more than the bound.
//!
//! Bytes are also counted per [`Client`] (a client address): no one client — and so none of its
//! connections or streams — may hold more than its share of the bound, so that one address
//! holding bodies open cannot refuse everyone else. The per-client counts live in a map whose
//! entries go when their count reaches zero: it never holds more entries than there are clients
//! holding bytes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::gateway::error::RouteError;

/// Whose bytes are counted together: an IPv4 address, or an IPv6 /64 network (the least a host
/// is given, so one host cannot take a share per address it holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(IpAddr);

impl Client {
    /// The client at `ip` (an IPv4-mapped IPv6 address is its IPv4 address).
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let network = u128::from(v6) & !((1u128 << 64) - 1);
                Self(IpAddr::V6(network.into()))
            }
            v4 => Self(v4),
        }
    }
}

/// Bytes held now, in all and per client.
#[derive(Debug, Default)]
struct Held {
    total: usize,
    /// Only clients holding at least a byte.
    clients: HashMap<Client, usize>,
}

#[derive(Debug)]
struct Shared {
    held: Mutex<Held>,
    limit: usize,
    /// The most one client may hold.
    share: usize,
}

/// Bytes held by every reservation, and the bounds on them.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    shared: Arc<Shared>,
}

impl BodyBudget {
    /// A budget of `limit` bytes, any of which one client may hold.
    pub fn new(limit: usize) -> Self {
        Self::with_share(limit, limit)
    }

    /// A budget of `limit` bytes, of which one client may hold at most `share`.
    pub fn with_share(limit: usize, share: usize) -> Self {
        let shared = Shared { held: Mutex::new(Held::default()), limit, share: share.min(limit) };
        Self { shared: Arc::new(shared) }
    }

    /// The share of `limit` that is `percent` of it (at least a byte).
    pub fn share_of(limit: usize, percent: u32) -> usize {
        let share = (limit as u128 * u128::from(percent.min(100)) / 100) as usize;
        share.max(1)
    }

    /// An empty reservation nobody's share counts (the sidecar's, the admin listener's).
    pub fn reservation(&self) -> Reservation {
        Reservation { budget: self.clone(), client: None, bytes: 0 }
    }

    /// An empty reservation of `client`'s, to grow as a body arrives.
    pub fn reservation_for(&self, client: Client) -> Reservation {
        Reservation { budget: self.clone(), client: Some(client), bytes: 0 }
    }

    /// The bound on bytes held at once.
    pub fn limit(&self) -> usize {
        self.shared.limit
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.shared.held.lock().total
    }

    /// Bytes `client` holds now.
    pub fn held_by(&self, client: Client) -> usize {
        self.shared.held.lock().clients.get(&client).copied().unwrap_or(0)
    }

    /// Clients holding bytes now.
    pub fn clients(&self) -> usize {
        self.shared.held.lock().clients.len()
    }

    /// Takes `more` bytes for `client`, or refuses them past either bound.
    fn take(&self, client: Option<Client>, more: usize) -> Result<(), RouteError> {
        let s = &*self.shared;
        let mut held = s.held.lock();
        if held.total.saturating_add(more) > s.limit {
            return Err(RouteError::Overloaded { held: held.total, limit: s.limit });
        }
        if let Some(c) = client {
            let mine = held.clients.get(&c).copied().unwrap_or(0);
            if mine.saturating_add(more) > s.share {
                return Err(RouteError::OverShare { held: mine, share: s.share });
            }
            if more > 0 {
                held.clients.insert(c, mine + more);
            }
        }
        held.total += more;
        Ok(())
    }

    /// Gives back `bytes` of `client`'s.
    fn give(&self, client: Option<Client>, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut held = self.shared.held.lock();
        held.total = held.total.saturating_sub(bytes);
        if let Some(c) = client
            && let Some(mine) = held.clients.get_mut(&c)
        {
            *mine = mine.saturating_sub(bytes);
            if *mine == 0 {
                held.clients.remove(&c);
            }
        }
    }
}

/// One request's share of a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: BodyBudget,
    client: Option<Client>,
    bytes: usize,
}

impl Reservation {
    /// Reserves `more` bytes, or refuses them when the budget, or the client's share of it,
    /// would be exceeded.
    pub fn grow(&mut self, more: usize) -> Result<(), RouteError> {
        self.budget.take(self.client, more)?;
        self.bytes += more;
        Ok(())
    }

    /// Gives back every byte held, keeping the reservation (and its client) for more.
    pub fn release(&mut self) {
        self.budget.give(self.client, std::mem::take(&mut self.bytes));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(ip: &str) -> Client {
        Client::of(ip.parse().expect("an address"))
    }

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

    #[test]
    fn one_client_holds_at_most_its_share_and_others_still_get_in() {
        let budget = BodyBudget::with_share(100, BodyBudget::share_of(100, 25));
        let (greedy, other) = (client("127.0.0.2"), client("127.0.0.1"));
        let mut held: Vec<Reservation> = Vec::new();
        for _ in 0..3 {
            let mut r = budget.reservation_for(greedy);
            if r.grow(10).is_ok() {
                held.push(r);
            }
        }
        let mut one_more = budget.reservation_for(greedy);
        let e = one_more.grow(10).expect_err("past the share, over every connection of the client");
        assert_eq!((e.status(), e.code(), e.retry_soon()), (503, "overloaded", true));
        assert_eq!((held.len(), budget.held_by(greedy)), (2, 20), "a refused chunk is not held");
        let mut theirs = budget.reservation_for(other);
        theirs.grow(25).expect("another client has its own share");
        assert_eq!((budget.held(), budget.clients()), (45, 2));
        one_more.grow(5).expect("the last bytes of the share");
        drop(held);
        drop(one_more);
        assert_eq!(budget.held_by(greedy), 0);
        theirs.release();
        assert_eq!((budget.held(), budget.clients()), (0, 0), "a client holding nothing has no entry");
        theirs.grow(25).expect("a released reservation grows again, as its client's");
        assert_eq!(budget.held_by(other), 25);
    }

    #[test]
    fn clients_are_addresses_and_ipv6_networks() {
        let cases = [
            ("10.0.0.1", "10.0.0.1", true),
            ("10.0.0.1", "10.0.0.2", false),
            ("::ffff:10.0.0.1", "10.0.0.1", true),
            ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", true),
            ("2001:db8:1:2::1", "2001:db8:1:3::1", false),
        ];
        for (a, b, same) in cases {
            assert_eq!(client(a) == client(b), same, "{a} and {b}");
        }
    }

    #[test]
    fn shares_are_percentages_of_the_limit() {
        assert_eq!(BodyBudget::share_of(1000, 25), 250);
        assert_eq!(BodyBudget::share_of(1000, 100), 1000);
        assert_eq!(BodyBudget::share_of(3, 1), 1, "never zero");
        assert_eq!(BodyBudget::share_of(64 << 30, 100), 64 << 30, "no overflow");
    }
}
