//! What kvgate sends back on an ext_proc stream: header and metadata mutations, the request
//! body in chunks, and refusals as `ImmediateResponse`s with an OpenAI-shaped JSON body.

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, ImmediateResponse, ProcessingResponse,
    StreamedBodyResponse, body_mutation::Mutation,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use super::{CHUNK, LB_NAMESPACE};
use crate::front::http::DESTINATION_HEADER;
use crate::gateway::answer::Answer;

pub(super) fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.into(), raw_value: value.as_bytes().to_vec(), ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

pub(super) fn string_value(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": dest}}`.
pub(super) fn lb_metadata(dest: &str) -> Struct {
    let inner = Struct { fields: [(DESTINATION_HEADER.to_owned(), string_value(dest))].into_iter().collect() };
    Struct { fields: [(LB_NAMESPACE.to_owned(), Value { kind: Some(Kind::StructValue(inner)) })].into_iter().collect() }
}

pub(super) fn response(r: Resp) -> ProcessingResponse {
    ProcessingResponse { response: Some(r), ..Default::default() }
}

/// The body sent back in streamed chunks of at most [`CHUNK`] bytes, the last marked.
pub(super) fn body_chunks(body: Vec<u8>) -> Vec<ProcessingResponse> {
    let chunk = |bytes: Vec<u8>, last: bool| {
        response(Resp::RequestBody(BodyResponse {
            response: Some(CommonResponse {
                body_mutation: Some(BodyMutation {
                    mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                        body: bytes,
                        end_of_stream: last,
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
        }))
    };
    if body.is_empty() {
        return vec![chunk(Vec::new(), true)];
    }
    let n = body.len().div_ceil(CHUNK);
    body.chunks(CHUNK).enumerate().map(|(i, c)| chunk(c.to_vec(), i + 1 == n)).collect()
}

/// One of kvgate's own answers as an `ImmediateResponse`: its status, headers (the content type
/// when it has a body) and body, with its code as the details of Envoy's access log.
pub(super) fn immediate(a: &Answer) -> ProcessingResponse {
    let mut set = Vec::new();
    if !a.body.is_empty() {
        set.push(set_header("content-type", "application/json"));
    }
    set.extend(a.all_headers().map(|(k, v)| set_header(k, v)));
    response(Resp::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus { code: i32::from(a.status) }),
        headers: Some(HeaderMutation { set_headers: set, ..Default::default() }),
        body: a.body.clone().into_bytes(),
        details: a.code.to_owned(),
        ..Default::default()
    }))
}
