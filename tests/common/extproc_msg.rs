//! The messages Envoy's ext_proc filter sends an external processor, built as Envoy builds them:
//! request headers, body chunks, response headers and body, and the metadata it attaches (the
//! `envoy.lb` fields a gateway reports, the subset hint it passes on). The integration tests and
//! `benches/picker.rs` share this one file, so the two speak the same protocol.

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};

/// The headers Envoy sends for a `POST` to `path` (a body follows).
pub fn post_headers(path: &str) -> ProcessingRequest {
    request_headers(&[(":method", "POST"), (":path", path)], false)
}

/// A request's headers; `end_of_stream` when the request has no body.
pub fn request_headers(pairs: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    wrap(Request::RequestHeaders(HttpHeaders {
        headers: Some(header_map(pairs, true)),
        end_of_stream,
        ..Default::default()
    }))
}

/// A request's headers with the values in the older `value` field instead of `raw_value` (as
/// Envoy sent them before `raw_value`, and as some processors' clients still do).
pub fn request_headers_in_value_field(pairs: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    wrap(Request::RequestHeaders(HttpHeaders {
        headers: Some(header_map(pairs, false)),
        end_of_stream,
        ..Default::default()
    }))
}

/// One chunk of a request's body; `end_of_stream` on the last.
pub fn request_body(body: impl Into<Vec<u8>>, end_of_stream: bool) -> ProcessingRequest {
    wrap(Request::RequestBody(HttpBody { body: body.into(), end_of_stream, ..Default::default() }))
}

/// `body` cut into chunks of `size` bytes (at least one chunk), the last marked end of stream.
pub fn request_body_chunks(body: &[u8], size: usize) -> Vec<ProcessingRequest> {
    if body.is_empty() {
        return vec![request_body(Vec::new(), true)];
    }
    let n = body.len().div_ceil(size);
    body.chunks(size).enumerate().map(|(i, part)| request_body(part, i + 1 == n)).collect()
}

/// A response's headers.
pub fn response_headers(pairs: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    wrap(Request::ResponseHeaders(HttpHeaders {
        headers: Some(header_map(pairs, true)),
        end_of_stream,
        ..Default::default()
    }))
}

/// The response headers of a model server's `200` event stream.
pub fn sse_response_headers() -> ProcessingRequest {
    response_headers(&[(":status", "200"), ("content-type", "text/event-stream")], false)
}

/// One chunk of a response's body; `end_of_stream` on the last.
pub fn response_body(body: impl Into<Vec<u8>>, end_of_stream: bool) -> ProcessingRequest {
    wrap(Request::ResponseBody(HttpBody { body: body.into(), end_of_stream, ..Default::default() }))
}

/// `message` with Envoy's `metadata_context` attached.
pub fn with_metadata(message: ProcessingRequest, metadata: Metadata) -> ProcessingRequest {
    ProcessingRequest { metadata_context: Some(metadata), ..message }
}

/// `envoy.lb` metadata with these string fields (what a gateway reports, e.g. the endpoint
/// that served in `x-gateway-destination-endpoint-served`).
pub fn lb_metadata(fields: &[(&str, &str)]) -> Metadata {
    let lb = Struct { fields: fields.iter().map(|(k, v)| ((*k).to_owned(), string(v))).collect() };
    Metadata { filter_metadata: [("envoy.lb".to_owned(), lb)].into_iter().collect(), ..Default::default() }
}

/// The key of the subset hint's endpoint list.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";

/// The subset hint a gateway passes in `envoy.lb.subset_hint`: the endpoints a pick must come
/// from.
pub fn subset_hint(entries: &[&str]) -> Metadata {
    subset_hint_with(SUBSET_KEY, string_list(entries))
}

/// `envoy.lb.subset_hint` metadata with `value` under `key` (a list or a comma-separated
/// string under [`SUBSET_KEY`], or anything under another key).
pub fn subset_hint_with(key: &str, value: Value) -> Metadata {
    let inner = Struct { fields: [(key.to_owned(), value)].into_iter().collect() };
    Metadata {
        filter_metadata: [("envoy.lb.subset_hint".to_owned(), inner)].into_iter().collect(),
        ..Default::default()
    }
}

/// A protobuf list of strings.
pub fn string_list<S: AsRef<str>>(entries: &[S]) -> Value {
    let values = entries.iter().map(|e| string(e.as_ref())).collect();
    Value { kind: Some(Kind::ListValue(ListValue { values })) }
}

/// A protobuf string.
pub fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_owned())) }
}

fn header_map(pairs: &[(&str, &str)], raw: bool) -> HeaderMap {
    let header = |(k, v): &(&str, &str)| {
        let (value, raw_value) =
            if raw { (String::new(), v.as_bytes().to_vec()) } else { ((*v).to_owned(), Vec::new()) };
        HeaderValue { key: (*k).into(), value, raw_value }
    };
    HeaderMap { headers: pairs.iter().map(header).collect() }
}

fn wrap(request: Request) -> ProcessingRequest {
    ProcessingRequest { request: Some(request), ..Default::default() }
}
