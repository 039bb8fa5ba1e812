//! Reading the files a config names — the config itself, an endpoints file — without trusting
//! what is at their path. Only a regular file is read (a symlink is followed, and what it points
//! to must be one): a FIFO would block the reader until a writer comes, and a device such as
//! `/dev/zero` never ends. The file is opened non-blocking and checked again once open, so one
//! swapped in after the first check cannot block the open either. At most `limit + 1` bytes are
//! read, so a file that grows while it is read cannot take more memory than its limit.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// The most bytes a file may have, and the setting that says so (for the error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Bytes.
    pub bytes: u64,
    /// What sets it: a config key such as `endpoints_file_max_bytes`, or kvgate's own bound.
    pub set_by: &'static str,
}

/// The limit on a config file (kvgate's own: configs are a few kilobytes).
pub const CONFIG_LIMIT: Limit = Limit { bytes: 16 << 20, set_by: "kvgate's bound on a config file" };

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Opening, inspecting or reading it failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is a FIFO, a device, a socket or a directory.
    #[error("{path} is {what}, not a regular file; only regular files are read")]
    NotRegular {
        /// The file.
        path: String,
        /// What it is instead, such as `a FIFO (named pipe)`.
        what: &'static str,
    },
    /// It is larger than its limit.
    #[error("{path} is {size} bytes, over the limit of {} bytes ({})", limit.bytes, limit.set_by)]
    TooLarge {
        /// The file.
        path: String,
        /// Its size when it was checked.
        size: u64,
        /// The limit.
        limit: Limit,
    },
    /// It grew past its limit while it was read.
    #[error("{path} grew past the limit of {} bytes ({}) while it was read", limit.bytes, limit.set_by)]
    Grew {
        /// The file.
        path: String,
        /// The limit.
        limit: Limit,
    },
    /// Its bytes are not UTF-8.
    #[error("{path} is not UTF-8 text")]
    NotText {
        /// The file.
        path: String,
    },
    /// Reading it took longer than its reader waits (a file system that does not answer).
    #[error("reading {path} took longer than {after:?}; no other read of it starts until this one ends")]
    TimedOut {
        /// The file.
        path: String,
        /// How long the reader waited.
        after: Duration,
    },
}

/// What a file that is not a regular file is, in words.
fn kind_of(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        return None;
    }
    Some(if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "of an unknown kind"
    })
}

/// Refuses what is not a regular file of at most `limit` bytes.
fn check(path: &Path, meta: &Metadata, limit: Limit) -> Result<(), FileError> {
    let path = || path.display().to_string();
    if let Some(what) = kind_of(meta) {
        return Err(FileError::NotRegular { path: path(), what });
    }
    if meta.len() > limit.bytes {
        return Err(FileError::TooLarge { path: path(), size: meta.len(), limit });
    }
    Ok(())
}

/// Reads `path` as UTF-8 text if it is a regular file (after symlinks) of at most `limit`
/// bytes. Blocking, but never for long on a local file system: run it off an async runtime.
pub fn read_text(path: &Path, limit: Limit) -> Result<String, FileError> {
    let io = |source| FileError::Io { path: path.display().to_string(), source };
    // Checked before opening, so that opening cannot block or have a device's side effects...
    check(path, &std::fs::metadata(path).map_err(io)?, limit)?;
    // ...and after, since the path may name something else by then: a FIFO opened non-blocking
    // does not wait for a writer, and is refused here.
    let file: File = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    check(path, &meta, limit)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize + 1);
    file.take(limit.bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit.bytes {
        return Err(FileError::Grew { path: path.display().to_string(), limit });
    }
    String::from_utf8(bytes).map_err(|_| FileError::NotText { path: path.display().to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit { bytes: 64, set_by: "`test_max_bytes`" };

    fn check_read(path: &Path, want: Result<&str, &str>) {
        match (read_text(path, LIMIT), want) {
            (Ok(text), Ok(want)) => assert_eq!(text, want, "{}", path.display()),
            (Err(e), Err(needle)) => {
                assert!(e.to_string().contains(needle), "{}: `{e}` lacks `{needle}`", path.display())
            }
            (got, want) => panic!("{}: got {got:?}, want {want:?}", path.display()),
        }
    }

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = std::env::temp_dir().join(format!("kvgate-read-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).expect("write");
            p
        };
        let small = write("small.yaml", b"endpoints: []\n");
        check_read(&small, Ok("endpoints: []\n"));
        let exact = write("exact.yaml", &[b'#'; 64]);
        check_read(&exact, Ok(&"#".repeat(64)));
        check_read(&write("big.yaml", &[b'#'; 65]), Err("is 65 bytes, over the limit of 64 bytes (`test_max_bytes`)"));
        check_read(&write("binary.yaml", &[0xff, 0xfe]), Err("is not UTF-8 text"));
        check_read(&dir, Err("is a directory, not a regular file"));
        check_read(&dir.join("missing.yaml"), Err("cannot read"));
        let link = |name: &str, to: &Path| {
            let p = dir.join(name);
            std::fs::remove_file(&p).ok();
            std::os::unix::fs::symlink(to, &p).expect("symlink");
            p
        };
        check_read(&link("zero.yaml", Path::new("/dev/zero")), Err("is a character device, not a regular file"));
        check_read(&link("good-link.yaml", &small), Ok("endpoints: []\n"));
        let fifo = dir.join("fifo.yaml");
        std::fs::remove_file(&fifo).ok();
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(made.success());
        // No writer ever comes: a blocking open would hang this test.
        check_read(&fifo, Err("is a FIFO (named pipe), not a regular file"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
