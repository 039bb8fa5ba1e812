//! Tests of the engine: batching, chunked prefill, preemption, prefix caching, LoRA slots,
//! aborts and P/D legs, stepped by hand with time passed in.

use super::*;

fn config(blocks: usize, max_seqs: usize, budget: usize) -> EngineConfig {
    EngineConfig {
        rank: 0,
        block_size: 16,
        num_gpu_blocks: blocks,
        max_num_seqs: max_seqs,
        max_num_batched_tokens: budget,
        time_scale: 0.0,
        latency: Latency {
            step_overhead_ms: 10.0,
            prefill_ms_per_token: 0.1,
            decode_ms_per_seq: 0.5,
            kv_transfer_ms_per_token: 0.001,
            lora_load_ms: 20.0,
        },
        max_loras: 1,
        engine_id: "e".into(),
        side_channel: ("127.0.0.1".into(), 5600),
        seed: 1,
        model_name: "m".into(),
        vocab: crate::tools::sim::tokenizer::VOCAB,
    }
}

/// Drives an engine step by step on a virtual clock.
struct Harness {
    engine: Engine,
    clock_ms: f64,
}

impl Harness {
    fn new(cfg: EngineConfig) -> Self {
        let (engine, _handle, _rx) = Engine::new(cfg, SimMetrics::new(), None);
        Self { engine, clock_ms: 0.0 }
    }

    fn submit(&mut self, id: &str, prompt: Vec<u32>, max_tokens: usize) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.engine.load.in_flight.fetch_add(1, Ordering::Relaxed);
        self.engine.handle(Command::Submit(Box::new(Submission {
            id: id.into(),
            prompt,
            max_tokens,
            finish_at_max: FinishReason::Length,
            lora: None,
            cache_salt: None,
            handoff: Handoff::None,
            events: tx,
            arrival: Instant::now(),
            stop: None,
        })));
        rx
    }

    /// One step; returns the tokens scheduled per request.
    fn step(&mut self) -> Vec<usize> {
        self.engine.drop_abandoned();
        let (work, loads) = self.engine.schedule();
        self.clock_ms += self.engine.step_ms(&work, loads);
        self.engine.apply(&work);
        work.iter().map(|w| w.tokens).collect()
    }

    /// Steps until `rx` has produced its first event; returns the virtual time then.
    fn until_first(&mut self, rx: &mut mpsc::UnboundedReceiver<Event>) -> f64 {
        for _ in 0..10_000 {
            self.step();
            if !rx.is_empty() {
                return self.clock_ms;
            }
        }
        panic!("no token after 10,000 steps");
    }

    /// Steps until `rx` reports the end.
    fn until_done(&mut self, rx: &mut mpsc::UnboundedReceiver<Event>) -> (Done, usize) {
        let mut tokens = 0;
        for _ in 0..100_000 {
            while let Ok(e) = rx.try_recv() {
                tokens += usize::from(e.token.is_some());
                if let Some(d) = e.done {
                    return (d, tokens);
                }
            }
            self.step();
        }
        panic!("request never finished");
    }
}

fn prompt(n: u32, seed: u32) -> Vec<u32> {
    (0..n).map(|i| seed * 100_000 + i).collect()
}

#[test]
fn chunked_prefill_respects_the_token_budget() {
    let mut h = Harness::new(config(1000, 8, 100));
    let mut rx = h.submit("a", prompt(250, 1), 3);
    assert_eq!(h.step(), [100]);
    assert!(rx.is_empty(), "no token before the prompt is computed");
    assert_eq!(h.step(), [100]);
    assert_eq!(h.step(), [50]);
    assert!(rx.try_recv().is_ok_and(|e| e.token.is_some()), "first token at the end of prefill");
    assert_eq!(h.step(), [1], "then one token per step");
    let (done, n) = h.until_done(&mut rx);
    assert_eq!((done.completion_tokens, done.reason, n), (3, FinishReason::Length, 2));
}

#[test]
fn ttft_grows_with_uncached_tokens() {
    let mut h = Harness::new(config(1000, 8, 8192));
    let mut rx = h.submit("cold", prompt(1000, 1), 1);
    let cold = h.until_first(&mut rx);
    h.until_done(&mut rx);
    let t0 = h.clock_ms;
    let mut rx = h.submit("warm", prompt(1000, 1), 1);
    let warm = h.until_first(&mut rx) - t0;
    // One step each: overhead + per-request cost + uncached tokens × per-token cost.
    assert!((cold - (10.0 + 0.5 + 1000.0 * 0.1)).abs() < 1e-6, "{cold}");
    assert!((warm - (10.0 + 0.5 + 8.0 * 0.1)).abs() < 1e-6, "{warm}");
    let (done, _) = h.until_done(&mut rx);
    assert_eq!(done.cached_tokens, 992);
}

