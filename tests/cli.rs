//! `kvgate check-config` as a user runs it (on configs and on endpoints files): exit status and
//! what it prints.

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

#[test]
fn an_endpoints_file_is_checked_as_one() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/endpoints");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("config/endpoints exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no endpoints files in {}", dir.display());
    for f in &files {
        check(f, true, &["OK as an endpoints file", "not a kvgate config", "`endpoints_file`", "endpoint "]);
    }
    check(&dir.join("qwen.yaml"), true, &["3 endpoints", "endpoint 127.0.0.1:8101 (qwen-0) role both"]);
    let ranks = config_file("ranks.yaml", "endpoints: [{name: moe, address: '10.0.0.5', ports: [8000, 8001]}]\n");
    check(&ranks, true, &["endpoint 10.0.0.5:8001 (moe-rank-1) role both rank 1"]);
    let no_port = config_file("eps-no-port.yaml", "endpoints: [{address: 10.0.0.1}]\n");
    check(&no_port, false, &["endpoints[0]", "has no port", "looks like an endpoints file"]);
    let bare = config_file("eps-bare.yaml", "- {address: '10.0.0.1:8000'}\n- {address: '10.0.0.2:8000'}\n");
    check(&bare, false, &["looks like an endpoints file", "not under `endpoints:`"]);
}

