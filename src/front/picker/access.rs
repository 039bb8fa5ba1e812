//! Who may call `kvgate.v1.Picker`: with a token configured (`picker_api.token`, or
//! `picker_api.token_file` as a Kubernetes Secret is mounted), only calls carrying
//! `authorization: Bearer <token>`, compared in constant time; the others are UNAUTHENTICATED.
//! The file is re-read every second, so a rotated Secret takes effect without a restart; a read
//! that fails (or finds no token) keeps the last good token and is logged once per cause.
//! Only this service is guarded: ext_proc and gRPC health on the same listener are not.
//! [`TokenFile`] is the followed file, which the P/D sidecar also reads for its reports.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::RwLock;
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::gateway::config::read::{FileError, Limit, read_text};
use crate::gateway::config::{PickerApiConfig, Secret};
use crate::gateway::decisions::Decisions;
use crate::gateway::tasks::Tasks;

/// How often the token file is read for a new token.
const RELOAD: Duration = Duration::from_secs(1);
/// How long one read of the token file may take.
const READ_WITHIN: Duration = Duration::from_secs(5);
/// The largest token file read (a token is far smaller; anything larger is not one).
const MAX_TOKEN_FILE: u64 = 4096;

/// The picker API's gate: every call passes without a token configured, else only with it.
#[derive(Clone, Default)]
pub(crate) struct Access {
    token: Option<Arc<RwLock<Vec<u8>>>>,
    /// The service it guards, as its refusals name it.
    service: &'static str,
    /// Where refusals are counted (none in unit tests).
    decisions: Option<Arc<Decisions>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = self.token.as_ref().map(|_| "<redacted>");
        f.debug_struct("Access").field("token", &token).finish()
    }
}

/// A token file followed as it changes: the last good token it held.
#[derive(Clone)]
pub struct TokenFile {
    token: Arc<RwLock<Vec<u8>>>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenFile(<redacted>)")
    }
}

impl TokenFile {
    /// Reads the token at `path` now (an error if there is none) and re-reads it every second
    /// on a task of `tasks`.
    pub fn follow(path: &Path, tasks: &Tasks) -> anyhow::Result<Self> {
        let first = read_token(path).with_context(|| format!("token file {}", path.display()))?;
        let token = Arc::new(RwLock::new(first));
        tasks.spawn("token file", reload(path.to_owned(), token.clone(), tasks.clone())).detach();
        Ok(Self { token })
    }

    /// The token a section configures: `token` inline, or `token_file` read now (an error if it
    /// cannot be) and followed; none when it sets neither. `key` names the section in errors.
    pub(crate) fn configured(
        token: Option<&Secret>,
        file: Option<&Path>,
        tasks: &Tasks,
        key: &'static str,
    ) -> anyhow::Result<Option<Self>> {
        Ok(match (token, file) {
            (Some(t), _) => Some(Self { token: Arc::new(RwLock::new(t.expose().trim().as_bytes().to_vec())) }),
            (None, Some(path)) => Some(Self::follow(path, tasks).with_context(|| format!("{key}.token_file"))?),
            (None, None) => None,
        })
    }

    /// `authorization: Bearer <token>` metadata for a call; none (with a warning) when the token
    /// cannot be sent as metadata.
    pub fn bearer(&self) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
        let value = tonic::metadata::MetadataValue::try_from([b"Bearer ".as_slice(), &self.token.read()].concat());
        value.map_err(|_| tracing::warn!("a token that cannot be sent as metadata is not sent")).ok()
    }
}

impl Access {
    /// The gate `cfg` asks for; with a token file, reads it now (a file that cannot be read is
    /// an error at start) and spawns its reloader, which `tasks` stops.
    pub(crate) fn new(cfg: &PickerApiConfig, tasks: &Tasks, decisions: Arc<Decisions>) -> anyhow::Result<Self> {
        let token = TokenFile::configured(cfg.token.as_ref(), cfg.token_file.as_deref(), tasks, "picker_api")?;
        Ok(Self { token: token.map(|t| t.token), service: "the picker API", decisions: Some(decisions) })
    }

    /// A gate for `service` that lets only calls carrying `token` through.
    pub(crate) fn with_token(token: &TokenFile, service: &'static str) -> Self {
        Self { token: Some(token.token.clone()), service, decisions: None }
    }

    /// Whether `bearer` (an `authorization` value) carries the token.
    fn allows(&self, authorization: Option<&[u8]>) -> Result<(), Status> {
        let Some(token) = &self.token else { return Ok(()) };
        let Some(value) = authorization else {
            return Err(Status::unauthenticated(format!(
                "{} needs `authorization: Bearer <token>` metadata",
                self.service
            )));
        };
        let given = value
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| value[7..].trim_ascii())
            .ok_or_else(|| {
                Status::unauthenticated(format!("{} takes `authorization: Bearer <token>` only", self.service))
            })?;
        if bool::from(given.ct_eq(&token.read())) {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!("the bearer token is not {}'s", self.service)))
        }
    }
}

