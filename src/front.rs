//! Front-ends: they translate between the wire and the gateway and hold no scheduling or
//! accounting logic. [`http`] has the pieces they share (upstream client, request ids, header
//! names, body reading, refusals as responses, listeners); [`proxy`] is the OpenAI reverse
//! proxy, [`handoff`] its prefill → decode hand-off (shared with `tools::sidecar`), [`admin`] the
//! admin API, [`extproc`] the Envoy endpoint picker, [`picker`] kvgate's own gRPC picker API, and [`usage`] reads token usage from
//! responses for both.

pub(crate) mod admin;
pub(crate) mod extproc;
pub(crate) mod handoff;
pub(crate) mod http;
pub(crate) mod listen;
pub mod picker;
pub(crate) mod proxy;
