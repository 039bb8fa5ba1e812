//! Seeded, deterministic workloads: the requests a benchmark sends, in order.
//!
//! Lengths are in the simulator's tokens (see `sim::tokenizer`): text is grown word by word from a
//! seeded generator until it has the requested count, so a prompt of N tokens is N tokens to the
//! simulator and, for English-like text, close to N for a real tokenizer.

use serde::Serialize;

use crate::tools::sim::tokenizer;

/// One request of a workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Item {
    /// Chat messages (role, content), system prompt first.
    pub messages: Vec<(String, String)>,
    /// Tokens to generate.
    pub output_len: usize,
    /// Group or session the request belongs to (for shared-prefix and multi-turn work).
    pub group: usize,
}

const WORDS: &[&str] = &[
    "the", "river", "engine", "quiet", "market", "signal", "yellow", "harbor", "policy", "garden", "lattice", "winter",
    "copper", "motion", "ledger", "canvas", "orbit", "summit", "vector", "meadow", "thunder", "archive", "pilot",
    "cinder", "fabric", "glacier", "harvest", "island", "jungle", "kernel", "lantern", "mirror",
];

/// Text of exactly `tokens` simulator tokens.
pub(crate) fn text(rng: &mut fastrand::Rng, tokens: usize) -> String {
    let mut out = String::with_capacity(tokens * 5);
    let mut n = 0;
    while n < tokens {
        let w = WORDS[rng.usize(..WORDS.len())];
        let piece = if out.is_empty() { w.to_owned() } else { format!(" {w}") };
        let c = tokenizer::count(&piece);
        if n + c > tokens {
            // Pad with single-letter words (one token each) to land exactly.
            for _ in n..tokens {
                out.push_str(if out.is_empty() { "a" } else { " a" });
            }
            return out;
        }
        out.push_str(&piece);
        n += c;
    }
    out
}

/// `groups` system prompts of `system_len` tokens, each shared by `per_group` questions of
/// `question_len` tokens; requests interleaved across groups in a seeded order.
pub(crate) fn shared_prefix(
    seed: u64,
    groups: usize,
    per_group: usize,
    system_len: usize,
    question_len: usize,
    output_len: usize,
) -> Vec<Item> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let systems: Vec<String> = (0..groups).map(|g| format!("Group {g}. {}", text(&mut rng, system_len))).collect();
    let mut items: Vec<Item> = (0..groups)
        .flat_map(|g| (0..per_group).map(move |q| (g, q)))
        .map(|(g, _)| Item {
            messages: vec![("system".into(), systems[g].clone()), ("user".into(), text(&mut rng, question_len))],
            output_len,
            group: g,
        })
        .collect();
    rng.shuffle(&mut items);
    items
}

/// `sessions` conversations of `turns` turns: each turn resends the whole conversation (with
/// the assistant's earlier answers as `answer_len`-token stand-ins) plus a new `question_len`
/// message. Turns of different sessions interleave; a session's turns stay in order.
pub(crate) fn multi_turn(
    seed: u64,
    sessions: usize,
    turns: usize,
    system_len: usize,
    question_len: usize,
    output_len: usize,
) -> Vec<Item> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut convs: Vec<Vec<Item>> = Vec::with_capacity(sessions);
    for s in 0..sessions {
        let mut msgs = vec![("system".to_owned(), format!("Session {s}. {}", text(&mut rng, system_len)))];
        let mut conv = Vec::with_capacity(turns);
        for _ in 0..turns {
            msgs.push(("user".into(), text(&mut rng, question_len)));
            conv.push(Item { messages: msgs.clone(), output_len, group: s });
            msgs.push(("assistant".into(), text(&mut rng, output_len)));
        }
        convs.push(conv);
    }
    // Rounds over the sessions, each in a fresh seeded order: every session advances turn by turn,
    // and no fixed cycle lines a session up with the same replica under round-robin routing.
    let mut order: Vec<usize> = (0..sessions).collect();
    let mut iters: Vec<_> = convs.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(sessions * turns);
    for _ in 0..turns {
        rng.shuffle(&mut order);
        out.extend(order.iter().filter_map(|&s| iters[s].next()));
    }
    out
}

