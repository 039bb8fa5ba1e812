//! The simulator's tokenizer: deterministic, dependency-free, and close enough to a BPE
//! tokenizer in length that prompt sizes, cache hits and latencies come out realistic.
//!
//! How text splits into tokens:
//! - a word piece is up to 4 ASCII letters or digits, with the single space before it folded in
//!   (" token" → " toke", "n"): a long word costs one token per 4 characters;
//! - every other ASCII character (punctuation, newline, a second space) is one token;
//! - every non-ASCII character is one token.
//!
//! English prose averages about 4 bytes per token this way (a unit test measures it), the same
//! figure kvgate's router assumes and close to Llama 3's tokenizer on English. Token ids are a
//! hash of the piece's bytes into a 128,000-entry vocabulary, so equal text gives equal ids;
//! ids 128,000 and up are special tokens (chat template markers).
//!
//! Chat prompts use a Llama-3-shaped template: `<|begin_of_text|>`, then per message a header
//! (`<|start_header_id|>` role `<|end_header_id|>` `\n\n`), the content and `<|eot_id|>`, then the
//! assistant header as the generation prompt. Each message is tokenized on its own, so turn N+1
//! of a conversation starts with exactly the tokens of turn N (up to its generation prompt).

use xxhash_rust::xxh3::xxh3_64;

/// Regular vocabulary size; special tokens come after it.
pub(crate) const VOCAB: u32 = 128_000;
/// `<|begin_of_text|>`.
pub(crate) const BEGIN_OF_TEXT: u32 = VOCAB;
/// `<|start_header_id|>`.
pub(crate) const START_HEADER: u32 = VOCAB + 6;
/// `<|end_header_id|>`.
pub(crate) const END_HEADER: u32 = VOCAB + 7;
/// `<|eot_id|>`.
pub(crate) const EOT: u32 = VOCAB + 9;
/// Image placeholder token (one per 16 bytes of image reference, at least 16).
pub(crate) const IMAGE: u32 = VOCAB + 10;

fn piece_id(piece: &[u8]) -> u32 {
    (xxh3_64(piece) % u64::from(VOCAB)) as u32
}

/// Appends the tokens of `text` to `out`.
pub(crate) fn tokenize(text: &str, out: &mut Vec<u32>) {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let c = b[i];
        if c.is_ascii_alphanumeric() || (c == b' ' && b.get(i + 1).is_some_and(u8::is_ascii_alphanumeric)) {
            if c == b' ' {
                i += 1;
            }
            let word_start = i;
            while i < b.len() && i - word_start < 4 && b[i].is_ascii_alphanumeric() {
                i += 1;
            }
        } else if c.is_ascii() {
            i += 1;
        } else {
            // One token per UTF-8 character.
            i += 1;
            while i < b.len() && (b[i] & 0xC0) == 0x80 {
                i += 1;
            }
        }
        out.push(piece_id(&b[start..i]));
    }
}

/// Token count of `text`.
pub(crate) fn count(text: &str) -> usize {
    let mut v = Vec::new();
    tokenize(text, &mut v);
    v.len()
}

/// One chat message as the template sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChatTurn<'a> {
    /// `system`, `user`, `assistant`, `tool`.
    pub role: &'a str,
    /// Text content (text parts joined).
    pub text: &'a str,
    /// Non-text parts (e.g. images): each becomes placeholder tokens derived from its bytes.
    pub media: &'a [String],
}

/// Tokens of a chat conversation, template applied, ending with the assistant header
/// (generation prompt) when `add_generation_prompt`.
pub(crate) fn chat_tokens(tools: Option<&str>, turns: &[ChatTurn<'_>], add_generation_prompt: bool) -> Vec<u32> {
    let mut out = vec![BEGIN_OF_TEXT];
    let header = |role: &str, out: &mut Vec<u32>| {
        out.push(START_HEADER);
        tokenize(role, out);
        out.push(END_HEADER);
        tokenize("\n\n", out);
    };
    if let Some(tools) = tools {
        header("tools", &mut out);
        tokenize(tools, &mut out);
        out.push(EOT);
    }
    for t in turns {
        header(t.role, &mut out);
        for m in t.media {
            let n = (m.len() / 16).clamp(16, 4096);
            let h = xxh3_64(m.as_bytes());
            out.extend((0..n as u64).map(|k| (h.wrapping_add(k) % u64::from(VOCAB)) as u32));
            out.push(IMAGE);
        }
        tokenize(t.text, &mut out);
        out.push(EOT);
    }
    if add_generation_prompt {
        header("assistant", &mut out);
    }
    out
}

/// Words the simulator "generates"; token `i` of an answer reads as `WORDS[id % len]`.
const WORDS: &[&str] = &[
    " the", " model", " cache", " is", " a", " token", " and", " of", " to", " prefix", " in", " that", " request",
    " it", " for", " on", " with", " as", " block", " queue", ".", ",", " this", " by", " be", " at", " from", " we",
    " can", " an", " or", " not",
];

/// The text of a generated token.
pub(crate) fn token_text(id: u32) -> &'static str {
    WORDS[id as usize % WORDS.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, want: usize) {
        assert_eq!(count(text), want, "tokens of {text:?}");
    }

    #[test]
    fn splitting_rules() {
        check("", 0);
        check("a", 1);
        check("token", 2); // "toke" "n"
        check(" token", 2); // " toke" "n"
        check("hello world", 4); // "hell" "o" " wor" "ld"
        check("a, b.", 4); // "a" "," " b" "."
        check("x\n\ny", 4);
        check("  two", 2); // " " then " two"
        check("héllo", 3); // "h" "é" "llo"
    }

    #[test]
    fn equal_text_equal_ids() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        tokenize("the same text", &mut a);
        tokenize("the same text", &mut b);
        assert_eq!(a, b);
        let mut c = Vec::new();
        tokenize("the same texT", &mut c);
        assert_ne!(a, c);
        assert!(a.iter().all(|&t| t < VOCAB));
    }

    #[test]
    fn english_averages_about_four_bytes_per_token() {
        let text = "Prefix caching lets an inference server skip the prefill of tokens it has already \
                    computed for an earlier request. A router that sends requests sharing a system prompt \
                    or a conversation history to the same replica turns that into lower latency and higher \
                    throughput, as long as it does not overload the replica that holds the hot prefix.";
        let ratio = text.len() as f64 / count(text) as f64;
        assert!((3.3..4.7).contains(&ratio), "{ratio} bytes per token");
    }

    #[test]
    fn later_turns_extend_earlier_turns() {
        let t1 = [
            ChatTurn { role: "system", text: "be brief", media: &[] },
            ChatTurn { role: "user", text: "hi", media: &[] },
        ];
        let t2 = [
            t1[0],
            t1[1],
            ChatTurn { role: "assistant", text: "hello there", media: &[] },
            ChatTurn { role: "user", text: "more", media: &[] },
        ];
        let a = chat_tokens(None, &t1, true);
        let b = chat_tokens(None, &t2, true);
        assert_eq!(&b[..a.len()], &a[..]);
    }
}
