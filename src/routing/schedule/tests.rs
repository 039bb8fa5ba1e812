//! Scheduler tests: whole decisions over small hand-built snapshots.

use std::collections::BTreeMap;

use super::*;
use crate::routing::endpoint::{LoraState, ROLE_LABEL, Role};

const NOW: u64 = 10_000;
const STALE: u64 = 2_000;

fn endpoints(n: usize) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let addr = format!("10.0.0.{}:8000", i + 1).parse().expect("addr");
            Endpoint::new(EndpointId::new(i as u32), addr, BTreeMap::new())
        })
        .collect()
}

fn models() -> Vec<String> {
    vec!["m".to_owned()]
}

fn request(total_blocks: usize) -> SchedRequest<'static> {
    SchedRequest {
        model: "m",
        prompt_tokens: total_blocks as u64 * 64,
        total_blocks,
        block_tokens: 64,
        priority: 0,
        subset: None,
        open: None,
        disaggregate: true,
    }
}

fn spec(yaml: &str) -> Result<Scheduler, SpecError> {
    let spec: SchedulerSpec = serde_saphyr::from_str(yaml).expect("test YAML parses");
    Scheduler::from_spec(&spec)
}

/// Schedules one request; returns the decision or the reason there is none.
fn run(
    s: &Scheduler,
    eps: &[Endpoint],
    blocks: &[u32],
    req: SchedRequest<'_>,
    seed: u64,
) -> Result<Decision, NoDecision> {
    run_with(s, eps, blocks, req, seed, 1, None)
}

/// [`run`] wanting `want` targets, optionally explained.
fn run_with(
    s: &Scheduler,
    eps: &[Endpoint],
    blocks: &[u32],
    req: SchedRequest<'_>,
    seed: u64,
    want: usize,
    explain: Option<&mut Explanation>,
) -> Result<Decision, NoDecision> {
    let pool = models();
    let input = Input {
        request: req,
        endpoints: eps,
        prefix_blocks: blocks,
        pool_models: &pool,
        now_ms: NOW,
        stale_after_ms: STALE,
    };
    s.schedule(&input, &mut fastrand::Rng::with_seed(seed), want, explain)
}

/// Asserts that `yaml` fails to compile at `at` with a message containing `needle`.
fn check_err(yaml: &str, at: &str, needle: &str) {
    let e = spec(yaml).expect_err(yaml);
    assert_eq!(e.at, at, "{yaml}: {e}");
    assert!(e.message.contains(needle), "{yaml}: `{e}` lacks `{needle}`");
}

/// One table row: who gets the request (by endpoint index), or why nobody does.
fn check(s: &Scheduler, eps: &[Endpoint], blocks: &[u32], req: SchedRequest<'_>, want: Result<usize, NoDecision>) {
    for seed in 0..8 {
        let got = run(s, eps, blocks, req, seed).map(|d| d.primary().index);
        assert_eq!(got, want, "seed {seed}, blocks {blocks:?}");
    }
}

fn fresh(waiting: u32, kv: f64) -> Option<Metrics> {
    Some(Metrics { waiting, kv_usage: kv, scraped_at_ms: NOW - 10, ..Metrics::default() })
}

#[test]
fn cold_requests_rotate_evenly_and_deterministically() {
    let s = Scheduler::default_config();
    let eps = endpoints(4);
    let mut counts = [0; 4];
    let mut order = Vec::new();
    for seed in 0..400 {
        let d = run(&s, &eps, &[0; 4], request(8), seed).expect("decision");
        assert!(d.cold);
        counts[d.primary().index] += 1;
        order.push(d.primary().index);
    }
    assert_eq!(counts, [100; 4]);
    // Every window of four consecutive cold picks covers all four endpoints.
    for w in order.windows(4) {
        let mut w = w.to_vec();
        w.sort_unstable();
        assert_eq!(w, [0, 1, 2, 3]);
    }
}

