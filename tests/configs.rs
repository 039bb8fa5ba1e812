//! Every `config/*.yaml` is a complete kvgate config that loads and resolves; the written-out
//! default config is exactly the built-in default.

use std::path::{Path, PathBuf};

use kvgate::gateway::config::Config;
use kvgate::routing::schedule::Scheduler;

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

/// The five deployment patterns each have a config, shaped as the pattern needs.
#[test]
fn pattern_configs() {
    let load = |name: &str| {
        let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(name);
        Config::load(&f).and_then(|c| c.resolve(&f)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert_eq!(load("p1-baseline.yaml")[0].endpoints.len(), 1);
    let p2 = load("p2-multi-model.yaml");
    assert_eq!(p2.len(), 2);
    assert_ne!(p2[0].models, p2[1].models);
    assert_eq!(load("p3-prefix-cache.yaml")[0].endpoints.len(), 3);
    // The precise example names a tokenizer folder of a real deployment: here it cannot be
    // loaded, which is a warning (the pool runs approximately), not an error.
    let precise = load("p3-precise-kv-events.yaml");
    assert_eq!(precise[0].scheduler.precise_producer(), Some(16));
    assert!(precise[0].precise.is_none());
    assert!(precise[0].warnings.iter().any(|w| w.contains("tokenizer cannot be loaded")), "{:?}", precise[0].warnings);
    let p4 = load("p4-moe-dp.yaml");
    let ranks: Vec<(String, Option<u32>, bool)> =
        p4[0].endpoints.iter().map(|e| (e.to_string(), e.rank, e.rank_header)).collect();
    assert_eq!(ranks.len(), 8);
    assert!(ranks[..4].iter().enumerate().all(|(r, (_, rank, header))| *rank == Some(r as u32) && !header));
    assert!(ranks[4..].iter().all(|(addr, _, header)| addr == "127.0.0.1:8100" && *header), "{ranks:?}");
    let p5 = load("p5-moe-pd.yaml");
    let d = p5[0].scheduler.disagg().expect("a P/D scheduler");
    assert_eq!(d.decider.non_cached_tokens, 512);
    let roles: Vec<kvgate::routing::endpoint::Role> =
        p5[0].endpoints.iter().map(|e| kvgate::routing::endpoint::Role::of_labels(&e.labels)).collect();
    assert!(
        roles.contains(&kvgate::routing::endpoint::Role::Prefill)
            && roles.contains(&kvgate::routing::endpoint::Role::Decode)
    );
}

proptest::proptest! {
    /// Config files are untrusted input too: YAML-shaped text — including mutations of a valid
    /// config — is a config or a located error, never a panic.
    #[test]
    fn yaml_shaped_text_is_a_config_or_an_error(
        text in r#"((pools|name|models|endpoints|address|port|ports|scheduler|plugins|type|admission|proxy|health|connections|max_body_bytes|[a-z_]{1,8}): ?(\[|\]|\{|\}|-|'[0-9.:a-z]{0,12}'|[0-9]{1,20}|-1|\.nan|~|true|m|127\.0\.0\.1:[0-9]{1,6})?(, )?\n? ?){0,24}"#,
    ) {
        let path = Path::new("/etc/kvgate/fuzz.yaml");
        if let Ok(cfg) = Config::from_yaml(&text, path) {
            let _ = cfg.resolve(path);
        }
    }

    /// A valid config with one byte replaced is a config or an error, never a panic.
    #[test]
    fn a_valid_config_with_a_byte_changed(at in 0usize..400, byte in proptest::prelude::any::<u8>()) {
        let valid = "admin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\npools: [{name: p, models: [m], endpoints: [{address: '127.0.0.1:8000', labels: {llm-d.ai/role: decode}}, {address: 127.0.0.1, ports: [8001, 8002]}], admission: {max_in_flight: 4, sheddable_headroom: 0.5}}]\n";
        let path = Path::new("/etc/kvgate/fuzz.yaml");
        proptest::prop_assert!(Config::from_yaml(valid, path).and_then(|c| c.resolve(path)).is_ok(), "the seed is valid");
        let mut bytes = valid.as_bytes().to_vec();
        let at = at % bytes.len();
        bytes[at] = byte;
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(cfg) = Config::from_yaml(&text, path) {
            let _ = cfg.resolve(path);
        }
    }
}
