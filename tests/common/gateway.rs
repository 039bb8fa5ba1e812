//! A builder for the setup most integration tests start from: simulators on loopback and kvgate
//! in front of them, one pool `p` serving one model. A test says what differs — how many
//! simulators and with which flags, which listeners, which config sections — and reads the
//! rest from here:
//!
//! ```ignore
//! let fleet = gateway(MODEL).sims(2).proxy().config("health: {failure_threshold: 1}").start().await;
//! ```

use std::fmt::Display;

use kvgate::tools::serve::Server;

use super::{Sim, eventually, get_json, start_kvgate, start_sim};

/// The simulator flags of [`Gateway::sims`]: answers without simulated delays.
const INSTANT: &[&str] = &["--time-scale", "0"];

/// kvgate (admin and gRPC listeners on free ports) with one pool `p` serving `model`; add endpoints
/// with [`Gateway::sims`], [`Gateway::sim`] or [`Gateway::endpoint`].
pub fn gateway(model: &str) -> Gateway {
    Gateway {
        model: model.to_owned(),
        also: Vec::new(),
        entries: Vec::new(),
        sim_keys: String::new(),
        top: String::new(),
        pool: Vec::new(),
    }
}

/// What [`gateway`] starts.
#[derive(Debug, Clone)]
pub struct Gateway {
    model: String,
    /// More models the pool serves.
    also: Vec<String>,
    /// The pool's endpoints, in order.
    entries: Vec<Entry>,
    /// Keys added to each simulator's endpoint entry (`data_parallel_size: 2`).
    sim_keys: String,
    /// Top-level config lines after `admin_addr`.
    top: String,
    /// More keys of the pool's entry.
    pool: Vec<String>,
}

#[derive(Debug, Clone)]
enum Entry {
    /// A simulator started with these flags.
    Sim(Vec<String>),
    /// An endpoint entry as written (flow YAML).
    Yaml(String),
}

/// Simulators and kvgate over them; both stop when the test's runtime ends.
pub struct Fleet {
    /// The simulators, in the order they were added.
    pub sims: Vec<Sim>,
    pub kv: Server,
    /// Endpoint entries in the pool (simulators and others).
    entries: usize,
}

impl Gateway {
    /// `n` simulators serving the model without simulated delays (`--time-scale 0`).
    pub fn sims(mut self, n: usize) -> Self {
        for _ in 0..n {
            self = self.sim(INSTANT);
        }
        self
    }

    /// The pool serves `model` too (routed to its endpoints whether or not they serve it).
    pub fn also_serving(mut self, model: &str) -> Self {
        self.also.push(model.to_owned());
        self
    }

    /// One simulator started with `flags` (serving the pool's model unless the flags name one
    /// with `--model` or `--served-model-name`; on port 0 unless they give a port).
    pub fn sim(mut self, flags: &[&str]) -> Self {
        self.entries.push(Entry::Sim(flags.iter().map(|f| (*f).to_owned()).collect()));
        self
    }

    /// An endpoint that is not one of this fleet's simulators, as a flow-YAML entry
    /// (`{address: '127.0.0.1:9', labels: {…}}`).
    pub fn endpoint(mut self, entry: impl Into<String>) -> Self {
        self.entries.push(Entry::Yaml(entry.into()));
        self
    }

    /// An endpoint at `addr` that is not one of this fleet's simulators.
    pub fn address(self, addr: impl Display) -> Self {
        self.endpoint(format!("{{address: '{addr}'}}"))
    }

    /// Keys added to each simulator's endpoint entry, e.g. `data_parallel_size: 2`.
    pub fn sim_keys(mut self, keys: &str) -> Self {
        self.sim_keys = format!(", {keys}");
        self
    }

    /// The proxy listener, on a free port.
    pub fn proxy(self) -> Self {
        self.config("proxy_addr: 127.0.0.1:0")
    }

