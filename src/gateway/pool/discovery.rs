//! Discovery: turns a pool's config (static endpoints, an endpoints file, host names) into the
//! pool's endpoint set, and keeps it current.
//!
//! The endpoints file is checked every 250 ms (modification time and size, then content); a
//! change that parses replaces the set, one that does not — or one that would leave the pool
//! with no endpoint at all — is logged, shown as the source's `last_error`, and ignored, keeping
//! the last good set. The file is looked at on a blocking thread, never on the runtime's: only a
//! regular file is read, up to the pool's `endpoints_file_max_bytes`, and a look that takes
//! over 5 s is given up on (no other starts until it ends). Host names are resolved again every
//! 5 s; a name with several addresses (a headless Kubernetes service) gives one endpoint per
//! address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt as _;

use super::Pool;
use crate::gateway::config::endpoints::{Claims, Host, ResolvedEndpoint, first_use, load_endpoints_file};
use crate::gateway::config::read::FileError;
use crate::gateway::config::{ConfigError, SourceKind};
use crate::gateway::tasks::{Task, Tasks};

/// Where a pool's endpoints come from, for `/debug/endpoints` and `check-config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SourceStatus {
    /// `static`, `file`, `dns` or `kubernetes`.
    pub kind: SourceKind,
    /// The file, or the InferencePool (`namespace/name`, `group/v1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Whether the source has been read in full (Kubernetes: the pool and its pods listed).
    pub synced: bool,
    /// The source's last problem, while it lasts (Kubernetes: API errors, a malformed pool; a
    /// file: why it was refused, the last good set kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Objects the source skipped as malformed, and why (Kubernetes: pods and InferenceObjectives, by name).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

const FILE_POLL: Duration = Duration::from_millis(250);
/// The longest wait for one look at the endpoints file.
const FILE_READ_TIMEOUT: Duration = Duration::from_secs(5);
const DNS_REFRESH: Duration = Duration::from_secs(5);

/// Resolves entries' host names to IPs through DNS (one entry per address; failures are logged
/// and skipped).
pub(crate) async fn resolve(entries: &[ResolvedEndpoint]) -> Vec<ResolvedEndpoint> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let addrs: Vec<SocketAddr> = match &e.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, e.port)],
            Host::Name(name) => match tokio::net::lookup_host((name.as_str(), e.port)).await {
                Ok(it) => {
                    let mut v: Vec<SocketAddr> = it.collect();
                    v.sort();
                    v.dedup();
                    v
                }
                Err(err) => {
                    tracing::warn!(endpoint = %e, error = %err, "cannot resolve endpoint host; skipping it");
                    Vec::new()
                }
            },
        };
        let many = addrs.len() > 1;
        for addr in addrs {
            let name = if many { format!("{}@{addr}", e.name) } else { e.name.clone() };
            out.push(ResolvedEndpoint { name, host: Host::Ip(addr.ip()), port: addr.port(), ..e.clone() });
        }
    }
    out
}

/// A pool's endpoints file, as discovery follows it.
pub(crate) struct WatchedFile {
    /// The file.
    pub path: PathBuf,
    /// Its `endpoints_file_max_bytes`.
    pub max_bytes: u64,
}

/// The modification time and size of the file (`None`: it cannot be stat'ed).
type Stamp = Option<(SystemTime, u64)>;

/// One look at the file: its stamp, and its endpoints when the stamp changed.
type Look = (Stamp, Option<Result<Vec<ResolvedEndpoint>, ConfigError>>);

/// The endpoints file's state between looks.
struct FileState {
    file: WatchedFile,
    /// The stamp of the last look (`None` before the first).
    stamp: Option<Stamp>,
    /// A look that outlived [`FILE_READ_TIMEOUT`]: no other starts until it ends.
    stuck: Option<Task<Look>>,
    /// The entries of the last good read.
    entries: Vec<ResolvedEndpoint>,
}

impl FileState {
    /// Looks at the file on a blocking thread; whether its entries changed. A read that fails
    /// is logged and shown as the source's `last_error` until a good one; the entries stay.
    async fn look(&mut self, pool: &Pool, tasks: &Tasks, fixed_empty: bool) -> bool {
        let (stamp, read) = match self.next_look(tasks).await {
            Ok(Some(look)) => look,
            Ok(None) => return false,
            Err(e) => {
                self.failed(pool, e.to_string());
                return false;
            }
        };
        self.stamp = Some(stamp);
        match read {
            None => false,
            // Emptying a pool that has endpoints by an edit is more likely a mistake (a
            // truncated write, a bad template) than a wish to refuse every request.
            Some(Ok(entries)) if entries.is_empty() && fixed_empty && !self.entries.is_empty() => {
                let why = format!(
                    "{} lists no endpoint; list at least one endpoint, or remove the pool",
                    self.file.path.display()
                );
                self.failed(pool, why);
                false
            }
            Some(Ok(entries)) => {
                pool.update_source(|s| s.last_error = None);
                if entries == self.entries {
                    return false;
                }
                tracing::info!(pool = pool.name(), file = %self.file.path.display(), endpoints = entries.len(), "endpoints file loaded");
                self.entries = entries;
                true
            }
            Some(Err(e)) => {
                self.failed(pool, e.to_string());
                false
            }
        }
    }