#[test]
fn prefix_affinity_until_saturated() {
    let s = Scheduler::default_config();
    let eps = endpoints(4);
    let hot = [0, 0, 10, 0];
    check(&s, &eps, &hot, request(10), Ok(2));
    // A little busier than the rest: still sticky (4 in flight, 4 over the others' mean of 0).
    for _ in 0..4 {
        eps[2].in_flight.start(100);
    }
    check(&s, &eps, &hot, request(10), Ok(2));
    // Past the in-flight imbalance (5 over the others' mean, and more than that mean): released
    // to an endpoint without the prefix.
    eps[2].in_flight.start(100);
    let d = run(&s, &eps, &hot, request(10), 0).expect("decision");
    assert_ne!(d.primary().index, 2);
    // A second holder of the prefix that is not saturated takes over.
    check(&s, &eps, &[0, 10, 10, 0], request(10), Ok(1));
}

#[test]
fn saturation_is_relative_to_the_others_load() {
    let s = Scheduler::default_config();
    // Two endpoints: the holder is released once it is 5 over the other and twice its load.
    let eps = endpoints(2);
    let hot = [10, 0];
    for _ in 0..5 {
        eps[0].in_flight.start(10);
    }
    check(&s, &eps, &hot, request(10), Ok(1));
    // The same excess on a busy pool is no saturation: 15 against 10.
    for _ in 0..10 {
        eps[0].in_flight.start(10);
        eps[1].in_flight.start(10);
    }
    check(&s, &eps, &hot, request(10), Ok(0));
    // 21 against 10: released.
    for _ in 0..6 {
        eps[0].in_flight.start(10);
    }
    check(&s, &eps, &hot, request(10), Ok(1));
}

#[test]
fn long_queued_prefill_releases_stickiness() {
    let s = Scheduler::default_config();
    let eps = endpoints(2);
    // One request of 100k uncached tokens queued: ~6 s of prefill at 15,928 tokens/s.
    eps[0].in_flight.start(100_000);
    check(&s, &eps, &[10, 0], request(10), Ok(1));
}

#[test]
fn saturation_follows_each_endpoints_learned_speed() {
    use crate::routing::ttft::TtftSample;
    let s = Scheduler::default_config();
    let eps = endpoints(2);
    // 8,000 prefill tokens queued on the holder: 0.5 s at the prior rate, sticky.
    eps[0].in_flight.start(8_000);
    check(&s, &eps, &[10, 0], request(10), Ok(0));
    // The holder turns out to prefill at 2,000 tokens/s: 4 s of wait, over the penalty.
    for k in 0..200u64 {
        let work = 500 + k * 40;
        eps[0].ttft.observe(TtftSample { work_tokens: work, decodes: 0, ttft_ms: 20.0 + work as f64 / 2.0, at_ms: k });
    }
    check(&s, &eps, &[10, 0], request(10), Ok(1));
}

#[test]
fn predicted_ttft_scores_relative_to_the_best() {
    let s = spec("plugins: [{type: predicted-ttft-scorer, parameters: {scaleMs: 100}}, {type: max-score-picker}]")
        .expect("valid");
    let eps = endpoints(3);
    // 1,592.8 tokens ahead on #0 = 100 ms at the prior rate; 3,185.6 on #1 = 200 ms.
    eps[0].in_flight.start(1593);
    eps[1].in_flight.start(3186);
    let mut x = Explanation::default();
    let input = Input {
        request: request(10),
        endpoints: &eps,
        prefix_blocks: &[0, 0, 0],
        pool_models: &models(),
        now_ms: NOW,
        stale_after_ms: STALE,
    };
    let d = s.schedule(&input, &mut fastrand::Rng::with_seed(1), 3, Some(&mut x)).expect("decision");
    assert_eq!(d.targets.iter().map(|t| t.index).collect::<Vec<_>>(), [2, 0, 1]);
    let raw: Vec<f64> = x.endpoints.iter().map(|e| e.scores[0].raw).collect();
    assert!((raw[2] - 1.0).abs() < 1e-9 && (raw[0] - 0.5).abs() < 0.01 && (raw[1] - 1.0 / 3.0).abs() < 0.01, "{raw:?}");
    assert!(x.endpoints[1].predicted_ttft_ms > x.endpoints[0].predicted_ttft_ms);
}

