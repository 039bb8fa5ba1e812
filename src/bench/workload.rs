//! Seeded, deterministic workloads: the requests a benchmark sends, in order.
//!
//! Lengths are in the simulator's tokens (see `sim::tokenizer`): text is grown word by word from a
//! seeded generator until it has the requested count, so a prompt of N tokens is N tokens to the
//! simulator and, for English-like text, close to N for a real tokenizer.

use serde::Serialize;

use crate::sim::tokenizer;

/// One request of a workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
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
pub fn text(rng: &mut fastrand::Rng, tokens: usize) -> String {
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
pub fn shared_prefix(
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
pub fn multi_turn(
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
    // Round-robin over sessions in a seeded order, so every session advances turn by turn.
    let mut order: Vec<usize> = (0..sessions).collect();
    rng.shuffle(&mut order);
    let mut iters: Vec<_> = convs.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(sessions * turns);
    for _ in 0..turns {
        out.extend(order.iter().filter_map(|&s| iters[s].next()));
    }
    out
}

/// `n` independent prompts (no sharing), as a control.
pub fn random(seed: u64, n: usize, prompt_len: usize, output_len: usize) -> Vec<Item> {
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
    fn later_turns_resend_the_conversation() {
        let items = multi_turn(1, 2, 3, 10, 4, 4);
        let s0: Vec<&Item> = items.iter().filter(|i| i.group == 0).collect();
        assert_eq!(s0.len(), 3);
        assert_eq!(&s0[2].messages[..s0[1].messages.len()], &s0[1].messages[..]);
        assert_eq!(s0[2].messages.len(), s0[1].messages.len() + 2);
    }
}
