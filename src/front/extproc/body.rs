//! A request body arriving over an ext_proc stream: held to the same pace as the proxy's bodies
//! (time between body messages, the least rate over every stretch of time, an overall deadline,
//! all from the stream's request headers), reserved in the gateway's body budget as its client's,
//! and refused with the proxy's answer (a 408, a 413, a 503) as an `ImmediateResponse`.
//!
//! The client is the last `x-forwarded-for` entry of the request's headers — the address Envoy
//! appended — or, without one, the gRPC peer (Envoy itself); each stream counts as one
//! connection of it.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, ProcessingResponse};
use tokio::time::Instant;

use super::StreamState;
use super::reply::immediate;
use crate::front::listen::{Pace, Pacer};
use crate::gateway::budget::Client;
use crate::gateway::config::BodyMode;
use crate::gateway::error::RouteError;
use crate::routing::request::RequestError;

/// Header naming the client's address, Envoy's hop last.
pub(super) const FORWARDED_FOR: &str = "x-forwarded-for";

/// The address the last entry of `x-forwarded-for` names (an address, with or without a port),
/// if it names one.
pub(super) fn last_forwarded(value: &str) -> Option<IpAddr> {
    let last = value.rsplit(',').next()?.trim();
    last.parse::<IpAddr>().ok().or_else(|| last.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

impl StreamState {
    /// The stream's client from its request headers' `x-forwarded-for` (`forwarded`), else its
    /// gRPC peer; the body's bytes are reserved as that client's from here on.
    pub(super) fn attribute(&mut self, forwarded: Option<&str>) {
        let ip = forwarded.and_then(last_forwarded).or(self.peer.map(|p| p.ip()));
        // Bytes already held (a body before its headers) stay as they were reserved.
        if let Some(ip) = ip
            && self.body.is_empty()
        {
            self.reservation = self.gateway.body_budget().reservation_for(Client::of(ip));
        }
    }

    /// The body is expected from `now` on: its pace starts (once: repeated headers do not
    /// restart it). A buffered body comes whole, in one message once Envoy has it all, so only
    /// its deadline applies; a body Envoy does not send is not awaited.
    pub(super) fn expect_body(&mut self, now: Instant) {
        let pace = match self.request_mode {
            BodyMode::FullDuplexStreamed | BodyMode::Streamed => self.pace,
            BodyMode::Buffered => Pace { stall: self.pace.deadline, min_rate: 0, ..self.pace },
            BodyMode::None => return,
        };
        if !self.body_ended && self.pacer.is_none() {
            self.pacer = Some(Pacer::new(pace, now));
        }
    }

    /// The request phase is over (its trailers came, or the response's first message): no
    /// more body is awaited.
    pub(super) fn body_over(&mut self) {
        self.pacer = None;
    }

    /// When the body's next message is due, while one is awaited.
    pub(super) fn body_due(&self) -> Option<Instant> {
        self.pacer.as_ref().map(Pacer::due)
    }

    /// The body's next message did not come in time: it is refused with a 408.
    pub(super) fn body_late(&mut self) -> Vec<ProcessingResponse> {
        let Some(pacer) = self.pacer.take() else { return Vec::new() };
        let slow = pacer.verdict(Instant::now().max(pacer.due()));
        self.refuse_body(&RouteError::SlowBody(slow.to_string()))
    }

    /// A piece of the request body: held (and reserved), refused, or — at its end — decided.
    pub(super) fn request_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        let now = Instant::now();
        let pace = self.pace;
        // A body before its headers is paced from its first piece.
        let pacer = self.pacer.get_or_insert_with(|| Pacer::new(pace, now));
        if let Err(slow) = pacer.received(b.body.len(), now) {
            return self.refuse_body(&RouteError::SlowBody(slow.to_string()));
        }
        // Refuse as soon as the body is too large, or the bytes held for every request (or for
        // this client) are at their bound, rather than holding more.
        let (size, limit) = (self.body.len() + b.body.len(), self.gateway.max_body_bytes());
        let held = if size > limit {
            Err(RouteError::BadRequest(RequestError::TooLarge { size, limit }))
        } else {
            self.reservation.grow(b.body.len())
        };
        if let Err(e) = held {
            return self.refuse_body(&e);
        }
        self.body.extend_from_slice(&b.body);
        if b.end_of_stream {
            self.body_ended = true;
            self.pacer = None;
            self.decide(true)
        } else {
            Vec::new()
        }
    }

    /// Refuses the request for its body, letting go of what was held.
    fn refuse_body(&mut self, e: &RouteError) -> Vec<ProcessingResponse> {
        self.body = Vec::new();
        self.reservation.release();
        self.pacer = None;
        self.done = true;
        vec![immediate(&self.gateway.refuse(e))]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProcessingRequest};

    use super::*;
    use crate::front::extproc::fuzz::endpointless_gateway;
    use crate::gateway::config::ExtProcConfig;

    fn headers(pairs: &[(&str, &str)]) -> ProcessingRequest {
        let headers = pairs
            .iter()
            .map(|(k, v)| HeaderValue { key: (*k).into(), raw_value: v.as_bytes().to_vec(), ..Default::default() })
            .collect();
        let h = HttpHeaders { headers: Some(HeaderMap { headers }), ..Default::default() };
        ProcessingRequest { request: Some(Req::RequestHeaders(h)), ..Default::default() }
    }

    fn body(n: usize) -> ProcessingRequest {
        let b = HttpBody { body: vec![b' '; n], ..Default::default() };
        ProcessingRequest { request: Some(Req::RequestBody(b)), ..Default::default() }
    }

    const POST: [(&str, &str); 2] = [(":method", "POST"), (":path", "/v1/completions")];

    /// A stream from `peer`, its bodies held to a 10 s stall timeout and a 20 s deadline.
    fn stream(peer: &str) -> StreamState {
        let mut s = StreamState::new(endpointless_gateway(), Arc::new(ExtProcConfig::default()));
        let s10 = Duration::from_secs(10);
        s.pace = Pace { stall: s10, min_rate: 0, window: s10, deadline: 2 * s10 };
        s.peer = Some(peer.parse().expect("an address"));
        s.attribute(None);
        s
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_is_paced_from_its_headers_once_held_as_its_clients_and_refused_late() {
        let mut s = stream("127.0.0.2:5000");
        let budget = s.gateway.body_budget().clone();
        let (t0, sec) = (Instant::now(), Duration::from_secs(1));
        s.handle(headers(&POST));
        assert_eq!(s.body_due(), Some(t0 + 10 * sec), "the stall timeout, from the headers");
        tokio::time::advance(5 * sec).await;
        assert!(s.handle(body(100)).is_empty());
        let client = Client::of("127.0.0.2".parse().expect("an address"));
        assert_eq!(budget.held_by(client), 100, "held as the gRPC peer's");
        tokio::time::advance(3 * sec).await;
        s.handle(headers(&POST));
        assert_eq!(s.body_due(), Some(t0 + 15 * sec), "repeated headers do not restart the pace");
        tokio::time::advance(6 * sec).await;
        assert!(s.handle(body(100)).is_empty());
        assert_eq!(s.body_due(), Some(t0 + 20 * sec), "the deadline, from the headers");
        tokio::time::advance(6 * sec).await;
        let out = s.body_late();
        let Some(Resp::ImmediateResponse(ir)) = out.first().and_then(|m| m.response.as_ref()) else {
            panic!("an immediate response: {out:?}");
        };
        assert_eq!((ir.status.as_ref().map(|s| s.code), ir.details.as_str()), (Some(408), "request_timeout"));
        assert!(String::from_utf8_lossy(&ir.body).contains("took too long"));
        assert!(s.done && s.body_due().is_none());
        assert_eq!(budget.held(), 0, "given back");
    }

    #[tokio::test(start_paused = true)]
    async fn the_forwarded_client_is_charged_and_a_finished_request_awaits_no_body() {
        let mut s = stream("127.0.0.1:5000");
        let budget = s.gateway.body_budget().clone();
        s.handle(headers(&[POST[0], POST[1], (FORWARDED_FOR, "10.0.0.9, 192.0.2.1")]));
        s.handle(body(10));
        assert_eq!(budget.held_by(Client::of("192.0.2.1".parse().expect("an address"))), 10);
        assert!(s.body_due().is_some());
        // The response starts (Envoy sent the request on without its end): nothing more is
        // awaited, so no refusal can come mid-response.
        let h = HttpHeaders { end_of_stream: false, ..Default::default() };
        s.handle(ProcessingRequest { request: Some(Req::ResponseHeaders(h)), ..Default::default() });
        assert!(s.body_due().is_none() && s.body_late().is_empty());
    }

    #[test]
    fn the_client_is_the_last_forwarded_address() {
        let cases = [
            ("203.0.113.7", Some("203.0.113.7")),
            ("10.0.0.1, 198.51.100.2", Some("198.51.100.2")),
            ("spoofed, 198.51.100.2:5555", Some("198.51.100.2")),
            ("1.2.3.4,[2001:db8::1]:443", Some("2001:db8::1")),
            ("2001:db8::2", Some("2001:db8::2")),
            ("198.51.100.2, unknown", None),
            ("", None),
        ];
        for (header, want) in cases {
            let want: Option<IpAddr> = want.map(|w| w.parse().expect("an address"));
            assert_eq!(last_forwarded(header), want, "{header:?}");
        }
    }
}
