//! Unit tests of config parsing and whole-file validation.

use super::*;

fn check_config(yaml: &str, want: Result<usize, (&str, &str)>) {
    let path = Path::new("/etc/kvgate/test.yaml");
    let got = Config::from_yaml(yaml, path).and_then(|c| c.resolve(path));
    match (got, want) {
        (Ok(pools), Ok(n)) => assert_eq!(pools.len(), n),
        (Err(ConfigError::Invalid { at, message, .. }), Err((want_at, needle))) => {
            assert_eq!(at, want_at, "{yaml}: {message}");
            assert!(message.contains(needle), "{yaml}: `{message}` lacks `{needle}`");
        }
        (got, want) => panic!("{yaml}: got {got:?}, want {want:?}"),
    }
}

#[test]
fn config_errors_name_the_place() {
    let ok = "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}]";
    check_config(ok, Ok(1));
    check_config("pools: []", Err(("pools", "at least one")));
    check_config(
        "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1', colour: red}]}]",
        Err(("pools[0].endpoints[0].colour", "unknown field `colour`")),
    );
    check_config("bogus: 1\npools: []", Err(("bogus", "unknown field `bogus`")));
    let both = format!("picker_api: {{token: s3cret, token_file: /run/token}}\n{ok}");
    check_config(&both, Err(("picker_api.token", "not both")));
    check_config(&format!("picker_api: {{token: ' '}}\n{ok}"), Err(("picker_api.token", "must not be empty")));
    let over = format!("picker_api: {{max_pending: 8, max_pending_per_client: 9}}\n{ok}");
    check_config(&over, Err(("picker_api.max_pending_per_client", "at most max_pending (8); got 9")));
    let over = format!("picker_api: {{max_watches: 2, max_watches_per_client: 3}}\n{ok}");
    check_config(&over, Err(("picker_api.max_watches_per_client", "at most max_watches (2)")));
    check_config(&format!("picker_api: {{token_file: /run/token, admission_share: 1}}\n{ok}"), Ok(1));
    check_config(
        "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}, {name: a, models: [n], endpoints: [{address: '127.0.0.1:2'}]}]",
        Err(("pools[1].name", "two pools")),
    );
    check_config(
        "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}, {name: b, models: [m], endpoints: [{address: '127.0.0.1:2'}]}]",
        Err(("pools[1].models[0]", "also served by pool `a`")),
    );
    check_config(
        "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}, {address: '127.0.0.1', port: 1}]}]",
        Err(("pools[0].endpoints[1]", "listed twice")),
    );
    check_config(
        "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1', data_parallel_size: 2}, {address: '127.0.0.1:1'}]}]",
        Err(("pools[0].endpoints[1]", "listed twice")),
    );
    check_config(
        "pools: [{name: a, models: [m], endpoints: [{address: 127.0.0.1, ports: [1, 2]}, {address: '127.0.0.1:2', data_parallel_size: 2}]}]",
        Err(("pools[0].endpoints[1]", "listed twice")),
    );
    check_config(
        "proxy: {prefill_timeout_ms: 0}\npools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}]",
        Err(("proxy.prefill_timeout_ms", "milliseconds, from 1 to 86400000 (24 h); got 0")),
    );
    check_config(
        "connections: {body_read_timeout_ms: 18446744073709551615}\npools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}]",
        Err(("connections.body_read_timeout_ms", "from 1 to 86400000 (24 h); got 18446744073709551615")),
    );
    check_config(
        "paths: {model: [tokenize]}\npools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}]",
        Err(("paths.model", "start with `/`")),
    );
    check_config("pools: [{name: a, models: [m]}]", Err(("pools[0].endpoints", "needs `endpoints`")));
    check_config(
        "pools: [{name: a, models: [m], endpoints_file: nowhere.yaml}]",
        Err(("pools[0].endpoints_file", "cannot read /etc/kvgate/nowhere.yaml")),
    );
    check_config(
        "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}], scheduler: {plugins: [{type: nope}]}}]",
        Err(("pools[0].scheduler.plugins[0].type", "valid types")),
    );
    check_config("grpc_addr: nope\npools: []", Err(("grpc_addr", "")));
    let pool = "pools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}]";
    check_config(
        &format!("admin_addr: 127.0.0.1:8080\nproxy_addr: 127.0.0.1:8080\n{pool}"),
        Err(("proxy_addr", "also `admin_addr`")),
    );
    check_config(
        &format!("grpc_addr: 0.0.0.0:9002\nhealth_addr: 127.0.0.1:9002\n{pool}"),
        Err(("health_addr", "also `grpc_addr`")),
    );
    check_config(&format!("admin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\n{pool}"), Ok(1));
    check_config(&format!("admin_addr: 127.0.0.1:9090\nproxy_addr: 127.0.0.2:9090\n{pool}"), Ok(1));
    check_config(&format!("proxy: {{attempts: 4294967296}}\n{pool}"), Err(("proxy.attempts", "at most 10")));
    let with_admission =
        |a: &str| format!("pools: [{{name: a, models: [m], endpoints: [{{address: '127.0.0.1:1'}}], admission: {a}}}]");
    check_config(&with_admission("{sheddable_headroom: 2.0}"), Err(("pools[0].admission", "0 to 1")));
    check_config(&with_admission("{sheddable_headroom: .nan}"), Err(("pools[0].admission", "0 to 1")));
    check_config(&with_admission("{max_in_flight: 0}"), Err(("pools[0].admission", "at least 1")));
    check_config(&with_admission("{max_in_flight: 8, sheddable_headroom: 0.5}"), Ok(1));
}

