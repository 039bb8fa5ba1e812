//! Fuzz target: ext_proc message sequences on one stream. The bytes are frames, each prefixed
//! by its length (one byte); a frame that decodes as a `ProcessingRequest` (protobuf decodes
//! most bytes) is handled, as the gRPC codec would hand it over.
#![no_main]

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use prost::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut msgs = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (frame, after) = tail.split_at(usize::from(len).min(tail.len()));
        rest = after;
        if let Ok(m) = ProcessingRequest::decode(frame) {
            msgs.push(m);
        }
    }
    kvgate::fuzzing::extproc(msgs);
});