#[test]
fn partial_match_yields_to_load() {
    let s = Scheduler::default_config();
    let eps = endpoints(3);
    // 3 of 10 blocks: below the affinity threshold, so load decides.
    check(&s, &eps, &[3, 0, 0], request(10), Ok(0));
    eps[0].in_flight.start(10);
    let d = run(&s, &eps, &[3, 0, 0], request(10), 0).expect("decision");
    assert_ne!(d.primary().index, 0);
}

#[test]
fn no_decision_reasons() {
    let s = Scheduler::default_config();
    check(&s, &[], &[], request(1), Err(NoDecision::NoEndpoints));
    let mut eps = endpoints(3);
    let subset = Subset::parse_list("10.0.0.9:8000").expect("subset");
    let req = SchedRequest { subset: Some(&subset), ..request(1) };
    check(&s, &eps, &[0; 3], req, Err(NoDecision::SubsetUnmatched));
    let subset = Subset::parse_list("10.0.0.3").expect("subset");
    let req = SchedRequest { subset: Some(&subset), ..request(1) };
    check(&s, &eps, &[0; 3], req, Ok(2));
    let req = SchedRequest { model: "other", ..request(1) };
    check(&s, &eps, &[0; 3], req, Err(NoDecision::ModelNotServed("other".into())));
    for e in &mut eps {
        e.health = Health::Unhealthy;
    }
    check(&s, &eps, &[0; 3], request(1), Err(NoDecision::NoHealthyEndpoints));
    eps[1].health = Health::Probing;
    check(&s, &eps, &[0; 3], request(1), Ok(1));
    eps[0].health = Health::Healthy;
    check(&s, &eps, &[0; 3], request(1), Ok(0));
    // Panic: one healthy endpoint of three is too few; an ejected one (it answers) takes
    // requests too, an unreachable one does not.
    eps[1].health = Health::Unhealthy;
    eps[2].ejected = true;
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..40 {
        seen.insert(run(&s, &eps, &[0; 3], request(1), seed).expect("panic routes").primary().index);
    }
    assert_eq!(seen, [0, 2].into_iter().collect(), "panic routes over the answering endpoints");
    // Two healthy of three is enough: the ejected one stays out.
    eps[1].health = Health::Healthy;
    for seed in 0..40 {
        assert_ne!(run(&s, &eps, &[0; 3], request(1), seed).expect("routes").primary().index, 2, "seed {seed}");
    }
}

#[test]
fn role_filters() {
    let s = spec("plugins: [{type: decode-filter}, {type: queue-scorer}]").expect("compiles");
    let mut eps = endpoints(2);
    for e in &mut eps {
        e.labels.insert(ROLE_LABEL.into(), "prefill".into());
        e.role = Role::Prefill;
    }
    check(&s, &eps, &[0; 2], request(1), Err(NoDecision::Filtered("decode-filter".into())));
    eps[1].role = Role::Both;
    check(&s, &eps, &[0; 2], request(1), Ok(1));
}

#[test]
fn stale_metrics_are_unknown_not_idle() {
    let s = spec("plugins: [{type: queue-scorer}]").expect("compiles");
    let mut eps = endpoints(2);
    eps[0].metrics = Some(Metrics { waiting: 0, scraped_at_ms: NOW - STALE - 1, ..Metrics::default() });
    eps[1].metrics = fresh(3, 0.0);
    check(&s, &eps, &[0; 2], request(1), Ok(1));
    eps[0].metrics = fresh(0, 0.0);
    check(&s, &eps, &[0; 2], request(1), Ok(0));
}