#[test]
fn requests_queue_beyond_max_num_seqs() {
    let mut h = Harness::new(config(1000, 1, 8192));
    let mut a = h.submit("a", prompt(100, 1), 20);
    let mut b = h.submit("b", prompt(100, 2), 20);
    let first_a = h.until_first(&mut a);
    let (_, _) = h.until_done(&mut a);
    let a_end = h.clock_ms;
    let first_b = h.until_first(&mut b);
    assert!(first_a < a_end && a_end < first_b, "b waits for a: {first_a} {a_end} {first_b}");
    assert_eq!(h.engine.metrics.waiting.with_label_values(&["0", "m"]).get(), 0);
}

#[test]
fn blocks_running_out_preempts_the_newest_request() {
    // 10 blocks = 160 tokens; two requests that each grow to 64 + 60 = 124 tokens (8 blocks).
    let mut h = Harness::new(config(10, 8, 8192));
    let mut a = h.submit("a", prompt(64, 1), 60);
    let mut b = h.submit("b", prompt(64, 2), 60);
    let (da, na) = h.until_done(&mut a);
    let (db, nb) = h.until_done(&mut b);
    assert_eq!((da.completion_tokens, na, db.completion_tokens, nb), (60, 60, 60, 60));
    assert!(h.engine.metrics.preemptions.with_label_values(&["0", "m"]).get() > 0);
    assert_eq!(h.engine.pool.usage(), 0.0, "every block released");
}

#[test]
fn computed_blocks_are_hittable_mid_prefill() {
    // Budget 128: a computes 128 tokens, then its last 72 leave room to admit b in the same
    // step, while a is still mid-prefill; b reuses a's 8 committed blocks.
    let mut h = Harness::new(config(1000, 8, 128));
    let mut a = h.submit("a", prompt(200, 1), 1);
    assert_eq!(h.step(), [128]);
    let mut b = h.submit("b", prompt(200, 1), 1);
    assert_eq!(h.step(), [72, 56]);
    let (db, _) = h.until_done(&mut b);
    assert_eq!(db.cached_tokens, 128);
    h.until_done(&mut a);
}

#[test]
fn swapping_lora_adapters_costs_load_time() {
    let mut h = Harness::new(config(1000, 8, 8192));
    let submit = |h: &mut Harness, id: &str, lora: &str| {
        let (tx, rx) = mpsc::unbounded_channel();
        h.engine.handle(Command::Submit(Box::new(Submission {
            id: id.into(),
            prompt: prompt(10, 1),
            max_tokens: 1,
            finish_at_max: FinishReason::Length,
            lora: Some(lora.into()),
            cache_salt: None,
            handoff: Handoff::None,
            events: tx,
            arrival: Instant::now(),
            stop: None,
        })));
        rx
    };
    let step_ms = |h: &mut Harness, rx: &mut mpsc::UnboundedReceiver<Event>| {
        let t0 = h.clock_ms;
        h.until_done(rx);
        h.clock_ms - t0
    };
    let mut a = submit(&mut h, "1", "sql");
    let first = step_ms(&mut h, &mut a);
    let mut a = submit(&mut h, "2", "sql");
    let resident = step_ms(&mut h, &mut a);
    let mut b = submit(&mut h, "3", "chat");
    let swapped = step_ms(&mut h, &mut b);
    // max_loras 1: the first use and every swap pay the 20 ms load; a resident adapter does not.
    assert!((first - resident - 20.0).abs() < 2.0, "{first} {resident}");
    assert!((swapped - resident - 20.0).abs() < 2.0, "{swapped} {resident}");
}

#[test]
fn abandoned_requests_are_aborted_and_freed() {
    let mut h = Harness::new(config(100, 8, 8192));
    let rx = h.submit("a", prompt(100, 1), 1000);
    h.step();
    h.step();
    drop(rx);
    h.step();
    assert!(h.engine.running.is_empty());
    assert_eq!(h.engine.pool.usage(), 0.0);
    assert_eq!(h.engine.metrics.request_success.with_label_values(&["0", "abort", "m"]).get(), 1);
    assert_eq!(h.engine.load.in_flight.load(Ordering::Relaxed), 0);
}
