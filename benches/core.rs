//! Criterion benches of the decision core: prompt hashing, prefix-index match and record, and a
//! whole decision (parse + hash + match + score + pick + record) as the front-ends make it.
//!
//! Run: `cargo bench --bench core` (add `-- hashing` etc. to pick a group).

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

use kvgate::routing::endpoint::{Endpoint, EndpointId, Metrics, Role};
use kvgate::routing::plan::{PlanOptions, Planner};
use kvgate::routing::prefix::{BlockHash, PrefixConfig, PrefixIndex, hash_prompt};
use kvgate::routing::request::ApiKind;
use kvgate::routing::schedule::Scheduler;

/// Deterministic prose-like text of `len` bytes.
fn text(len: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the", "cache", "prefix", "token", "request", "endpoint", "model", "latency", "queue", "block", "decode",
        "prefill", "router", "answer", "question", "context",
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        s.push_str(WORDS[rng.usize(..WORDS.len())]);
        s.push(if rng.u8(..10) == 0 { '\n' } else { ' ' });
    }
    s.truncate(len);
    s
}

fn hashing(c: &mut Criterion) {
    let cfg = PrefixConfig::default();
    let mut g = c.benchmark_group("hashing");
    for kib in [1usize, 16, 220] {
        let prompt = text(kib * 1024, 1);
        g.throughput(Throughput::Bytes(prompt.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("{kib}KiB")), |b| {
            b.iter(|| hash_prompt(&cfg, "meta-llama/Llama-3.1-8B-Instruct", None, black_box(prompt.as_bytes())))
        });
    }
    g.finish();
}

/// A chain of `n` hashes for prompt `tag`.
fn chain(tag: u64, n: usize) -> Vec<BlockHash> {
    (0..n as u64).map(|i| BlockHash(xxhash_rust::xxh3::xxh3_64_with_seed(&i.to_le_bytes(), tag))).collect()
}

fn index(c: &mut Criterion) {
    const RESIDENT: usize = 1 << 20;
    const CHAIN: usize = 64; // a 16 KiB prompt
    let mut g = c.benchmark_group("index");
    for n in [8usize, 64, 512] {
        let per = RESIDENT / n;
        let index = PrefixIndex::new(per);
        let ids: Vec<EndpointId> = (0..n as u32).map(EndpointId::new).collect();
        for (e, id) in ids.iter().enumerate() {
            for k in 0..per / CHAIN {
                index.record(*id, &chain((e * 1_000_000 + k) as u64, CHAIN));
            }
        }
        let stats = index.stats();
        println!(
            "index with {n} endpoints: {} resident entries, {:.1} bytes per entry",
            stats.resident_blocks,
            stats.bytes_per_entry()
        );
        // A prompt the first endpoint holds whole and the second holds half of.
        let hot = chain(7, CHAIN);
        index.record(ids[0], &hot);
        index.record(ids[1], &hot[..CHAIN / 2]);
        let mut out = Vec::with_capacity(n);
        g.bench_function(BenchmarkId::new("match", n), |b| {
            b.iter(|| index.match_into(black_box(&ids), black_box(&hot), &mut out))
        });
        let mut k = 0u64;
        g.bench_function(BenchmarkId::new("record", n), |b| {
            b.iter(|| {
                k += 1;
                // Half the prompt is shared (as in a conversation), half is new.
                let mut p = hot[..CHAIN / 2].to_vec();
                p.extend(chain(1 << 40 | k, CHAIN / 2));
                index.record(ids[(k as usize) % n], black_box(&p));
            })
        });
    }
    g.finish();
}

fn chat_body(system_bytes: usize, user: &str) -> Vec<u8> {
    let turns: Vec<serde_json::Value> = (0..6)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": text(300, 100 + i)}))
        .collect();
    let mut messages = vec![json!({"role": "system", "content": text(system_bytes, 2)})];
    messages.extend(turns);
    messages.push(json!({"role": "user", "content": user}));
    serde_json::to_vec(&json!({"model": "m", "stream": true, "max_tokens": 256, "messages": messages}))
        .expect("serialises")
}

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    for kib in [16usize, 220] {
        let body = chat_body(kib * 1024 - 2200, "what is the answer?");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(BenchmarkId::new("chat", format!("{kib}KiB")), |b| {
            b.iter(|| {
                kvgate::routing::request::parse(ApiKind::ChatCompletions, black_box(&body), 32 << 20)
                    .map(|r| r.priority)
            })
        });
    }
    g.finish();
}