#[test]
fn utilization_filter_fails_open() {
    let s = spec("plugins: [{type: utilization-filter}, {type: random-picker}]").expect("compiles");
    let mut eps = endpoints(2);
    eps[0].metrics = fresh(10, 0.1);
    eps[1].metrics = fresh(0, 0.95);
    // Both saturated: nobody is dropped, so both get picked over a few seeds.
    let picks: std::collections::HashSet<usize> =
        (0..16).map(|seed| run(&s, &eps, &[0; 2], request(1), seed).expect("decision").primary().index).collect();
    assert_eq!(picks.len(), 2);
    eps[1].metrics = fresh(0, 0.5);
    check(&s, &eps, &[0; 2], request(1), Ok(1));
}

#[test]
fn lora_affinity() {
    let s = spec("plugins: [{type: lora-affinity-scorer}]").expect("compiles");
    let mut eps = endpoints(3);
    let lora = |running: &[&str], waiting: &[&str], max: u32| LoraState {
        running: running.iter().map(|s| s.to_string()).collect(),
        waiting: waiting.iter().map(|s| s.to_string()).collect(),
        max_loras: max,
    };
    for e in &mut eps {
        e.models = vec!["m".into(), "ad".into()];
    }
    eps[0].metrics = Some(Metrics { lora: Some(lora(&["x", "y"], &[], 2)), scraped_at_ms: NOW, ..Metrics::default() });
    eps[1].metrics = Some(Metrics { lora: Some(lora(&["x"], &[], 2)), scraped_at_ms: NOW, ..Metrics::default() });
    eps[2].metrics =
        Some(Metrics { lora: Some(lora(&["x", "y"], &["ad"], 2)), scraped_at_ms: NOW, ..Metrics::default() });
    let req = SchedRequest { model: "ad", ..request(1) };
    // Room for the adapter (0.8) beats it merely waiting (0.6) and no room (0).
    check(&s, &eps, &[0; 3], req, Ok(1));
    eps[0].metrics.as_mut().and_then(|m| m.lora.as_mut()).expect("lora").running.push("ad".into());
    check(&s, &eps, &[0; 3], req, Ok(0));
}

#[test]
fn fallbacks_are_ordered_and_distinct() {
    let s = Scheduler::default_config();
    let eps = endpoints(5);
    let pool = models();
    let input = Input {
        request: request(10),
        endpoints: &eps,
        prefix_blocks: &[0, 0, 10, 0, 0],
        pool_models: &pool,
        now_ms: NOW,
        stale_after_ms: STALE,
    };
    let d = s.schedule(&input, &mut fastrand::Rng::with_seed(1), 3, None).expect("decision");
    // The affinity filter prefers the holder; endpoints it set aside follow as fallbacks.
    assert_eq!(d.targets.len(), 3);
    assert_eq!(d.primary().index, 2);
    let d = s.schedule(&input, &mut fastrand::Rng::with_seed(1), 1, None).expect("decision");
    assert_eq!(d.targets.len(), 1);
    let input = Input { prefix_blocks: &[0; 5], ..input };
    let d = s.schedule(&input, &mut fastrand::Rng::with_seed(1), 3, None).expect("decision");
    let ids: std::collections::HashSet<EndpointId> = d.targets.iter().map(|t| t.id).collect();
    assert_eq!((d.targets.len(), ids.len()), (3, 3));
}

