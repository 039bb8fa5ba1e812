//! Generates kvgate's own gRPC API (`proto/kvgate/v1`) at build time: the protos are compiled in
//! pure Rust (no `protoc` needed), then prost writes the messages and tonic the service; the
//! descriptor set is kept for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let protos = ["proto/kvgate/v1/picker.proto"];
    let descriptors = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("kvgate_v1_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