/// One line of a trace file.
#[derive(Debug, Clone, serde::Deserialize)]
struct TraceLine {
    /// Arrival, milliseconds from the start.
    timestamp: f64,
    input_length: usize,
    output_length: usize,
    /// Prefix block ids: equal ids at equal positions are equal prompt blocks.
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// A trace (JSONL: `timestamp` ms, `input_length`, `output_length`, `hash_ids`) as requests and
/// their arrival offsets in seconds. Block `id` is the same `block_tokens`-token text wherever it
/// appears, so equal hash ids give identical text; the prompt is cut or padded (with text unique
/// to the request) to `input_length`.
pub(crate) fn trace(jsonl: &str, block_tokens: usize) -> Result<Vec<(f64, Item)>, String> {
    let mut out = Vec::new();
    let mut blocks: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    for (n, line) in jsonl.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let t: TraceLine = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        let mut prompt = String::new();
        let mut tokens = 0;
        for id in &t.hash_ids {
            if tokens + block_tokens > t.input_length {
                break;
            }
            let block =
                blocks.entry(*id).or_insert_with(|| text(&mut fastrand::Rng::with_seed(*id ^ 0xb10c), block_tokens));
            if !prompt.is_empty() {
                prompt.push(' ');
            }
            prompt.push_str(block);
            tokens = tokenizer::count(&prompt);
        }
        if tokens < t.input_length {
            let mut rng = fastrand::Rng::with_seed(n as u64 ^ 0x7a11);
            let tail = text(&mut rng, t.input_length - tokens);
            prompt = if prompt.is_empty() { tail } else { format!("{prompt} {tail}") };
        }
        out.push((
            t.timestamp / 1000.0,
            Item {
                messages: vec![("user".into(), prompt)],
                output_len: t.output_length.max(1),
                group: t.hash_ids.first().copied().unwrap_or(0) as usize,
            },
        ));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(out)
}

/// `n` independent prompts (no sharing), as a control.
pub(crate) fn random(seed: u64, n: usize, prompt_len: usize, output_len: usize) -> Vec<Item> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| Item {
            messages: vec![("user".into(), format!("{i}: {}", text(&mut rng, prompt_len)))],
            output_len,
            group: i,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_the_requested_length() {
        let mut rng = fastrand::Rng::with_seed(1);
        for n in [1, 2, 7, 64, 1000] {
            assert_eq!(tokenizer::count(&text(&mut rng, n)), n, "{n} tokens");
        }
    }

    #[test]
    fn workloads_are_deterministic_per_seed() {
        assert_eq!(shared_prefix(3, 4, 3, 50, 10, 5), shared_prefix(3, 4, 3, 50, 10, 5));
        assert_ne!(shared_prefix(3, 4, 3, 50, 10, 5), shared_prefix(4, 4, 3, 50, 10, 5));
        assert_eq!(multi_turn(3, 2, 3, 20, 5, 5), multi_turn(3, 2, 3, 20, 5, 5));
    }

    #[test]
    fn shared_prefix_shape_and_interleaving() {
        let items = shared_prefix(7, 5, 4, 40, 8, 3);
        assert_eq!(items.len(), 20);
        for g in 0..5 {
            let mine: Vec<&Item> = items.iter().filter(|i| i.group == g).collect();
            assert_eq!(mine.len(), 4);
            assert!(mine.iter().all(|i| i.messages[0] == mine[0].messages[0]), "one system prompt per group");
        }
        let first_five: std::collections::HashSet<usize> = items[..5].iter().map(|i| i.group).collect();
        assert!(first_five.len() > 1, "groups are interleaved, not sent one after another");
    }

    #[test]
    fn trace_blocks_and_lengths() {
        let jsonl = r#"{"timestamp": 0, "input_length": 40, "output_length": 5, "hash_ids": [1, 2]}
{"timestamp": 250, "input_length": 50, "output_length": 3, "hash_ids": [1, 2, 3]}
{"timestamp": 100, "input_length": 25, "output_length": 2, "hash_ids": [9]}"#;
        let items = trace(jsonl, 16).expect("parses");
        let times: Vec<f64> = items.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, [0.0, 0.1, 0.25], "sorted by arrival");
        let prompt = |i: usize| items[i].1.messages[0].1.clone();
        for (i, want) in [(0, 40), (1, 25), (2, 50)] {
            assert_eq!(tokenizer::count(&prompt(i)), want, "request {i}");
        }
        // Blocks 1 and 2 are the same text in both requests that start with them.
        let block = |id: u64| text(&mut fastrand::Rng::with_seed(id ^ 0xb10c), 16);
        let head = format!("{} {}", block(1), block(2));
        assert!(prompt(0).starts_with(&head) && prompt(2).starts_with(&head));
        assert!(prompt(2).contains(&block(3)));
        assert!(!prompt(1).starts_with(&block(1)));
        assert!(trace("{bad", 16).is_err());
    }

    #[test]
    fn later_turns_resend_the_conversation() {
        let items = multi_turn(1, 2, 3, 10, 4, 4);
        let s0: Vec<&Item> = items.iter().filter(|i| i.group == 0).collect();
        assert_eq!(s0.len(), 3);
        assert_eq!(&s0[2].messages[..s0[1].messages.len()], &s0[1].messages[..]);
        assert_eq!(s0[2].messages.len(), s0[1].messages.len() + 2);
    }
}
