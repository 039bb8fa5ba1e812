//! The decision core (`src/routing/`) must stay synchronous and pure: no
//! async or network crates, no clock, no global randomness, no file or socket I/O. This test
//! reads the core's source and fails on any such use.

use std::path::{Path, PathBuf};

/// Patterns that must not appear in core code (outside comments).
const FORBIDDEN: &[&str] = &[
    "tokio",
    "hyper",
    "tonic",
    "axum",
    "tower",
    "reqwest",
    "kube",
    "zeromq",
    "async ",
    ".await",
    "Instant::now",
    "SystemTime",
    "thread_rng",
    "fastrand::u",
    "fastrand::i",
    "fastrand::f",
    "fastrand::shuffle",
    "fastrand::bool",
    "std::fs",
    "std::net::Tcp",
    "std::net::Udp",
    "std::thread",
    "std::env",
];

/// Every `.rs` file of the core: `src/routing.rs` and everything under `src/routing/`.
fn core_files() -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join("routing.rs")];
    let mut dirs = vec![src.join("routing")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("core folder exists") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The forbidden patterns used in `source`, with line numbers; comments are skipped.
fn violations(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for pat in FORBIDDEN {
            if code.contains(pat) {
                found.push(format!("line {}: `{pat}` in `{}`", n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn the_scanner_catches_violations() {
    assert_eq!(violations("let t = std::time::Instant::now();").len(), 1);
    assert_eq!(violations("use tokio::sync::Mutex;\n// tokio in a comment is fine").len(), 1);
    assert!(violations("let x = fastrand::Rng::with_seed(1);").is_empty());
}

#[test]
fn core_modules_do_no_io_and_read_no_clock() {
    let files = core_files();
    assert!(files.len() >= 8, "core files not found: {files:?}");
    let mut all = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("readable");
        // Test modules may use anything; they are not part of the core's runtime (a `tests.rs`
        // is one, declared under `#[cfg(test)]`).
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let runtime = text.split("#[cfg(test)]").next().unwrap_or(&text);
        all.extend(violations(runtime).into_iter().map(|v| format!("{}: {v}", f.display())));
    }
    assert!(all.is_empty(), "impure core code:\n{}", all.join("\n"));
}