/// Flow control's keys and the objectives are checked where they are written, globally and per
/// pool; a pool's keys override the global ones one by one.
#[test]
fn flow_control_and_objectives_are_checked_and_merged() {
    let pool =
        |extra: &str| format!("pools: [{{name: a, models: [m], endpoints: [{{address: '127.0.0.1:1'}}]{extra}}}]");
    check_config(&format!("flow_control: {{ttl_ms: 0}}\n{}", pool("")), Err(("flow_control.ttl_ms", "1 ms to 24 h")));
    check_config(&pool(", flow_control: {max_kv_usage: 1.5}"), Err(("pools[0].flow_control.max_kv_usage", "fraction")));
    check_config(
        &pool(", flow_control: {headroom_percent: 99}"),
        Err(("pools[0].flow_control.headroom_percent", "0 to 90")),
    );
    check_config(
        &pool(", flow_control: {max_requests_per_band: 0}"),
        Err(("pools[0].flow_control.max_requests_per_band", "at least 1")),
    );
    check_config(
        &format!("objectives: [{{name: x}}, {{name: x, priority: 2}}]\n{}", pool("")),
        Err(("objectives", "twice")),
    );
    check_config(&pool(", objectives: [{name: '', priority: 1}]"), Err(("pools[0].objectives", "a name")));
    let yaml = format!(
        "flow_control: {{enabled: true, ttl_ms: 5000, gate: scrape}}\nobjectives: [{{name: chat, priority: 5}}]\n{}",
        pool(", flow_control: {ttl_ms: 100}, objectives: [{name: batch, priority: -1}, {name: chat, priority: 7}]")
    );
    let path = Path::new("/etc/kvgate/test.yaml");
    let pools = Config::from_yaml(&yaml, path).and_then(|c| c.resolve(path)).expect("valid");
    let flow = &pools[0].flow;
    assert!(flow.enabled);
    assert_eq!((flow.ttl.as_millis(), flow.gate), (100, super::flow::GateKind::Scrape));
    // The pool's entries come after the global ones, so its `chat` wins when they are collected.
    let objectives: std::collections::HashMap<_, _> = pools[0].objectives.iter().cloned().collect();
    assert_eq!((objectives["chat"], objectives["batch"]), (7, -1));
}

/// Every timeout and size is refused at zero and past its bound, by its own key, with its line.
#[test]
fn timeouts_and_sizes_are_bounded() {
    let pool = "pools:\n  - name: a\n    models: [m]\n    endpoints: [{address: '127.0.0.1:1'}]\n";
    let refused = [
        ("proxy: {idle_timeout_ms: 0}", "proxy.idle_timeout_ms", "from 1 to 86400000"),
        ("proxy: {first_byte_timeout_ms: 0}", "proxy.first_byte_timeout_ms", "got 0"),
        ("proxy: {connect_timeout_ms: 86400001}", "proxy.connect_timeout_ms", "got 86400001"),
        ("connections: {header_read_timeout_ms: 0}", "connections.header_read_timeout_ms", "got 0"),
        ("connections: {body_timeout_ms: 0}", "connections.body_timeout_ms", "got 0"),
        ("connections: {body_rate_window_ms: 86400001}", "connections.body_rate_window_ms", "got 86400001"),
        ("connections: {max_body_share_percent: 0}", "connections.max_body_share_percent", "from 1 to 100; got 0"),
        ("connections: {max_body_share_percent: 101}", "connections.max_body_share_percent", "got 101"),
        ("picker_api: {report_timeout_ms: 0}", "picker_api.report_timeout_ms", "got 0"),
        ("scrape: {stale_after_ms: 0}", "scrape.stale_after_ms", "got 0"),
        ("health: {unresponsive_ms: 0}", "health.unresponsive_ms", "got 0"),
        ("health: {backoff_ms: 0}", "health.backoff_ms", "got 0"),
        ("max_body_bytes: 18446744073709551615", "max_body_bytes", "from 1 to 1073741824 (1 GiB)"),
        ("max_body_bytes: 0", "max_body_bytes", "got 0"),
        ("max_buffered_bytes: 0", "max_buffered_bytes", "from 1 to 68719476736 (64 GiB)"),
        ("scrape: {max_bytes: 1073741825}", "scrape.max_bytes", "1 GiB"),
        ("extproc: {max_message_bytes: 100}", "extproc.max_message_bytes", "from 1024"),
        ("picker_api: {max_pending: 0}", "picker_api.max_pending", "from 1 to 16777216"),
        ("picker_api: {max_pending_per_client: 0}", "picker_api.max_pending_per_client", "got 0"),
        ("picker_api: {max_watches_per_client: 0}", "picker_api.max_watches_per_client", "got 0"),
        ("picker_api: {admission_share: 0}", "picker_api.admission_share", "more than 0 and at most 1"),
        ("picker_api: {admission_share: 1.5}", "picker_api.admission_share", "got 1.5"),
    ];
    for (section, key, needle) in refused {
        check_config(&format!("{section}\n{pool}"), Err((key, needle)));
        // The error names the file and the line of the key.
        let path = Path::new("/etc/kvgate/test.yaml");
        let e = Config::from_yaml(&format!("{section}\n{pool}"), path).and_then(|c| c.resolve(path)).expect_err(key);
        assert!(e.to_string().starts_with(&format!("/etc/kvgate/test.yaml:1: {key}: ")), "{e}");
    }
    check_config(
        &format!("{pool}    endpoints_file_max_bytes: 0\n"),
        Err(("pools[0].endpoints_file_max_bytes", "got 0")),
    );
    let precise = "    tokenizer: /nowhere\n    kv_events: {port: 5557, stale_after_ms: 0}\n";
    check_config(&format!("{pool}{precise}"), Err(("pools[0].kv_events.stale_after_ms", "got 0")));
    let edges = "proxy: {idle_timeout_ms: 1, first_byte_timeout_ms: 86400000}\nmax_body_bytes: 1073741824\n";
    check_config(&format!("{edges}{pool}"), Ok(1));
}