impl Interceptor for Access {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let allowed = self.allows(req.metadata().get("authorization").map(|v| v.as_bytes()));
        if let (Err(_), Some(d)) = (&allowed, &self.decisions) {
            d.refused("unauthenticated");
        }
        allowed.map(|()| req)
    }
}

/// Why a token file gave no token.
#[derive(Debug, thiserror::Error)]
enum TokenFileError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("it holds no token")]
    Empty,
}

/// The token `path` holds (surrounding whitespace dropped), read as every file kvgate follows
/// is: a regular file only, bounded.
fn read_token(path: &Path) -> Result<Vec<u8>, TokenFileError> {
    let limit = Limit { bytes: MAX_TOKEN_FILE, set_by: "kvgate's bound on a token file" };
    let text = read_text(path, limit)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty);
    }
    Ok(token.as_bytes().to_vec())
}

/// Re-reads `path` every [`RELOAD`] (off the serving threads, within [`READ_WITHIN`]), taking
/// each new token, until its owner stops it or nothing else holds the token; a failed read
/// keeps the token and is logged when its cause changes.
async fn reload(path: PathBuf, token: Arc<RwLock<Vec<u8>>>, tasks: Tasks) {
    let mut tick = tokio::time::interval(RELOAD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        // Nobody reads the token any more (a server that failed to start, say): done.
        if Arc::strong_count(&token) == 1 {
            return;
        }
        let p = path.clone();
        let read = tokio::time::timeout(READ_WITHIN, tasks.spawn_blocking("token file read", move || read_token(&p)));
        match read.await {
            Ok(Some(Ok(new))) => {
                last_error = None;
                let changed = !bool::from(new.ct_eq(&token.read()));
                if changed {
                    *token.write() = new;
                    tracing::info!(file = %path.display(), "token reloaded");
                }
            }
            Ok(Some(Err(e))) => {
                let e = e.to_string();
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(file = %path.display(), error = %e, "token file: keeping the last good token");
                    last_error = Some(e);
                }
            }
            Ok(None) => return,
            Err(_) => tracing::warn!(file = %path.display(), "token file: the read did not end in time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(token: Option<&str>, authorization: Option<&str>, allowed: bool) {
        let access = Access {
            token: token.map(|t| Arc::new(RwLock::new(t.as_bytes().to_vec()))),
            service: "the picker API",
            decisions: None,
        };
        let got = access.allows(authorization.map(str::as_bytes));
        assert_eq!(got.is_ok(), allowed, "{token:?} {authorization:?}: {got:?}");
        if let Err(s) = got {
            assert_eq!(s.code(), tonic::Code::Unauthenticated);
            assert!(!s.message().contains("s3cret"), "{}", s.message());
        }
    }

    #[test]
    fn only_the_bearer_token_passes() {
        check(None, None, true);
        check(None, Some("Bearer anything"), true);
        check(Some("s3cret"), Some("Bearer s3cret"), true);
        check(Some("s3cret"), Some("bearer s3cret "), true);
        check(Some("s3cret"), None, false);
        check(Some("s3cret"), Some(""), false);
        check(Some("s3cret"), Some("Bearer"), false);
        check(Some("s3cret"), Some("Bearer s3cre"), false);
        check(Some("s3cret"), Some("Bearer s3cret2"), false);
        check(Some("s3cret"), Some("Basic s3cret"), false);
        check(Some("s3cret"), Some("s3cret"), false);
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let access = Access {
            token: Some(Arc::new(RwLock::new(b"s3cret".to_vec()))),
            service: "the picker API",
            decisions: None,
        };
        assert!(!format!("{access:?}").contains("s3cret"));
        assert!(!format!("{:?}", access.token.as_ref().map(|t| TokenFile { token: t.clone() })).contains("s3cret"));
    }

    #[test]
    fn a_token_file_is_read_bounded_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("kvgate-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("token");
        std::fs::write(&file, "  t0ken\n").expect("write");
        assert_eq!(read_token(&file).expect("read"), b"t0ken");
        std::fs::write(&file, "\n \n").expect("write");
        assert!(matches!(read_token(&file), Err(TokenFileError::Empty)));
        std::fs::write(&file, vec![b'a'; 5000]).expect("write");
        assert!(matches!(read_token(&file), Err(TokenFileError::File(FileError::TooLarge { .. }))));
        assert!(matches!(read_token(&dir), Err(TokenFileError::File(FileError::NotRegular { .. }))));
        assert!(matches!(read_token(&dir.join("missing")), Err(TokenFileError::File(FileError::Io { .. }))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