#[test]
fn explanation_accounts_for_every_endpoint() {
    let s = Scheduler::default_config();
    let mut eps = endpoints(3);
    eps[0].health = Health::Unhealthy;
    eps[1].metrics = fresh(2, 0.5);
    let pool = models();
    let input = Input {
        request: request(10),
        endpoints: &eps,
        prefix_blocks: &[0, 2, 0],
        pool_models: &pool,
        now_ms: NOW,
        stale_after_ms: STALE,
    };
    let mut x = Explanation::default();
    let d = s.schedule(&input, &mut fastrand::Rng::with_seed(3), 1, Some(&mut x)).expect("decision");
    assert_eq!(x.profile, "default");
    assert_eq!(x.endpoints.len(), 3);
    assert_eq!(x.endpoints[0].filtered_by.as_deref(), Some("health"));
    assert!(x.endpoints[0].scores.is_empty());
    for e in &x.endpoints[1..] {
        assert_eq!(e.scores.len(), 6, "one term per scorer");
        let sum: f64 = e.scores.iter().map(|t| t.weighted).sum();
        assert!((sum - e.total).abs() < 1e-9);
    }
    let winner = &x.endpoints[d.primary().index];
    assert_eq!(winner.rank, Some(0));
    assert!(x.endpoints[1..].iter().all(|e| e.total <= winner.total));
    assert_eq!(x.endpoints[1].scores[0].scorer, "prefix-cache-scorer");
    assert!(x.endpoints[1].scores[0].raw > 0.0);
}

#[test]
fn spec_errors_say_what_and_where() {
    check_err("plugins: [{type: magic-scorer}]", "plugins[0].type", "valid types: model-serving-filter");
    check_err(
        "plugins: [{type: queue-scorer}, {type: prefix-cache-scorer, parameters: {bogus: 1}}]",
        "plugins[1].parameters",
        "unknown field `bogus`, expected `matchLengthWeight` or `matchLengthScaleTokens`",
    );
    check_err("plugins: [{type: queue-scorer, parameters: {x: 1}}]", "plugins[0].parameters", "no parameters");
    check_err(
        "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef: nope}]}]",
        "schedulingProfiles[0].plugins[0].pluginRef",
        "defined plugins: queue-scorer",
    );
    check_err(
        "plugins: [{type: decode-filter}]\nschedulingProfiles: [{name: p, plugins: [{pluginRef: decode-filter, weight: 2}]}]",
        "schedulingProfiles[0].plugins[0].weight",
        "not a scorer",
    );
    check_err(
        "plugins: [{type: random-picker}, {type: max-score-picker}]",
        "schedulingProfiles[0].plugins[1]",
        "second one",
    );
    check_err("plugins: [{type: queue-scorer}, {type: queue-scorer}]", "plugins[1].name", "two plugins");
    check_err("schedulingProfiles: [{name: a}, {name: b}]", "schedulingProfiles", "single-profile-handler");
    check_err(
        "plugins: [{type: approx-prefix-cache-producer, parameters: {blockSizeBytes: 0}}]",
        "plugins[0].parameters",
        "block size",
    );
}

#[test]
fn producer_parameters_size_the_prefix() {
    let s = spec(
        "plugins: [{type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 16, maxPrefixTokensToMatch: 4096, lruCapacityPerServer: 1000}}, {type: prefix-cache-scorer}]",
    )
    .expect("compiles");
    assert_eq!(*s.prefix_config(), PrefixConfig { block_bytes: 64, max_blocks: 256, index_capacity: 1000 });
    let shown = s.to_string();
    assert!(shown.contains("prefix-cache-scorer"), "{shown}");
}

/// The P/D shape of the llm-d sample configuration, with a decider threshold of 256 tokens.
const PD: &str = "
plugins:
  - type: prefix-cache-scorer
  - type: active-request-scorer
  - type: prefill-filter
  - type: decode-filter
  - type: max-score-picker
  - type: disagg-profile-handler
    parameters: {deciders: {prefill: pd}}
  - {type: prefix-based-pd-decider, name: pd, parameters: {nonCachedTokens: 256}}
schedulingProfiles:
  - name: prefill
    plugins: [{pluginRef: prefill-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: active-request-scorer}, {pluginRef: max-score-picker}]
  - name: decode
    plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: active-request-scorer}, {pluginRef: max-score-picker}]
";

/// Endpoints 0 and 1 prefill, 2 and 3 decode.
fn pd_endpoints() -> Vec<Endpoint> {
    let mut eps = endpoints(4);
    for (i, e) in eps.iter_mut().enumerate() {
        e.role = if i < 2 { Role::Prefill } else { Role::Decode };
    }
    eps
}