/// Tokenizing a chat request in-process (render the template, encode), with the test model's
/// tokenizer (a 2,048-entry byte-level BPE; a real model's larger vocabulary costs more per
/// merge lookup, not more merges per byte).
fn tokenizing(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-llama-tokenizer");
    let read = |f: &str| std::fs::read(dir.join(f)).expect("tokenizer file");
    let template = String::from_utf8(read("chat_template.jinja")).expect("UTF-8");
    let t = kvgate::routing::tokenize::PromptTokenizer::from_parts(
        &read("tokenizer.json"),
        Some(&read("tokenizer_config.json")),
        Some(&template),
    )
    .expect("tokenizer");
    let mut g = c.benchmark_group("tokenize");
    for kib in [16usize, 220] {
        let body: serde_json::Value =
            serde_json::from_slice(&chat_body(kib * 1024 - 2200, "what is the answer?")).expect("JSON");
        g.throughput(Throughput::Bytes((kib * 1024) as u64));
        // Seen before (a shared system prompt, a conversation's earlier turns): its segments
        // come from the cache.
        g.bench_function(BenchmarkId::new("chat", format!("{kib}KiB")), |b| {
            let chat = kvgate::routing::tokenize::ChatPrompt::of_request(&body);
            b.iter(|| t.encode_chat(black_box(&chat)).map(|ids| ids.len()))
        });
        // First sight: rendered and encoded whole.
        g.bench_function(BenchmarkId::new("chat_first_sight", format!("{kib}KiB")), |b| {
            let chat = kvgate::routing::tokenize::ChatPrompt::of_request(&body);
            b.iter(|| {
                let text = t.render_chat(black_box(&chat)).expect("renders");
                t.encode_whole(&text, false).map(|ids| ids.len())
            })
        });
    }
    g.finish();
}

fn tiny_llama() -> kvgate::routing::tokenize::PromptTokenizer {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-llama-tokenizer");
    let read = |f: &str| std::fs::read(dir.join(f)).expect("tokenizer file");
    let template = String::from_utf8(read("chat_template.jinja")).expect("UTF-8");
    kvgate::routing::tokenize::PromptTokenizer::from_parts(
        &read("tokenizer.json"),
        Some(&read("tokenizer_config.json")),
        Some(&template),
    )
    .expect("tokenizer")
}

/// A `BlockStored` of `blocks` blocks of 16 tokens, engine hashes `base..`.
fn stored(base: u64, parent: Option<u64>, tokens: &[u32]) -> kvgate::routing::kv_events::KvEvent {
    use kvgate::routing::kv_events::{BlockStored, KvEvent, Medium};
    let n = tokens.len() / 16;
    KvEvent::BlockStored(BlockStored {
        block_hashes: (0..n as u64).map(|i| base + i).collect(),
        parent_block_hash: parent,
        token_ids: tokens.to_vec(),
        block_size: 16,
        lora_id: None,
        medium: Medium::Gpu,
        lora_name: None,
        extra_keys: Some(vec![Vec::new(); n]),
        group_idx: 0,
    })
}

fn batch(events: Vec<kvgate::routing::kv_events::KvEvent>) -> kvgate::routing::kv_events::EventBatch {
    kvgate::routing::kv_events::EventBatch { ts: 0.0, events, dp_rank: None, unknown: 0 }
}

