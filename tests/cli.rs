//! `kvgate check-config` as a user runs it: exit status and what it prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kvgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvgate")).args(args).output().expect("kvgate runs")
}

/// Writes `yaml` to a fresh file under the target directory and returns its path.
fn config_file(name: &str, yaml: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write config");
    path
}

fn check(path: &Path, ok: bool, needles: &[&str]) {
    let out = kvgate(&["check-config", path.to_str().expect("utf-8 path")]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.success(), ok, "{}: {text}", path.display());
    for n in needles {
        assert!(text.contains(n), "{}: output lacks `{n}`:\n{text}", path.display());
    }
}

#[test]
fn valid_config_prints_the_resolved_scheduler() {
    let design = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/design-example.yaml");
    check(
        &design,
        true,
        &["pool `llama`", "127.0.0.1:8003", "rank 1", "prefix-cache-scorer", "weight 3", "max-score-picker"],
    );
    let minimal = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/minimal.yaml");
    check(&minimal, true, &["prefix-cache-affinity-filter", "no-hit-lru-scorer"]);
}

#[test]
fn invalid_configs_fail_saying_what_and_where() {
    let unknown = config_file(
        "unknown-plugin.yaml",
        "pools:\n  - name: a\n    models: [m]\n    endpoints: [{address: '127.0.0.1:1'}]\n    scheduler: {plugins: [{type: psychic-scorer}]}\n",
    );
    check(&unknown, false, &["pools[0].scheduler.plugins[0].type", "psychic-scorer", "valid types:", "queue-scorer"]);
    let no_port = config_file("no-port.yaml", "pools: [{name: a, models: [m], endpoints: [{address: 10.0.0.1}]}]\n");
    check(&no_port, false, &["pools[0].endpoints[0]", "has no port"]);
    let broken = config_file("broken.yaml", "pools: [ {name: a\n");
    check(&broken, false, &["broken.yaml"]);
    check(Path::new("/nonexistent/kvgate.yaml"), false, &["cannot read /nonexistent/kvgate.yaml"]);
}
