//! Bounds on every timeout, size, count and fraction the config sets. Zero is never meant (a zero idle timeout
//! turns every streamed answer into an empty 200, a zero first-byte timeout every request into
//! a 504), and neither is a number no deployment could want (a request body of 16 EiB): each is
//! refused, by its key, before anything runs.

use super::Config;

/// The longest timeout or interval, in milliseconds: a day.
const MAX_MS: u64 = 86_400_000;
/// The largest size of one thing held in memory at once (a request body, a metrics page, a
/// gRPC message, an endpoints file): 1 GiB.
const MAX_ONE_BYTES: u64 = 1 << 30;
/// The largest `max_buffered_bytes`, every request body at once: 64 GiB.
const MAX_BUFFERED_BYTES: u64 = 64 << 30;

/// The most of one thing counted at once (decisions held, streams open): 16,777,216.
const MAX_COUNT: u64 = 1 << 24;

/// A key's accepted values.
#[derive(Debug, Clone, Copy)]
struct Bound {
    min: u64,
    max: u64,
    /// What the number is, and its bounds in words.
    unit: &'static str,
}

/// A timeout or an interval.
const TIME: Bound = Bound { min: 1, max: MAX_MS, unit: "milliseconds, from 1 to 86400000 (24 h)" };
/// The size of one thing held in memory.
const SIZE: Bound = Bound { min: 1, max: MAX_ONE_BYTES, unit: "bytes, from 1 to 1073741824 (1 GiB)" };
/// A gRPC message: room for Envoy's headers at least.
const MESSAGE: Bound = Bound { min: 1024, max: MAX_ONE_BYTES, unit: "bytes, from 1024 to 1073741824 (1 GiB)" };
/// How many of something may be held or open at once.
const COUNT: Bound = Bound { min: 1, max: MAX_COUNT, unit: "a count, from 1 to 16777216" };
/// Connections one listener holds open at once (each costs a file descriptor and a task).
const CONNECTIONS: Bound = Bound { min: 1, max: 1 << 20, unit: "connections, from 1 to 1048576" };
/// A share of something, in percent.
const PERCENT: Bound = Bound { min: 1, max: 100, unit: "a percentage, from 1 to 100" };
/// Every request body at once.
const BUFFERED: Bound = Bound { min: 1, max: MAX_BUFFERED_BYTES, unit: "bytes, from 1 to 68719476736 (64 GiB)" };

impl Config {
    /// Every timeout and size key set or defaulted, with its value and bounds.
    fn bounded(&self) -> Vec<(String, u64, Bound)> {
        let (p, c, s, h, a) = (&self.proxy, &self.connections, &self.scrape, &self.health, &self.picker_api);
        let mut keys: Vec<(String, u64, Bound)> = [
            ("proxy.connect_timeout_ms", p.connect_timeout_ms, TIME),
            ("proxy.first_byte_timeout_ms", p.first_byte_timeout_ms, TIME),
            ("proxy.idle_timeout_ms", p.idle_timeout_ms, TIME),
            ("proxy.prefill_timeout_ms", p.prefill_timeout_ms, TIME),
            ("connections.header_read_timeout_ms", c.header_read_timeout_ms, TIME),
            ("connections.body_read_timeout_ms", c.body_read_timeout_ms, TIME),
            ("connections.max_connections", c.max_connections as u64, CONNECTIONS),
            ("connections.body_rate_window_ms", c.body_rate_window_ms, TIME),
            ("connections.body_timeout_ms", c.body_timeout_ms, TIME),
            ("connections.max_body_share_percent", u64::from(c.max_body_share_percent), PERCENT),
            (
                "connections.max_connections_per_client_percent",
                u64::from(c.max_connections_per_client_percent),
                PERCENT,
            ),
            ("picker_api.start_timeout_ms", a.start_timeout_ms, TIME),
            ("picker_api.report_timeout_ms", a.report_timeout_ms, TIME),
            ("scrape.interval_ms", s.interval_ms, TIME),
            ("scrape.fast_interval_ms", s.fast_interval_ms, TIME),
            ("scrape.timeout_ms", s.timeout_ms, TIME),
            ("health.unresponsive_ms", h.unresponsive_ms, TIME),
            ("health.backoff_ms", h.backoff_ms, TIME),
            ("health.max_backoff_ms", h.max_backoff_ms, TIME),
            ("max_body_bytes", self.max_body_bytes as u64, SIZE),
            ("max_buffered_bytes", self.max_buffered_bytes as u64, BUFFERED),
            ("scrape.max_bytes", s.max_bytes as u64, SIZE),
            ("extproc.max_message_bytes", self.extproc.max_message_bytes as u64, MESSAGE),
            ("picker_api.max_pending", a.max_pending as u64, COUNT),
            ("picker_api.max_watches", a.max_watches as u64, COUNT),
            ("picker_api.max_watches_per_client", a.max_watches_per_client as u64, COUNT),
        ]
        .into_iter()
        .map(|(key, value, bound)| (key.to_owned(), value, bound))
        .collect();
        if let Some(n) = a.max_pending_per_client {
            keys.push(("picker_api.max_pending_per_client".to_owned(), n as u64, COUNT));
        }
        if let Some(stale) = s.stale_after_ms {
            keys.push(("scrape.stale_after_ms".to_owned(), stale, TIME));
        }
        for (i, pool) in self.pools.iter().enumerate() {
            keys.push((format!("pools[{i}].endpoints_file_max_bytes"), pool.endpoints_file_max_bytes, SIZE));
            if let Some(ev) = &pool.kv_events {
                keys.push((format!("pools[{i}].kv_events.stale_after_ms"), ev.stale_after_ms, TIME));
            }
        }
        keys
    }

    /// Every fraction key, with its value: each more than 0 and at most 1.
    fn fractions(&self) -> Vec<(&'static str, f64)> {
        vec![("picker_api.admission_share", self.picker_api.admission_share)]
    }

    /// The first timeout, size, count or fraction out of its bounds, as `(key, message)`.
    pub(super) fn out_of_bounds(&self) -> Option<(String, String)> {
        let fraction =
            self.fractions().into_iter().find(|(_, value)| !(*value > 0.0 && *value <= 1.0)).map(|(key, value)| {
                (key.to_owned(), format!("must be a fraction, more than 0 and at most 1; got {value}"))
            });
        fraction.or_else(|| {
            self.bounded()
                .into_iter()
                .find(|(_, value, b)| !(b.min..=b.max).contains(value))
                .map(|(key, value, b)| (key, format!("must be {}; got {value}", b.unit)))
        })
    }
}
