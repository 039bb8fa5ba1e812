//! Front-ends: they translate between the wire and the gateway and hold no scheduling or
//! accounting logic. [`http`] has the pieces they share (upstream client, request ids, header
//! names, body reading, refusals as responses, listeners); [`proxy`] is the OpenAI reverse
//! proxy, [`handoff`] its prefill → decode hand-off (shared with [`sidecar`]), [`admin`] the
//! admin API, [`extproc`] the Envoy endpoint picker, and [`usage`] reads token usage from
//! responses for both.

pub mod admin;
pub mod extproc;
pub mod handoff;
pub mod http;
pub mod listen;
pub mod proxy;
pub mod sidecar;
pub mod usage;
