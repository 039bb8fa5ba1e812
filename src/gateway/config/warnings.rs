//! Warnings about settings a config accepts but that change nothing (or less than they say),
//! each with the file and line it is on.

use std::path::Path;

use super::{Config, PoolConfig};
use crate::routing::schedule::Scheduler;

impl Config {
    /// `file:line: path: message` for the setting at `at` (a YAML path); without the line when
    /// it is not known.
    pub(super) fn located(&self, path: &Path, at: &str, message: &str) -> String {
        match self.lines.get(at) {
            Some(line) => format!("{}:{line}: {at}: {message}", path.display()),
            None => format!("{}: {at}: {message}", path.display()),
        }
    }

    /// Warnings about pool `i`'s settings that are accepted but change nothing (or less than
    /// they say): its scheduler's, and its picker's `maxNumOfEndpoints` against
    /// `extproc.max_endpoints`.
    pub(super) fn ignored_settings(
        &self,
        i: usize,
        pool: &PoolConfig,
        scheduler: &Scheduler,
        path: &Path,
    ) -> Vec<String> {
        let Some(spec) = &pool.scheduler else { return Vec::new() };
        let mut out: Vec<String> = spec
            .ignored()
            .iter()
            .map(|x| self.located(path, &format!("pools[{i}].scheduler.{}", x.at), &x.message))
            .collect();
        if let (Some(picker), Some(server)) = (scheduler.max_endpoints(), self.extproc.max_endpoints)
            && picker != server
        {
            let at = spec
                .plugins
                .iter()
                .position(|p| {
                    let n = p.parameters.as_ref().and_then(|v| v.get("maxNumOfEndpoints"));
                    p.kind.ends_with("-picker") && n.and_then(serde_json::Value::as_u64) == Some(picker as u64)
                })
                .map_or(format!("pools[{i}].scheduler"), |k| {
                    format!("pools[{i}].scheduler.plugins[{k}].parameters.maxNumOfEndpoints")
                });
            let server_at = self.lines.get("extproc.max_endpoints").map_or(String::new(), |l| format!(" (line {l})"));
            let listed = picker.min(server);
            out.push(self.located(
                path,
                &at,
                &format!(
                    "maxNumOfEndpoints {picker} and extproc.max_endpoints {server}{server_at} disagree: this pool's \
                     decisions list {listed} endpoints (the smaller of the two)"
                ),
            ));
        }
        out
    }
}

impl Config {
    /// The warning a server gives at start when anyone who reaches `grpc_addr` (not a loopback
    /// address) may call the picker API: it has neither a token nor `require_client_cert`.
    pub fn open_picker_api(&self) -> Option<String> {
        if self.grpc_addr.ip().is_loopback() || self.picker_api.authenticates() {
            return None;
        }
        Some(format!(
            "the picker API (kvgate.v1.Picker) on grpc_addr {} is open to every client that reaches it: \
             set picker_api.token_file (or picker_api.token) or picker_api.require_client_cert",
            self.grpc_addr
        ))
    }
}
