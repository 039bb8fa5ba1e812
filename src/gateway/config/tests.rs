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
        Err(("proxy", "prefill_timeout_ms")),
    );
    check_config(
        "connections: {body_read_timeout_ms: 18446744073709551615}\npools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}]",
        Err(("connections", "at most a day")),
    );
    check_config(
        "paths: {model: [tokenize]}\npools: [{name: a, models: [m], endpoints: [{address: '127.0.0.1:1'}]}]",
        Err(("paths.model", "start with `/`")),
    );
    check_config("pools: [{name: a, models: [m]}]", Err(("pools[0].endpoints", "needs `endpoints`")));
    check_config(
        "pools: [{name: a, models: [m], endpoints_file: nowhere.yaml}]",
        Err(("pools[0].endpoints_file", "/etc/kvgate/nowhere.yaml is not a file")),
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