#[test]
fn decode_first_then_prefill_when_enough_is_uncached() {
    let s = spec(PD).expect("compiles");
    assert!(s.to_string().contains("at least 256 prompt tokens"), "{s}");
    let eps = pd_endpoints();
    // 16 blocks of 64 tokens, nothing cached: disaggregated.
    let d = run(&s, &eps, &[0; 4], request(16), 1).expect("decision");
    assert_eq!(d.kind, DecisionKind::PrefillDecode);
    assert!(d.primary().index >= 2, "decode side: {d:?}");
    let p = d.prefill.expect("prefill target");
    assert!(p.index < 2, "prefill side: {p:?}");
    // The prefill endpoint is picked by its own prefix match.
    for seed in 0..8 {
        let d = run(&s, &eps, &[0, 12, 0, 0], request(16), seed).expect("decision");
        assert_eq!(d.prefill.map(|p| p.index), Some(1));
    }
    // Short prompt (3 blocks = 192 tokens < 256): decode only.
    let d = run(&s, &eps, &[0; 4], request(3), 1).expect("decision");
    assert_eq!((d.kind, d.prefill), (DecisionKind::DecodeOnly, None));
    // Mostly cached on a decode endpoint (14 of 16 blocks: 128 tokens left): that endpoint, alone.
    for seed in 0..8 {
        let d = run(&s, &eps, &[0, 0, 0, 14], request(16), seed).expect("decision");
        assert_eq!((d.primary().index, d.kind), (3, DecisionKind::DecodeOnly));
    }
    // Half cached (8 of 16: 512 tokens left): still worth a prefill endpoint.
    let d = run(&s, &eps, &[0, 0, 0, 8], request(16), 1).expect("decision");
    assert_eq!((d.primary().index, d.kind), (3, DecisionKind::PrefillDecode));
}

#[test]
fn no_prefill_endpoint_means_decode_only() {
    let s = spec(PD).expect("compiles");
    let mut eps = pd_endpoints();
    eps[0].health = Health::Unhealthy;
    eps[1].health = Health::Unhealthy;
    let d = run(&s, &eps, &[0; 4], request(16), 1).expect("decision");
    assert_eq!((d.kind, d.prefill), (DecisionKind::DecodeOnly, None));
    assert!(d.primary().index >= 2);
    // Endpoints in role `both` prefill for others, but never hand off to themselves.
    let mut eps = endpoints(1);
    eps[0].role = Role::Both;
    let d = run(&s, &eps, &[0], request(16), 1).expect("decision");
    assert_eq!((d.kind, d.prefill), (DecisionKind::DecodeOnly, None));
    let mut eps = endpoints(2);
    eps[0].role = Role::Both;
    eps[1].role = Role::Both;
    let d = run(&s, &eps, &[0; 2], request(16), 1).expect("decision");
    assert_eq!(d.kind, DecisionKind::PrefillDecode);
    assert_ne!(d.prefill.map(|p| p.index), Some(d.primary().index));
}

#[test]
fn only_disaggregable_requests_split_and_the_prefill_endpoint_is_no_fallback() {
    let s = spec(PD).expect("compiles");
    let eps = pd_endpoints();
    let req = SchedRequest { disaggregate: false, ..request(16) };
    let d = run(&s, &eps, &[0; 4], req, 1).expect("decision");
    assert_eq!((d.kind, d.prefill), (DecisionKind::DecodeOnly, None));
    // All in role both, three targets wanted: the prefill endpoint is not among them.
    let mut eps = endpoints(4);
    for e in &mut eps {
        e.role = Role::Both;
    }
    for seed in 0..8 {
        let d = run_with(&s, &eps, &[0; 4], request(16), seed, 3, None).expect("decision");
        let p = d.prefill.expect("prefill");
        assert!(d.targets.iter().all(|t| t.id != p.id), "{d:?}");
        assert!(!d.targets.is_empty());
    }
}