/// The precise index: applying events (steady churn: each batch stores a 16-block chain and
/// evicts an older one), its memory per million blocks, and decoding a recorded batch.
fn precise(c: &mut Criterion) {
    use kvgate::routing::kv_events::{KvEvent, Medium, decode_batch};
    use kvgate::routing::prefix::precise::PreciseIndex;
    let mut g = c.benchmark_group("precise");
    let index = PreciseIndex::new(1 << 20);
    let ep = EndpointId::new(0);
    const LIVE: u64 = 512;
    let chains: Vec<Vec<u32>> = (0..4096u32).map(|c| (0..256).map(|t| c * 7919 + t).collect()).collect();
    for (i, toks) in chains.iter().enumerate().take(LIVE as usize) {
        index.apply(ep, &batch(vec![stored(i as u64 * 16, None, toks)]), 0);
    }
    let mut i = LIVE;
    g.throughput(Throughput::Elements(32));
    g.bench_function("apply_16_stored_16_removed", |b| {
        b.iter(|| {
            let old = i - LIVE;
            let removed = KvEvent::BlockRemoved {
                block_hashes: (0..16).map(|k| old * 16 + k).collect(),
                medium: Medium::Gpu,
                group_idx: 0,
            };
            let toks = &chains[(i % chains.len() as u64) as usize];
            let a = index.apply(ep, &batch(vec![stored(i * 16, None, toks), removed]), 0);
            i += 1;
            black_box(a)
        })
    });
    // Memory: a million blocks over 64 endpoints, each block held by one of them.
    let big = PreciseIndex::new(1 << 20);
    for e in 0..64u32 {
        for c in 0..(1_000_000 / 64 / 16) as u32 {
            let toks: Vec<u32> = (0..256).map(|t| (e << 20) + c * 256 + t).collect();
            big.apply(
                EndpointId::new(e),
                &batch(vec![stored((u64::from(e) << 32) | (u64::from(c) * 16), None, &toks)]),
                0,
            );
        }
    }
    let st = big.stats();
    println!(
        "precise index: {} blocks on {} endpoints, {} keys, {:.1} MiB ({:.1} bytes per block)",
        st.blocks,
        st.endpoints,
        st.keys,
        st.heap_bytes as f64 / (1 << 20) as f64,
        st.heap_bytes as f64 / st.blocks.max(1) as f64
    );
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vllm-0.32-kv-events.jsonl"),
    )
    .expect("recording");
    let row: serde_json::Value = serde_json::from_str(text.lines().next().expect("a row")).expect("JSON");
    let hex = row["frames_hex"][2].as_str().expect("payload");
    let payload: Vec<u8> =
        (0..hex.len()).step_by(2).map(|k| u8::from_str_radix(&hex[k..k + 2], 16).expect("hex")).collect();
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("decode_recorded_batch_21_blocks", |b| {
        b.iter(|| decode_batch(black_box(&payload)).map(|b| b.events.len()))
    });
    g.finish();
}

/// A whole decision as the front-ends make it: parse, hash, match, score, pick, record.
fn decide(router: &Planner, body: &[u8], eps: &[Endpoint], opts: PlanOptions<'_>, rng: &mut fastrand::Rng) -> usize {
    let req = kvgate::routing::request::parse(ApiKind::ChatCompletions, body, 32 << 20).expect("parses");
    router.plan(&req, eps, opts, rng, None).expect("routes").decision.primary().index
}

/// A P/D scheduler whose decider always splits (a threshold of one uncached token), so every
/// decision runs both profiles.
const PD_SCHEDULER: &str = "
plugins:
  - {type: prefill-filter}
  - {type: decode-filter}
  - {type: prefix-cache-scorer}
  - {type: active-request-scorer}
  - {type: token-load-scorer}
  - {type: queue-scorer}
  - {type: disagg-profile-handler}
  - {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 1}}
schedulingProfiles:
  - {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: token-load-scorer, weight: 2}, {pluginRef: queue-scorer}]}
  - {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: active-request-scorer, weight: 2}, {pluginRef: queue-scorer}]}
";

