//! Every `config/*.yaml` is a complete kvgate config that loads and resolves; the written-out
//! default config is exactly the built-in default.

use std::path::{Path, PathBuf};

use kvgate::config::Config;
use kvgate::schedule::Scheduler;

fn example_configs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("config/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_config_resolves() {
    let files = example_configs();
    assert!(files.len() >= 4, "expected example configs, found {files:?}");
    for f in files {
        let cfg = Config::load(&f).unwrap_or_else(|e| panic!("{e}"));
        let pools = cfg.resolve(&f).unwrap_or_else(|e| panic!("{e}"));
        assert!(!pools.is_empty(), "{}", f.display());
    }
}

#[test]
fn explicit_default_matches_builtin() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/explicit-default.yaml");
    let pools = Config::load(&f).and_then(|c| c.resolve(&f)).expect("resolves");
    assert_eq!(pools[0].scheduler.to_string(), Scheduler::default_config().to_string());
}

#[test]
fn design_example_has_rank_endpoints() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/design-example.yaml");
    let pools = Config::load(&f).and_then(|c| c.resolve(&f)).expect("resolves");
    let eps: Vec<String> = pools[0].endpoints.iter().map(|e| format!("{e}/{:?}", e.rank)).collect();
    assert_eq!(eps, ["127.0.0.1:8001/None", "127.0.0.1:8002/Some(0)", "127.0.0.1:8003/Some(1)"]);
}
