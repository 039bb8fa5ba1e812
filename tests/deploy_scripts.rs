//! The local-run scripts in deploy/envoy (run-local.sh, run-pattern.sh), run end to end in their
//! non-interactive mode (`KVGATE_RUN_FOR=0`) with this build's kvgate and a real Envoy: all comes
//! up, a request goes through Envoy, all stops again; and a port already taken, or a kvgate that
//! dies at start, fails before the ready banner with nothing left running.
//!
//! The listeners the scripts bind are moved to free ports (KVGATE_GRPC_PORT, KVGATE_ADMIN_PORT,
//! KVGATE_PROXY_PORT, ENVOY_PORT, ENVOY_ADMIN_PORT), so other tests holding 9002/9090/8081 do not
//! matter. run-pattern.sh's simulators keep their config's fixed ports (p1: 8001), hence one
//! script at a time within this file.
#![cfg(unix)]

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Serializes the tests of this file.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bound on one script run (startup of every process, one request, shutdown).
const TIMEOUT: Duration = Duration::from_secs(120);

/// The ports a script's listeners go on, all distinct.
struct Ports {
    grpc: u16,
    admin: u16,
    proxy: u16,
    envoy: u16,
    envoy_admin: u16,
}

impl Ports {
    fn new() -> Self {
        let mut p: Vec<u16> = Vec::new();
        while p.len() < 5 {
            let port = common::free_port();
            if !p.contains(&port) {
                p.push(port);
            }
        }
        Self { grpc: p[0], admin: p[1], proxy: p[2], envoy: p[3], envoy_admin: p[4] }
    }

    fn env(&self) -> [(&'static str, String); 5] {
        [
            ("KVGATE_GRPC_PORT", self.grpc.to_string()),
            ("KVGATE_ADMIN_PORT", self.admin.to_string()),
            ("KVGATE_PROXY_PORT", self.proxy.to_string()),
            ("ENVOY_PORT", self.envoy.to_string()),
            ("ENVOY_ADMIN_PORT", self.envoy_admin.to_string()),
        ]
    }

    fn all(&self) -> [u16; 5] {
        [self.grpc, self.admin, self.proxy, self.envoy, self.envoy_admin]
    }
}

/// How a script run ended.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// Processes still in the script's process group after it exited (should be none).
    left: Vec<String>,
}

impl Run {
    /// Everything the script printed, for assertion messages.
    fn output(&self) -> String {
        format!("exit: {}\n--- stdout:\n{}\n--- stderr:\n{}", self.status, self.stdout, self.stderr)
    }
}

/// Runs `deploy/envoy/<script> <args>` with `KVGATE_RUN_FOR=0`, the given ports and kvgate binary,
/// in a process group of its own; past [`TIMEOUT`] the whole group is killed.
fn run_script(script: &str, args: &[&str], ports: &Ports, kvgate: &Path) -> Run {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy").join(script);
    let mut child = Command::new("bash")
        .arg(&path)
        .args(args)
        .env("KVGATE_BIN", kvgate)
        .env("ENVOY_BIN", common::envoy::binary())
        .env("KVGATE_RUN_FOR", "0")
        .envs(ports.env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("bash starts");
    let pgid = child.id();
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("stdout")));
    let err = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            kill_group(pgid);
            let _ = child.wait();
            let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
            panic!(
                "{script} {args:?} still running after {TIMEOUT:?}; killed\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let left = group_members(pgid);
    kill_group(pgid); // in case the assertion on `left` fails: leave nothing behind
    Run { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default(), left }
}

fn kill_group(pgid: u32) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
}

/// The live processes (pid and command line) whose process group is `pgid`, from /proc.
fn group_members(pgid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
        let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
        let state = fields.next()?;
        let pgrp: u32 = fields.nth(1)?.parse().ok()?;
        if pgrp != pgid || state == "Z" {
            return None;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        Some(format!("{pid}: {}", String::from_utf8_lossy(&cmd).replace('\0', " ")))
    })
    .collect()
}

/// Asserts that nothing listens on `ports` any more (each can be bound).
fn assert_free(ports: &[u16], run: &Run) {
    for &p in ports {
        assert!(TcpListener::bind(("127.0.0.1", p)).is_ok(), "port {p} still taken after the script\n{}", run.output());
    }
}

fn assert_stopped(run: &Run) {
    assert!(run.left.is_empty(), "processes left running: {:#?}\n{}", run.left, run.output());
}

