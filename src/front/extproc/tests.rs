//! Unit tests of the ext_proc stream handling.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::google::protobuf::Struct;

use super::reply::string_value;
use super::reply::{body_chunks, lb_metadata};
use super::*;

/// Metadata fields as a map.
fn struct_fields(s: &Struct) -> BTreeMap<String, String> {
    s.fields
        .iter()
        .map(|(k, v)| {
            let text = match &v.kind {
                Some(Kind::StringValue(x)) => x.clone(),
                Some(Kind::StructValue(inner)) => format!("{:?}", struct_fields(inner)),
                other => format!("{other:?}"),
            };
            (k.clone(), text)
        })
        .collect()
}

#[test]
fn bodies_go_back_in_bounded_chunks() {
    let chunks = body_chunks(vec![7u8; 2 * CHUNK + 5]);
    let sizes: Vec<(usize, bool)> = chunks
        .iter()
        .map(|c| match &c.response {
            Some(Resp::RequestBody(BodyResponse { response: Some(CommonResponse { body_mutation: Some(m), .. }) })) => {
                match &m.mutation {
                    Some(Mutation::StreamedResponse(s)) => (s.body.len(), s.end_of_stream),
                    _ => (0, false),
                }
            }
            _ => (0, false),
        })
        .collect();
    assert_eq!(sizes, [(CHUNK, false), (CHUNK, false), (5, true)]);
    assert_eq!(body_chunks(Vec::new()).len(), 1);
}

#[test]
fn metadata_lists_and_comma_strings() {
    let list = Value {
        kind: Some(Kind::ListValue(envoy_types::pb::google::protobuf::ListValue {
            values: vec![string_value("10.0.0.1:8000"), string_value("10.0.0.2")],
        })),
    };
    assert_eq!(metadata_strings(&list), ["10.0.0.1:8000", "10.0.0.2"]);
    assert_eq!(metadata_strings(&string_value("a:1, b:2")), ["a:1", "b:2"]);
    let m = lb_metadata("10.0.0.1:8000");
    assert!(struct_fields(&m)["envoy.lb"].contains("10.0.0.1:8000"));
}

/// One message Envoy could send, built from proptest's choices.
fn message(kind: u8, text: &str, bytes: &[u8], flag: bool, mode: i32) -> ProcessingRequest {
    use envoy_types::pb::envoy::config::core::v3::HeaderMap;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpTrailers, ProtocolConfiguration};
    let headers = |pairs: Vec<(&str, &str)>| HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .into_iter()
                .map(|(k, v)| HeaderValue { key: k.into(), raw_value: v.as_bytes().to_vec(), ..Default::default() })
                .collect(),
        }),
        end_of_stream: flag,
        ..Default::default()
    };
    let body = HttpBody { body: bytes.to_vec(), end_of_stream: flag, ..Default::default() };
    let request = match kind % 7 {
        0 => Req::RequestHeaders(headers(vec![(":method", if flag { "GET" } else { "POST" }), (":path", text)])),
        1 => Req::RequestBody(body),
        2 => Req::RequestTrailers(HttpTrailers::default()),
        3 => Req::ResponseHeaders(headers(vec![(":status", text), ("content-type", "text/event-stream")])),
        4 => Req::ResponseBody(body),
        5 => Req::ResponseTrailers(HttpTrailers::default()),
        _ => Req::RequestHeaders(headers(vec![(text, text), ("x-request-id", text), (TEST_SELECTION_HEADER, text)])),
    };
    let mut m = ProcessingRequest { request: Some(request), ..Default::default() };
    if mode != 0 {
        m.protocol_config =
            Some(ProtocolConfiguration { request_body_mode: mode, response_body_mode: -mode, ..Default::default() });
    }
    if kind >= 7 {
        let fields = [(SUBSET_KEY.to_owned(), string_value(text))].into_iter().collect();
        m.metadata_context = Some(envoy_types::pb::envoy::config::core::v3::Metadata {
            filter_metadata: [(SUBSET_NAMESPACE.to_owned(), Struct { fields })].into_iter().collect(),
            ..Default::default()
        });
    }
    m
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// ext_proc messages are untrusted: any sequence of them, in any order and with any
    /// contents, is handled without a panic, and a refusal ends the stream.
    #[test]
    fn any_message_sequence_is_handled(
        msgs in proptest::collection::vec(
            (0u8..14, "(/v1/(chat/)?completions|/v1/models|/x|[ -~]{0,12}|10\\.0\\.0\\.1:8000|200|503)",
             proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
             proptest::prelude::any::<bool>(), -2i32..6),
            0..10,
        ),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let (tx, _rx) = tokio::sync::mpsc::channel(64);
            let mut stream = StreamState::new(endpointless_gateway(), Arc::new(ExtProcConfig::default()));
            for (kind, text, bytes, flag, mode) in msgs {
                let _ = stream.handle_and_route(message(kind, &text, &bytes, flag, mode), &tx).await;
                if stream.done {
                    break;
                }
            }
        });
    }

    /// Bytes that decode as a `ProcessingRequest` (protobuf is lenient) are handled too.
    #[test]
    fn decoded_garbage_is_handled(frames in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), 1..6)) {
        use tonic_prost::prost::Message;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let (tx, _rx) = tokio::sync::mpsc::channel(64);
            let mut stream = StreamState::new(endpointless_gateway(), Arc::new(ExtProcConfig::default()));
            for f in frames {
                if let Ok(m) = ProcessingRequest::decode(f.as_slice()) {
                    let _ = stream.handle_and_route(m, &tx).await;
                }
            }
        });
    }
}
