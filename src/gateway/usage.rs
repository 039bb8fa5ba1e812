//! Token usage read from a response body as it streams past, for every front-end: a JSON body
//! (kept, bounded, until it ends) or SSE `data:` lines (read in place; a line may span chunks).

use serde_json::Value;
use serde_json::value::RawValue;

use crate::gateway::telemetry::Usage;

/// Reads usage from a response body as it streams (JSON, or SSE with lines split anywhere).
#[derive(Debug, Default)]
pub(crate) struct UsageReader {
    sse: Option<bool>,
    pending: Vec<u8>,
    /// The usage the body reported, once read.
    pub usage: Option<Usage>,
}

/// Bound on a non-streaming body kept for its usage.
const MAX_USAGE_BODY: usize = 4 << 20;

impl UsageReader {
    /// A reader; `sse` when the response is `text/event-stream`.
    pub(crate) fn new(sse: bool) -> Self {
        Self { sse: Some(sse), ..Self::default() }
    }

    /// Prompt, completion and cached tokens from a response object (or a Responses API event,
    /// whose usage is in `response`). Only the `usage` object is decoded: the rest of the body
    /// (choices, embeddings) is skipped without building a tree.
    fn usage_in(body: &[u8]) -> Option<Usage> {
        #[derive(serde::Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            usage: Option<&'a RawValue>,
            #[serde(borrow)]
            response: Option<&'a RawValue>,
        }
        #[derive(serde::Deserialize)]
        struct Inner<'a> {
            #[serde(borrow)]
            usage: Option<&'a RawValue>,
        }
        let env: Envelope<'_> = serde_json::from_slice(body).ok()?;
        let raw = match env.usage {
            Some(u) => u,
            None => serde_json::from_str::<Inner<'_>>(env.response?.get()).ok()?.usage?,
        };
        let u: Value = serde_json::from_str(raw.get()).ok()?;
        if !u.is_object() {
            return None;
        }
        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        let cached = u
            .get("prompt_tokens_details")
            .or_else(|| u.get("input_tokens_details"))
            .and_then(|d| d.get("cached_tokens"))
            .and_then(Value::as_u64);
        Some(Usage {
            prompt: n("prompt_tokens").max(n("input_tokens")),
            completion: n("completion_tokens").max(n("output_tokens")),
            cached: cached.unwrap_or(0),
            cached_reported: cached.is_some(),
        })
    }

    /// Feeds the next chunk; returns the usage it completed, when that is new (a stream's usage
    /// event is counted as soon as it has passed, whether or not the client stays for the rest).
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Option<Usage> {
        let before = self.usage;
        if self.sse == Some(true) {
            self.pending.extend_from_slice(chunk);
            // Complete lines are read in place and dropped at once; a partial one waits.
            let mut start = 0;
            while let Some(nl) = memchr::memchr(b'\n', &self.pending[start..]) {
                let line = &self.pending[start..start + nl];
                start += nl + 1;
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if let Some(data) = line.strip_prefix(b"data:").map(<[u8]>::trim_ascii)
                    && memchr::memmem::find(data, b"\"usage\"").is_some()
                    && let Some(u) = Self::usage_in(data)
                {
                    self.usage = Some(u);
                }
            }
            self.pending.drain(..start);
            if self.pending.len() > MAX_USAGE_BODY {
                self.pending.clear();
            }
        } else if self.pending.len() + chunk.len() <= MAX_USAGE_BODY {
            self.pending.extend_from_slice(chunk);
        }
        self.usage.filter(|_| self.usage != before)
    }

    /// The body is complete (or will get no more bytes); returns the usage it completed, when
    /// that is new.
    pub(crate) fn finish(&mut self) -> Option<Usage> {
        let before = self.usage;
        if self.sse != Some(true)
            && memchr::memmem::find(&self.pending, b"\"usage\"").is_some()
            && let Some(u) = Self::usage_in(&self.pending)
        {
            self.usage = Some(u);
        }
        self.pending.clear();
        self.usage.filter(|_| self.usage != before)
    }
}