fn decision(c: &mut Criterion) {
    const ENDPOINTS: u32 = 64;
    let mut g = c.benchmark_group("decision");
    // A precise pool: the same decision plus tokenization and the precise match, with one
    // endpoint holding the conversation's blocks by its events.
    for kib in [16usize, 220] {
        use kvgate::routing::plan::PrecisePrefix;
        use kvgate::routing::prefix::precise::PreciseIndex;
        let t = tiny_llama();
        let body = chat_body(kib * 1024 - 2200, "what is the answer?");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        let tokens = t.encode_chat(&kvgate::routing::tokenize::ChatPrompt::of_request(&v)).expect("tokens");
        let index = PreciseIndex::default();
        let eps: Vec<Endpoint> = (0..ENDPOINTS)
            .map(|i| {
                let addr = format!("10.1.{}.{}:8000", i / 200, i % 200 + 1).parse().expect("addr");
                index.set_connected(EndpointId::new(i), true);
                Endpoint::new(EndpointId::new(i), addr, BTreeMap::new())
            })
            .collect();
        let full = tokens.len() / 16 * 16;
        index.apply(EndpointId::new(3), &batch(vec![stored(1, None, &tokens[..full])]), 0);
        let router = Planner::new(vec!["m".into()], Scheduler::default_precise(), 2000)
            .with_precise(PrecisePrefix::new(t, index, 5000, 16));
        let mut rng = fastrand::Rng::with_seed(1);
        let opts = PlanOptions { subset: None, want: 3, now_ms: 100, disaggregate: false, lora: None, open: None };
        assert_eq!(decide(&router, &body, &eps, opts, &mut rng), 3, "the precise holder wins");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(BenchmarkId::new("precise_chat_64_endpoints", format!("{kib}KiB")), |b| {
            b.iter(|| decide(&router, black_box(&body), &eps, opts, &mut rng))
        });
    }
    let pd: kvgate::routing::schedule::SchedulerSpec = serde_saphyr::from_str(PD_SCHEDULER).expect("yaml");
    for (name, kib, scheduler) in [
        ("chat_64_endpoints", 16usize, Scheduler::default_config()),
        ("chat_64_endpoints", 220, Scheduler::default_config()),
        ("pd_32_prefill_32_decode", 16, Scheduler::from_spec(&pd).expect("compiles")),
        ("pd_32_prefill_32_decode", 220, Scheduler::from_spec(&pd).expect("compiles")),
    ] {
        let pd = scheduler.disagg().is_some();
        let router = Planner::new(vec!["m".into()], scheduler, 2000);
        let mut eps: Vec<Endpoint> = (0..ENDPOINTS)
            .map(|i| {
                let addr = format!("10.0.{}.{}:8000", i / 200, i % 200 + 1).parse().expect("addr");
                let mut e = Endpoint::new(EndpointId::new(i), addr, BTreeMap::new());
                e.metrics = Some(Metrics {
                    running: i % 7,
                    waiting: i % 3,
                    kv_usage: f64::from(i % 10) / 10.0,
                    lora: None,
                    scraped_at_ms: 0,
                });
                e
            })
            .collect();
        for e in &mut eps {
            e.in_flight.start(u64::from(e.id.index() as u32 % 5) * 1000);
            if pd {
                e.role = if e.id.index() % 2 == 0 { Role::Prefill } else { Role::Decode };
            }
        }
        let body = chat_body(kib * 1024 - 2200, "what is the answer?");
        let mut rng = fastrand::Rng::with_seed(1);
        let opts = PlanOptions { subset: None, want: 3, now_ms: 100, disaggregate: pd, lora: None, open: None };
        // Warm the index: the conversation has been seen, and other prompts fill the index.
        for i in 0..256 {
            let other = chat_body(4096, &format!("filler {i}"));
            decide(&router, &other, &eps, opts, &mut rng);
        }
        decide(&router, &body, &eps, opts, &mut rng);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(BenchmarkId::new(name, format!("{kib}KiB")), |b| {
            b.iter(|| decide(&router, black_box(&body), &eps, opts, &mut rng))
        });
    }
    g.finish();
}

/// The proxy's P/D body work: the prefill leg's body, then the decode leg's.
fn handoff_bodies(c: &mut Criterion) {
    let mut g = c.benchmark_group("handoff");
    let params: serde_json::Value = json!({"do_remote_prefill": true, "do_remote_decode": false,
        "remote_block_ids": (0..2048).collect::<Vec<u32>>(), "remote_engine_id": "e", "remote_host": "10.0.0.1",
        "remote_port": 5600});
    for kib in [16usize, 220] {
        let body = chat_body(kib * 1024 - 2200, "what is the answer?");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(BenchmarkId::new("bodies", format!("{kib}KiB")), |b| {
            b.iter(|| {
                let p = kvgate::routing::pd::prefill_body(black_box(&body)).expect("object");
                let d = kvgate::routing::pd::decode_body(black_box(&body), &params).expect("object");
                p.len() + d.len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hashing, index, parsing, tokenizing, precise, decision, handoff_bodies);
criterion_main!(benches);