#[test]
fn the_subset_hint_narrows_decode_not_prefill() {
    let s = spec(PD).expect("compiles");
    let eps = pd_endpoints();
    let subset = Subset::parse_list("10.0.0.4:8000").expect("subset");
    let req = SchedRequest { subset: Some(&subset), ..request(16) };
    let d = run(&s, &eps, &[0; 4], req, 1).expect("decision");
    assert_eq!(d.primary().index, 3);
    assert!(d.prefill.is_some_and(|p| p.index < 2));
}

#[test]
fn explain_shows_the_prefill_profile() {
    let s = spec(PD).expect("compiles");
    let eps = pd_endpoints();
    let mut x = Explanation::default();
    let d = run_with(&s, &eps, &[0; 4], request(16), 1, 1, Some(&mut x)).expect("decision");
    assert_eq!(x.profile, "decode");
    let px = x.prefill.expect("prefill explanation");
    assert_eq!(px.profile, "prefill");
    let p = d.prefill.expect("prefill");
    assert_eq!(px.endpoints[p.index].rank, Some(0));
    let decode = d.primary().index;
    assert_eq!(px.endpoints[decode].filtered_by.as_deref(), Some("decode-endpoint"));
    assert_eq!(px.endpoints[5 - decode].filtered_by.as_deref(), Some("prefill-filter"));
}

#[test]
fn disagg_config_errors() {
    let base = "plugins: [{type: prefill-filter}, {type: decode-filter}, {type: disagg-profile-handler}";
    check_err(
        &format!("{base}]\nschedulingProfiles: [{{name: prefill}}, {{name: decode}}]"),
        "plugins",
        "needs one prefix-based-pd-decider",
    );
    check_err(
        &format!(
            "{base}, {{type: prefix-based-pd-decider, parameters: {{nonCachedTokens: 9}}}}]\nschedulingProfiles: [{{name: prefill}}, {{name: d}}]"
        ),
        "schedulingProfiles",
        "named `decode` and `prefill`",
    );
    check_err(
        &format!(
            "{base}, {{type: prefix-based-pd-decider, parameters: {{nonCachedTokens: 9}}}}]\nschedulingProfiles: [{{name: prefill}}, {{name: decode}}, {{name: x}}]"
        ),
        "schedulingProfiles[2].name",
        "`decode` and `prefill` only",
    );
    check_err(
        "plugins: [{type: disagg-profile-handler, parameters: {deciders: {prefill: nope}}}, {type: prefix-based-pd-decider}]\nschedulingProfiles: [{name: prefill}, {name: decode}]",
        "plugins",
        "no prefix-based-pd-decider has that name",
    );
    check_err(
        "plugins: [{type: disagg-profile-handler}, {type: prefix-based-pd-decider}]\nschedulingProfiles: [{name: prefill}, {name: decode}]",
        "plugins",
        "nonCachedTokens 0",
    );
    check_err(
        &format!(
            "{base}, {{type: prefix-based-pd-decider, parameters: {{nonCachedTokens: 9}}}}]\nschedulingProfiles: [{{name: prefill}}, {{name: decode}}, {{name: decode}}]"
        ),
        "schedulingProfiles[2].name",
        "two profiles are named `decode`",
    );
    check_err(
        &format!(
            "{base}, {{type: single-profile-handler}}, {{type: prefix-based-pd-decider, parameters: {{nonCachedTokens: 9}}}}]\nschedulingProfiles: [{{name: prefill}}, {{name: decode}}]"
        ),
        "plugins[3]",
        "one profile handler",
    );
    check_err(
        "plugins: [{type: prefix-cache-affinity-filter, parameters: {maxInFlightRatio: -1}}]",
        "plugins[0].parameters",
        "maxInFlightRatio",
    );
    check_err(
        "plugins: [{type: prefix-based-pd-decider, parameters: {nonCached: 3}}]",
        "plugins[0].parameters",
        "nonCachedTokens",
    );
}