/// Feeds `data` to a reader in pieces: byte 0 picks SSE or JSON, byte 1 the piece size.
#[cfg(any(fuzzing, test))]
pub(crate) fn fuzz(data: &[u8]) {
    let (Some(&mode), Some(&size)) = (data.first(), data.get(1)) else { return };
    let mut r = UsageReader::new(mode & 1 == 1);
    for piece in data[2..].chunks(usize::from(size).max(1)) {
        r.feed(piece);
        assert!(r.pending.len() <= MAX_USAGE_BODY + piece.len(), "the reader holds more than its bound");
    }
    r.finish();
    assert!(r.pending.is_empty(), "finish leaves nothing held");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_from_sse_split_anywhere_and_from_json() {
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\ndata: [DONE]\n\n";
        for cut in [1, 7, 40, 90, sse.len() - 3] {
            let mut r = UsageReader::new(true);
            r.feed(&sse[..cut]);
            r.feed(&sse[cut..]);
            r.finish();
            assert_eq!(
                r.usage,
                Some(Usage { prompt: 12, completion: 3, cached: 8, cached_reported: true }),
                "cut at {cut}"
            );
        }
        let mut r = UsageReader::new(false);
        r.feed(br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":"#);
        r.feed(br#"2}}"#);
        assert_eq!(r.usage, None, "not before the end");
        r.finish();
        assert_eq!(r.usage, Some(Usage { prompt: 5, completion: 2, cached: 0, cached_reported: false }));
    }

    #[test]
    fn new_usage_is_returned_once() {
        let u = Usage { prompt: 3, completion: 1, cached: 0, cached_reported: false };
        let mut r = UsageReader::new(true);
        assert_eq!(r.feed(b"data: {\"usage\":{\"prompt_tokens\":3,"), None, "not before the line ends");
        assert_eq!(r.feed(b"\"completion_tokens\":1}}\n\n"), Some(u));
        assert_eq!(r.feed(b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n"), None, "unchanged");
        assert_eq!(r.finish(), None, "already returned");
        let mut r = UsageReader::new(false);
        assert_eq!(r.feed(br#"{"usage":{"prompt_tokens":3,"completion_tokens":1}}"#), None, "JSON waits for its end");
        assert_eq!(r.finish(), Some(u));
    }

    #[test]
    fn usage_of_responses_events_and_bodies_without_it() {
        let check = |body: &str, want: Option<Usage>| {
            let mut r = UsageReader::new(false);
            r.feed(body.as_bytes());
            r.finish();
            assert_eq!(r.usage, want, "{body}");
        };
        let u = |prompt, completion, cached: Option<u64>| {
            Some(Usage { prompt, completion, cached: cached.unwrap_or(0), cached_reported: cached.is_some() })
        };
        check(
            r#"{"type":"response.completed","response":{"id":"r","output":[{"a":[1,2]}],"usage":{"input_tokens":9,"output_tokens":4,"input_tokens_details":{"cached_tokens":6}}}}"#,
            u(9, 4, Some(6)),
        );
        check(r#"{"data":[{"embedding":[0.1,0.2]}],"usage":{"prompt_tokens":3,"total_tokens":3}}"#, u(3, 0, None));
        check(r#"{"response":"text","usage":{"prompt_tokens":2}}"#, u(2, 0, None));
        check(r#"{"choices":[{"text":"the word \"usage\" in text"}]}"#, None);
        check(r#"{"usage":"none"}"#, None);
        check(r#"[{"usage":{"prompt_tokens":1}}]"#, None);
    }

    proptest::proptest! {
        /// Response bodies are untrusted: any bytes, cut anywhere, are read without a panic and
        /// without holding more than the bound.
        #[test]
        fn any_response_bytes_cut_anywhere(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            cuts in proptest::collection::vec(0usize..600, 0..6),
            sse in proptest::prelude::any::<bool>(),
        ) {
            let mut r = UsageReader::new(sse);
            let mut at = 0;
            let mut cuts = cuts;
            cuts.sort_unstable();
            for c in cuts.into_iter().map(|c| c.min(body.len())).chain([body.len()]) {
                if c >= at {
                    r.feed(&body[at..c]);
                    at = c;
                }
                proptest::prop_assert!(r.pending.len() <= MAX_USAGE_BODY + body.len());
            }
            r.finish();
            proptest::prop_assert!(r.pending.is_empty());
        }

        /// SSE lines that look like usage events, split anywhere, give the same usage as whole.
        #[test]
        fn sse_usage_does_not_depend_on_where_chunks_end(prompt in 0u64..100_000, cut in 0usize..200) {
            let body = format!("data: {{\"choices\":[]}}\n\ndata: {{\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":1}}}}\n\ndata: [DONE]\n\n");
            let cut = cut.min(body.len());
            let mut r = UsageReader::new(true);
            r.feed(&body.as_bytes()[..cut]);
            r.feed(&body.as_bytes()[cut..]);
            r.finish();
            proptest::prop_assert_eq!(r.usage, Some(Usage { prompt, completion: 1, cached: 0, cached_reported: false }));
        }
    }
}