/// Settings accepted without effect are warnings naming the file, line and YAML path.
#[test]
fn ignored_settings_are_warnings_with_their_line() {
    let check = |yaml: &str, want: &[&str]| {
        let path = Path::new("/etc/kvgate/test.yaml");
        let pools = Config::from_yaml(yaml, path).and_then(|c| c.resolve(path)).expect("valid");
        let w = &pools[0].warnings;
        assert_eq!(w.len(), want.len(), "{w:#?}");
        for (got, needle) in w.iter().zip(want) {
            assert!(got.starts_with(needle), "`{got}` does not start with `{needle}`");
        }
    };
    let pool = "pools:\n  - name: a\n    models: [m]\n    endpoints: [{address: '127.0.0.1:1'}]\n    scheduler:\n";
    check(&format!("{pool}      plugins: [{{type: queue-scorer}}]\n"), &[]);
    check(
        &format!(
            "{pool}      apiVersion: inference.networking.x-k8s.io/v1alpha1\n      plugins:\n\
             \x20       - {{type: approx-prefix-cache-producer, parameters: {{autoTune: false}}}}\n\
             \x20       - {{type: prefix-cache-affinity-filter, parameters: {{peakPrefillThroughput: 9000}}}}\n\
             \x20       - type: no-hit-lru-scorer\n          parameters:\n            lruSize: 64\n\
             \x20       - {{type: queue-scorer}}\n\
             \x20       - {{type: max-score-picker}}\n\
             \x20     schedulingProfiles:\n\
             \x20       - {{name: default, plugins: [{{pluginRef: prefix-cache-affinity-filter}}, {{pluginRef: no-hit-lru-scorer}}, {{pluginRef: max-score-picker}}]}}\n"
        ),
        &[
            "/etc/kvgate/test.yaml:6: pools[0].scheduler.apiVersion: accepted for compatibility",
            "/etc/kvgate/test.yaml:8: pools[0].scheduler.plugins[0].parameters.autoTune: accepted for compatibility",
            "/etc/kvgate/test.yaml:9: pools[0].scheduler.plugins[1].parameters.peakPrefillThroughput: accepted",
            "/etc/kvgate/test.yaml:12: pools[0].scheduler.plugins[2].parameters.lruSize: accepted",
            "/etc/kvgate/test.yaml:13: pools[0].scheduler.plugins[3]: `queue-scorer` is defined but no profile",
        ],
    );
    let picker = |n: usize| {
        format!("{pool}      plugins: [{{type: max-score-picker, parameters: {{maxNumOfEndpoints: {n}}}}}]\n")
    };
    check(&format!("extproc: {{max_endpoints: 2}}\n{}", picker(2)), &[]);
    check(
        &format!("extproc: {{max_endpoints: 2}}\n{}", picker(3)),
        &[
            "/etc/kvgate/test.yaml:7: pools[0].scheduler.plugins[0].parameters.maxNumOfEndpoints: maxNumOfEndpoints 3 and extproc.max_endpoints 2 (line 1) disagree",
        ],
    );
}
