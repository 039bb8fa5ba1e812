//! Front-ends: they translate between the wire and the gateway (a request's lifecycle events in,
//! kvgate's own answers out) and hold no scheduling or accounting logic. [`http`] has the pieces
//! they share (upstream client, request ids, header names, body reading, answers as responses,
//! the relay), [`listen`] the listeners; [`proxy`] is the OpenAI reverse proxy, [`handoff`] its
//! prefill → decode hand-off (shared with `tools::sidecar`), [`admin`] the admin API,
//! [`extproc`] the Envoy endpoint picker and [`picker`] kvgate's own gRPC picker API.

pub(crate) mod admin;
pub(crate) mod extproc;
pub(crate) mod handoff;
pub(crate) mod http;
pub(crate) mod listen;
pub mod picker;
pub(crate) mod proxy;