    /// The next look at the file: the stuck one's once it has ended, or a new one. `Ok(None)`:
    /// none yet (the stuck one runs on, or the owner is stopping); an error: it timed out.
    async fn next_look(&mut self, tasks: &Tasks) -> Result<Option<Look>, ConfigError> {
        if let Some(stuck) = &mut self.stuck {
            let Some(look) = stuck.now_or_never() else { return Ok(None) };
            self.stuck = None;
            return Ok(look);
        }
        let (path, max_bytes, last) = (self.file.path.clone(), self.file.max_bytes, self.stamp);
        self.start_look(tasks, move || {
            let stamp = std::fs::metadata(&path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
            let read = (Some(stamp) != last).then(|| load_endpoints_file(&path, max_bytes));
            (stamp, read)
        })
        .await
    }

    /// Runs `look` on a blocking thread and waits for it, [`FILE_READ_TIMEOUT`] at most.
    async fn start_look(
        &mut self,
        tasks: &Tasks,
        look: impl FnOnce() -> Look + Send + 'static,
    ) -> Result<Option<Look>, ConfigError> {
        let mut task = tasks.spawn_blocking("endpoints file read", look);
        match tokio::time::timeout(FILE_READ_TIMEOUT, &mut task).await {
            Ok(look) => Ok(look),
            Err(_) => {
                self.stuck = Some(task);
                let path = self.file.path.display().to_string();
                Err(FileError::TimedOut { path, after: FILE_READ_TIMEOUT }.into())
            }
        }
    }

    /// Logs why the file was not taken, and shows it in `/debug/endpoints`.
    fn failed(&self, pool: &Pool, error: String) {
        tracing::error!(pool = pool.name(), file = %self.file.path.display(), %error, "endpoints file rejected; keeping the last good endpoint set");
        pool.update_source(|s| s.last_error = Some(format!("{error}; keeping the last good endpoint set")));
    }
}

/// Keeps `pool`'s endpoints (from a source of `kind`) in line with `fixed` entries and the
/// optional endpoints file, read on `tasks`' blocking threads.
pub(crate) async fn run(
    pool: Pool,
    kind: SourceKind,
    fixed: Vec<ResolvedEndpoint>,
    file: Option<WatchedFile>,
    tasks: Tasks,
) {
    let from = file.as_ref().map(|f| f.path.display().to_string());
    pool.set_source(SourceStatus { kind, from, synced: true, ..SourceStatus::default() });
    let mut file = file.map(|file| FileState { file, stamp: None, stuck: None, entries: Vec::new() });
    let mut last_dns = Instant::now();
    let mut current: Option<Vec<ResolvedEndpoint>> = None;
    let needs_dns = |entries: &[ResolvedEndpoint]| entries.iter().any(|e| matches!(e.host, Host::Name(_)));
    loop {
        let mut changed = current.is_none();
        if let Some(f) = file.as_mut() {
            changed |= f.look(&pool, &tasks, fixed.is_empty()).await;
        }
        let file_entries = file.as_ref().map_or(&[][..], |f| &f.entries[..]);
        // A file entry may not take the host:port of a fixed one.
        let mut seen = Claims::new();
        let all: Vec<ResolvedEndpoint> = fixed
            .iter()
            .chain(file_entries)
            .filter(|r| {
                let ok = first_use(&mut seen, r);
                if !ok && changed {
                    tracing::warn!(pool = pool.name(), endpoint = %r, "endpoint listed both in the config and in the endpoints file; the file's entry is ignored");
                }
                ok
            })
            .cloned()
            .collect();
        if needs_dns(&all) && last_dns.elapsed() >= DNS_REFRESH {
            last_dns = Instant::now();
            changed = true;
        }
        if changed {
            let endpoints = resolve(&all).await;
            if current.as_ref() != Some(&endpoints) {
                pool.set_endpoints(endpoints.clone());
                current = Some(endpoints);
            }
        }
        if file.is_none() && !needs_dns(&all) {
            return;
        }
        tokio::time::sleep(FILE_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A look that does not end in time is given up on, and no other starts until it ends;
    /// then its result is the next look's.
    #[tokio::test(start_paused = true)]
    async fn a_look_that_hangs_times_out_and_blocks_no_other() {
        let tasks = Tasks::new();
        let file = WatchedFile { path: PathBuf::from("/nowhere/endpoints.yaml"), max_bytes: 1 };
        let mut state = FileState { file, stamp: None, stuck: None, entries: Vec::new() };
        let (release, hang) = std::sync::mpsc::channel::<()>();
        // A blocking task holds paused time still: the clock is moved by hand past the timeout.
        let look = state.start_look(&tasks, move || (hang.recv().ok().and(None), None));
        let (looked, ()) = tokio::join!(look, tokio::time::advance(FILE_READ_TIMEOUT + Duration::from_secs(1)));
        let e = looked.expect_err("the look hangs past the timeout");
        assert!(e.to_string().contains("took longer than 5s"), "{e}");
        // While it hangs, nothing new starts (this look would panic the test if it ran).
        assert!(state.next_look(&tasks).await.expect("no error while it hangs").is_none());
        release.send(()).expect("the look waits");
        let mut ended = None;
        for _ in 0..5000 {
            match state.next_look(&tasks).await {
                Ok(Some(look)) => {
                    ended = Some(look);
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let (stamp, read) = ended.expect("the hung look ended and was taken");
        assert!(stamp.is_none() && read.is_none());
        assert!(state.stuck.is_none());
    }
}