    /// More top-level config (listeners, sections), one or more lines.
    pub fn config(mut self, lines: &str) -> Self {
        self.top.push_str(lines);
        self.top.push('\n');
        self
    }

    /// More keys of the pool's entry, as a YAML block (`scheduler: {plugins: […]}`, or several
    /// lines at any indentation).
    pub fn pool(mut self, keys: &str) -> Self {
        self.pool.push(keys.to_owned());
        self
    }

    /// The config text over simulators at `sims` (one address per simulator entry, in order).
    pub fn yaml(&self, sims: &[String]) -> String {
        let mut sims = sims.iter();
        let endpoints: Vec<String> = self
            .entries
            .iter()
            .map(|e| match e {
                Entry::Sim(_) => {
                    let addr = sims.next().expect("an address per simulator");
                    format!("{{address: '{addr}'{}}}", self.sim_keys)
                }
                Entry::Yaml(y) => y.clone(),
            })
            .collect();
        let mut yaml = format!("admin_addr: 127.0.0.1:0\n{}", self.top);
        let models: Vec<String> = std::iter::once(&self.model).chain(&self.also).map(|m| format!("'{m}'")).collect();
        yaml.push_str(&format!(
            "pools:\n  - name: p\n    models: [{}]\n    endpoints: [{}]\n",
            models.join(", "),
            endpoints.join(", ")
        ));
        for keys in &self.pool {
            yaml.push_str(&indent(keys, 4));
        }
        yaml
    }

    /// Starts the simulators and kvgate; returns once kvgate lists every endpoint scraped.
    pub async fn start(self) -> Fleet {
        let fleet = self.start_without_waiting().await;
        fleet.wait_scraped().await;
        fleet
    }

    /// Starts the simulators and kvgate, and returns at once (for tests of what comes before
    /// the first scrape, or of endpoints that never answer).
    pub async fn start_without_waiting(self) -> Fleet {
        let mut sims = Vec::new();
        for e in &self.entries {
            if let Entry::Sim(flags) = e {
                sims.push(self.start_sim(flags).await);
            }
        }
        let addrs: Vec<String> = sims.iter().map(|s| s.addrs[0].to_string()).collect();
        let kv = start_kvgate(&self.yaml(&addrs)).await;
        Fleet { sims, kv, entries: self.entries.len() }
    }

    async fn start_sim(&self, flags: &[String]) -> Sim {
        let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
        if !all.iter().any(|f| *f == "--model" || *f == "--served-model-name") {
            all.extend(["--served-model-name", &self.model]);
        }
        start_sim(&all).await
    }
}

impl Fleet {
    /// `ip:port` of simulator `k`.
    pub fn addr(&self, k: usize) -> String {
        self.sims[k].addrs[0].to_string()
    }

    /// `http://` and the proxy listener's address.
    pub fn proxy(&self) -> String {
        format!("http://{}", self.kv.proxy_addr.expect("the fleet was built with a proxy listener"))
    }

    /// `http://` and the admin listener's address.
    pub fn admin(&self) -> String {
        format!("http://{}", self.kv.admin_addr)
    }

    /// kvgate's `/debug/endpoints`.
    pub async fn endpoints(&self) -> serde_json::Value {
        get_json(&format!("{}/debug/endpoints", self.admin())).await
    }

    /// Waits (10 s at most) until kvgate lists endpoints in its first pool, at least as many as
    /// it was given (more with data-parallel ranks), all scraped.
    pub async fn wait_scraped(&self) {
        let ok = eventually(10, || async {
            let v = self.endpoints().await;
            v["pools"][0]["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() >= self.entries && e.iter().all(|e| e["stale"] == false))
        })
        .await;
        assert!(ok, "endpoints scraped: {}", self.endpoints().await);
    }
}

/// `text` with its common indentation replaced by `n` spaces, ending in a newline.
fn indent(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let common = lines.iter().map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    lines.iter().map(|l| format!("{}{}\n", " ".repeat(n), &l[common..])).collect()
}
