//! Generates kvgate's own gRPC API (`proto/kvgate/v1`) at build time: the protos are compiled in
//! pure Rust (no `protoc` needed), then prost writes the messages and tonic the service; the
//! descriptor set is kept for gRPC reflection. Envoy's ext_proc service is described to
//! reflection too: its protos ship with the `envoy-types` crate, which generates its Rust types
//! but no descriptor set, so they are compiled here into one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The ext_proc service's file, within `envoy-types`' proto folders.
const EXT_PROC_PROTO: &str = "envoy/service/ext_proc/v3/external_processor.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // A new envoy-types may ship new ext_proc protos.
    println!("cargo:rerun-if-changed=Cargo.lock");
    let protos = ["proto/kvgate/v1/picker.proto", "proto/kvgate/v1/cluster.proto"];
    let descriptors = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("kvgate_v1_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    std::fs::write(out.join("ext_proc_descriptor.bin"), ext_proc_descriptor_set())?;
    Ok(())
}

/// The encoded descriptor set of Envoy's ext_proc service and every file it imports; an empty
/// set (with a warning) when `envoy-types`' protos cannot be found, so a build from an unusual
/// source layout still succeeds, only without ext_proc in reflection.
fn ext_proc_descriptor_set() -> Vec<u8> {
    let Some(root) = envoy_types_dir() else {
        println!("cargo:warning=envoy-types' protos not found: gRPC reflection will not describe ext_proc");
        return Vec::new();
    };
    let includes: Vec<PathBuf> = std::fs::read_dir(root.join("proto"))
        .map(|dir| dir.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    let compiled = protox::Compiler::new(&includes).and_then(|mut c| {
        c.include_imports(true).include_source_info(false).open_file(EXT_PROC_PROTO)?;
        Ok(c.encode_file_descriptor_set())
    });
    match compiled {
        Ok(set) => set,
        Err(e) => {
            println!("cargo:warning=compiling {EXT_PROC_PROTO} from {}: {e}", root.display());
            Vec::new()
        }
    }
}

/// Where the `envoy-types` package this build uses lies: as cargo says (whatever the source:
/// registry, vendored, patched), else in cargo's registry cache at the locked version.
fn envoy_types_dir() -> Option<PathBuf> {
    from_cargo_metadata().or_else(from_registry_cache)
}

fn from_cargo_metadata() -> Option<PathBuf> {
    let cargo = std::env::var_os("CARGO")?;
    let manifest = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR")?).join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["metadata", "--format-version", "1", "--offline", "--locked"]).arg("--manifest-path").arg(manifest);
    if let Ok(target) = std::env::var("TARGET") {
        cmd.args(["--filter-platform", &target]);
    }
    let out = cmd.output().ok().filter(|o| o.status.success())?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let package = meta["packages"].as_array()?.iter().find(|p| p["name"] == "envoy-types")?;
    let dir = Path::new(package["manifest_path"].as_str()?).parent()?.to_owned();
    dir.join("proto").is_dir().then_some(dir)
}

fn from_registry_cache() -> Option<PathBuf> {
    let lock = std::fs::read_to_string(Path::new(&std::env::var_os("CARGO_MANIFEST_DIR")?).join("Cargo.lock")).ok()?;
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("\nname = \"envoy-types\"\n"))?
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))?
        .trim_end_matches('"')
        .to_owned();
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    std::fs::read_dir(home.join("registry").join("src"))
        .ok()?
        .filter_map(Result::ok)
        .map(|index| index.path().join(format!("envoy-types-{version}")))
        .find(|dir| dir.join("proto").is_dir())
}