#[test]
fn sim_subcommand_serves_until_killed() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["sim", "--port", "0", "--time-scale", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("kvgate sim starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("a line");
    let addr = line.trim().rsplit("http://").next().expect("address").to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").expect("write");
    let mut resp = String::new();
    conn.read_to_string(&mut resp).expect("read");
    child.kill().expect("kill");
    child.wait().expect("reaped");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("x-inference-port"), "{resp}");
    let bad = kvgate(&["sim", "--data-parallel-size", "2", "--data-parallel-rank", "5", "--port", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--data-parallel-rank 5"));
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    // `kvgate check-config FILE | head -1`: the reader is gone before kvgate writes.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let minimal = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/minimal.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["check-config", minimal.to_str().expect("utf-8 path")])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("kvgate runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Each setting kvgate accepts but ignores, in a config of its own: check-config passes and
/// prints a warning naming the setting and where it is (file, line, YAML path).
#[test]
fn ignored_settings_are_warned_about_with_their_place() {
    let pool = "pools:\n  - name: a\n    models: [m]\n    endpoints: [{address: '127.0.0.1:1'}]\n    scheduler:\n";
    let cases = [
        (
            "api-version",
            "      apiVersion: inference.networking.x-k8s.io/v1alpha1\n      plugins: [{type: queue-scorer}]\n",
            6,
            "pools[0].scheduler.apiVersion",
        ),
        (
            "auto-tune",
            "      plugins: [{type: approx-prefix-cache-producer, parameters: {autoTune: true}}]\n",
            6,
            "pools[0].scheduler.plugins[0].parameters.autoTune",
        ),
        (
            "peak-prefill",
            "      plugins:\n        - type: prefix-cache-affinity-filter\n          parameters: {peakPrefillThroughput: 20000}\n",
            8,
            "pools[0].scheduler.plugins[0].parameters.peakPrefillThroughput",
        ),
        (
            "lru-size",
            "      plugins:\n        - {type: queue-scorer}\n        - {type: no-hit-lru-scorer, parameters: {lruSize: 64}}\n",
            8,
            "pools[0].scheduler.plugins[1].parameters.lruSize",
        ),
        (
            "unreferenced",
            "      plugins: [{type: queue-scorer}, {type: kv-cache-utilization-scorer}]\n      schedulingProfiles: [{name: default, plugins: [{pluginRef: queue-scorer}]}]\n",
            6,
            "pools[0].scheduler.plugins[1]",
        ),
    ];
    for (name, scheduler, line, at) in cases {
        let path = config_file(&format!("ignored-{name}.yaml"), &format!("{pool}{scheduler}"));
        let located = format!("{}:{line}: {at}", path.display());
        let out = kvgate(&["check-config", path.to_str().expect("utf-8 path")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            text.lines().any(|l| l.starts_with("warning:") && l.contains(&located)),
            "{name}: no warning line with `{located}`:\n{text}"
        );
    }
    // No warning for a config that sets nothing in vain.
    let clean = config_file("ignored-none.yaml", &format!("{pool}      plugins: [{{type: queue-scorer}}]\n"));
    let out = kvgate(&["check-config", clean.to_str().expect("utf-8 path")]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("warning"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// The picker's `maxNumOfEndpoints` and `extproc.max_endpoints` disagreeing is a warning that
/// says which count applies.
#[test]
fn endpoint_counts_that_disagree_are_warned_about() {
    let yaml = "extproc: {max_endpoints: 2}\npools:\n  - name: a\n    models: [m]\n    endpoints: [{address: '127.0.0.1:1'}]\n    scheduler:\n      plugins:\n        - {type: max-score-picker, parameters: {maxNumOfEndpoints: 4}}\n";
    let path = config_file("endpoint-counts.yaml", yaml);
    let located =
        format!("warning: pool `a`: {}:8: pools[0].scheduler.plugins[0].parameters.maxNumOfEndpoints", path.display());
    check(&path, true, &[&located, "extproc.max_endpoints 2 (line 1)", "list 2 endpoints"]);
}

/// Runs `kvgate serve --config path` and collects its stderr lines until one satisfies `until`
/// (returned last) or 20 s pass; then stops it.
fn serve_until(path: &Path, until: impl Fn(&str) -> bool) -> (bool, Vec<String>) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["serve", "--config", path.to_str().expect("utf-8 path")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvgate serve starts");
    let stderr = child.stderr.take().expect("piped stderr");
    // Read on a thread so that a kvgate that never says it does not hang the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = until(&line);
                seen.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    (found, seen)
}

/// `kvgate serve` logs the same warnings when it starts.
#[test]
fn serve_logs_ignored_settings() {
    let yaml = "admin_addr: 127.0.0.1:0\ngrpc_addr: 127.0.0.1:0\npools:\n  - name: a\n    models: [m]\n    endpoints: [{address: '127.0.0.1:1'}]\n    scheduler:\n      plugins:\n        - {type: no-hit-lru-scorer, parameters: {lruSize: 64}}\n";
    let path = config_file("serve-ignored.yaml", yaml);
    let located = format!("{}:9: pools[0].scheduler.plugins[0].parameters.lruSize", path.display());
    let (found, seen) = serve_until(&path, |line| line.contains("warning") && line.contains(&located));
    assert!(found, "no warning line with `{located}` in:\n{}", seen.join("\n"));
}

/// `kvgate serve` warns once at start when the picker API is open beyond loopback: a gRPC
/// listener on every interface with neither a token nor client certificates.
#[test]
fn serve_warns_of_an_open_picker_api() {
    let pool = "pools:\n  - name: a\n    models: [m]\n    endpoints: [{address: '127.0.0.1:1'}]\n";
    let open = "open to every client";
    let serving = |line: &str| line.contains("kvgate serving");
    for (name, extra, warned) in
        [("open", "", true), ("token", "picker_api: {token: s3cret}\n", false), ("loopback", "", false)]
    {
        let grpc = if name == "loopback" { "127.0.0.1:0" } else { "0.0.0.0:0" };
        let yaml = format!("admin_addr: 127.0.0.1:0\ngrpc_addr: {grpc}\n{extra}{pool}");
        let path = config_file(&format!("serve-picker-{name}.yaml"), &yaml);
        let (started, seen) = serve_until(&path, serving);
        assert!(started, "{name}: kvgate did not start:\n{}", seen.join("\n"));
        let warnings: Vec<&String> = seen.iter().filter(|l| l.contains(open)).collect();
        assert_eq!(warnings.len(), usize::from(warned), "{name}:\n{}", seen.join("\n"));
        if warned {
            assert!(warnings[0].contains("WARN") && warnings[0].contains("picker_api.token_file"), "{}", warnings[0]);
        }
        assert!(!seen.join("\n").contains("s3cret"), "the token is never logged");
    }
}

/// Zero or absurd timeouts and sizes are refused, each by its key, file and line.
#[test]
fn timeouts_and_sizes_out_of_bounds_are_refused_with_their_place() {
    let pool = "pools:\n  - name: a\n    models: [m]\n    endpoints: [{address: '127.0.0.1:1'}]\n";
    let cases = [
        ("idle-zero", "proxy:\n  idle_timeout_ms: 0\n", 2, "proxy.idle_timeout_ms", "got 0"),
        (
            "first-byte-zero",
            "proxy: {attempts: 2, first_byte_timeout_ms: 0}\n",
            1,
            "proxy.first_byte_timeout_ms",
            "got 0",
        ),
        ("body-max", "admin_addr: 127.0.0.1:0\nmax_body_bytes: 18446744073709551615\n", 2, "max_body_bytes", "1 GiB"),
        ("report-zero", "picker_api:\n  report_timeout_ms: 0\n", 2, "picker_api.report_timeout_ms", "24 h"),
    ];
    for (name, section, line, key, why) in cases {
        let path = config_file(&format!("bounds-{name}.yaml"), &format!("{section}{pool}"));
        check(&path, false, &[&format!("{}:{line}: {key}: must be", path.display()), why]);
    }
    let file_limit = config_file("bounds-file.yaml", &format!("{pool}    endpoints_file_max_bytes: 0\n"));
    check(&file_limit, false, &[&format!("{}:5: pools[0].endpoints_file_max_bytes", file_limit.display())]);
}

/// An endpoints file that is not a regular file is refused by check-config, given directly or
/// through a config, without waiting on a FIFO or reading a device.
#[test]
fn endpoints_files_that_are_not_regular_files_are_refused() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let fifo = dir.join("fifo-endpoints.yaml");
    std::fs::remove_file(&fifo).ok();
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs").success());
    let zero = dir.join("zero-endpoints.yaml");
    std::fs::remove_file(&zero).ok();
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    for (file, what) in [(&fifo, "a FIFO (named pipe)"), (&zero, "a character device")] {
        let refused = format!("{} is {what}, not a regular file", file.display());
        check(file, false, &[&refused]);
        let cfg = config_file(
            "file-not-regular.yaml",
            &format!("pools:\n  - name: a\n    models: [m]\n    endpoints_file: '{}'\n", file.display()),
        );
        check(&cfg, false, &[&format!("{}:4: pools[0].endpoints_file: {refused}", cfg.display())]);
    }
    let big = config_file("big-endpoints.yaml", &format!("# {}\nendpoints: []\n", "x".repeat(100)));
    let cfg = config_file(
        "file-too-large.yaml",
        &format!(
            "pools:\n  - name: a\n    models: [m]\n    endpoints_file: '{}'\n    endpoints_file_max_bytes: 64\n",
            big.display()
        ),
    );
    check(
        &cfg,
        false,
        &["pools[0].endpoints_file", "is 117 bytes, over the limit of 64 bytes (`endpoints_file_max_bytes`)"],
    );
}

/// check-config shows each pool's flow control as resolved, and its objectives.
#[test]
fn check_config_describes_flow_control() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/flow-control.yaml");
    let out = kvgate(&["check-config", path]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("flow control: on; gate Accounting; TTL 60000 ms"), "{text}");
    assert!(text.contains("requests learned from its scrapes"), "{text}");
    assert!(text.contains("objectives: interactive → 10, standard → 0, batch → -1"), "{text}");
    let minimal = kvgate(&["check-config", concat!(env!("CARGO_MANIFEST_DIR"), "/config/minimal.yaml")]);
    assert!(String::from_utf8_lossy(&minimal.stdout).contains("flow control: off"));
}

/// check-config says how a replica finds its peers.
#[test]
fn check_config_describes_the_cluster() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/replicas.yaml");
    let out = kvgate(&["check-config", path]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("cluster: peers from the list 10.0.0.11:9002, 10.0.0.12:9002, 10.0.0.13:9002"), "{text}");
    assert!(text.contains("authenticated by the token file"), "{text}");
    let minimal = kvgate(&["check-config", concat!(env!("CARGO_MANIFEST_DIR"), "/config/minimal.yaml")]);
    assert!(String::from_utf8_lossy(&minimal.stdout).contains("cluster: off"));
    let tokenless = config_file(
        "tokenless-cluster.yaml",
        &std::fs::read_to_string(path).expect("example").replace("  token_file: /var/run/kvgate/cluster-token\n", ""),
    );
    check(&tokenless, false, &["cluster.token", "set `token` or `token_file`"]);
    let text = std::fs::read_to_string(path).expect("example");
    let with_tls = config_file("tls-cluster.yaml", &format!("extproc: {{self_signed_tls: true}}\n{text}"));
    check(&with_tls, false, &["cluster", "plaintext gRPC"]);
}