fn kvgate() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kvgate"))
}

/// The answer of a chat completion, as the scripts print it after the banner.
const ANSWER: &str = r#""object":"chat.completion""#;

#[test]
fn run_local_comes_up_answers_through_envoy_and_stops() {
    let _serial = serial();
    let ports = Ports::new();
    let run = run_script("run-local.sh", &["original-dst", "2"], &ports, &kvgate());
    assert!(run.status.success(), "run-local.sh failed\n{}", run.output());
    let banner = format!(
        "Envoy on http://127.0.0.1:{} (original-dst), kvgate picking on 127.0.0.1:{}, 2 simulated replicas.",
        ports.envoy, ports.grpc
    );
    assert!(run.stdout.contains(&banner), "no ready banner\n{}", run.output());
    let answer = run.stdout.split_once(&banner).map_or("", |(_, after)| after);
    assert!(answer.contains(ANSWER), "no chat completion after the banner\n{}", run.output());
    assert_stopped(&run);
    assert_free(&ports.all(), &run);
}

#[test]
fn run_local_fails_before_the_banner_when_the_admin_port_is_taken() {
    let _serial = serial();
    let ports = Ports::new();
    let _held = TcpListener::bind(("127.0.0.1", ports.admin)).expect("hold the admin port");
    let run = run_script("run-local.sh", &["original-dst", "2"], &ports, &kvgate());
    assert!(!run.status.success(), "run-local.sh succeeded with its admin port taken\n{}", run.output());
    assert!(!run.stdout.contains("Envoy on http://"), "ready banner despite the taken port\n{}", run.output());
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains(&format!("port {}", ports.admin)) && all.contains("kvgate serve"),
        "the error names neither the port nor kvgate serve\n{}",
        run.output()
    );
    assert_stopped(&run);
    assert_free(&[ports.grpc, ports.envoy, ports.envoy_admin], &run);
}

/// kvgate serve dying at start (a bind error the script's own port check cannot foresee: a
/// wrapper adds a taken `--health-addr`) fails the script too, with the end of kvgate's log, and
/// Envoy is never started.
#[test]
fn run_local_fails_before_the_banner_when_kvgate_serve_dies() {
    let _serial = serial();
    let ports = Ports::new();
    let held = TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let taken = held.local_addr().expect("addr").port();
    let dir = std::env::temp_dir().join(format!("kvgate-deploy-scripts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let wrapper = dir.join("kvgate");
    let real = kvgate();
    std::fs::write(
        &wrapper,
        format!(
            "#!/usr/bin/env bash\nif [ \"$1\" = serve ]; then exec '{0}' \"$@\" --health-addr 127.0.0.1:{taken}; fi\nexec '{0}' \"$@\"\n",
            real.display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let run = run_script("run-local.sh", &["original-dst", "2"], &ports, &wrapper);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!run.status.success(), "run-local.sh succeeded with kvgate serve dead\n{}", run.output());
    assert!(!run.stdout.contains("Envoy on http://"), "ready banner despite kvgate serve dying\n{}", run.output());
    assert!(
        run.stderr.contains("kvgate serve") && run.stderr.contains(&format!("127.0.0.1:{taken}")),
        "the error names neither kvgate serve nor its bind error\n{}",
        run.output()
    );
    assert_stopped(&run);
    assert_free(&ports.all(), &run);
}

/// p1 is the cheapest pattern: one simulator (on 8001, the config's), kvgate, Envoy.
#[test]
fn run_pattern_p1_comes_up_answers_through_envoy_and_stops() {
    let _serial = serial();
    let ports = Ports::new();
    let run = run_script("run-pattern.sh", &["p1"], &ports, &kvgate());
    assert!(run.status.success(), "run-pattern.sh p1 failed\n{}", run.output());
    let banner = format!(
        "Pattern p1: Envoy on http://127.0.0.1:{}, kvgate (config/p1-baseline.yaml) picking on :{} and proxying on :{}.",
        ports.envoy, ports.grpc, ports.proxy
    );
    assert!(run.stdout.contains(&banner), "no ready banner\n{}", run.output());
    let answer = run.stdout.split_once(&banner).map_or("", |(_, after)| after);
    assert!(answer.contains(ANSWER), "no chat completion after the banner\n{}", run.output());
    assert_stopped(&run);
    let mut all = ports.all().to_vec();
    all.push(8001);
    assert_free(&all, &run);
}
