//! Token usage read from a response body as it streams past, for both front-ends: a JSON body
//! (kept, bounded, until it ends) or SSE `data:` lines (read in place; a line may span chunks).

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

    /// Prompt, completion and cached tokens from a response object (or a Responses API event).
    fn usage_of(v: &serde_json::Value) -> Option<Usage> {
        let u = v.get("usage").or_else(|| v.get("response").and_then(|r| r.get("usage")))?;
        if !u.is_object() {
            return None;
        }
        let n = |k: &str| u.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let cached = u
            .get("prompt_tokens_details")
            .or_else(|| u.get("input_tokens_details"))
            .and_then(|d| d.get("cached_tokens"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        Some(Usage {
            prompt: n("prompt_tokens").max(n("input_tokens")),
            completion: n("completion_tokens").max(n("output_tokens")),
            cached,
        })
    }

    /// Feeds the next chunk.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
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
                    && let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
                    && let Some(u) = Self::usage_of(&v)
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
    }

    /// The body is complete.
    pub(crate) fn finish(&mut self) {
        if self.sse != Some(true)
            && memchr::memmem::find(&self.pending, b"\"usage\"").is_some()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.pending)
            && let Some(u) = Self::usage_of(&v)
        {
            self.usage = Some(u);
        }
        self.pending.clear();
    }
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
            assert_eq!(r.usage, Some(Usage { prompt: 12, completion: 3, cached: 8 }), "cut at {cut}");
        }
        let mut r = UsageReader::new(false);
        r.feed(br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":"#);
        r.feed(br#"2}}"#);
        assert_eq!(r.usage, None, "not before the end");
        r.finish();
        assert_eq!(r.usage, Some(Usage { prompt: 5, completion: 2, cached: 0 }));
    }
}
