//! Parsing a large chat body must not allocate per message or copy the prompt. A counting
//! global allocator measures what `request::parse` and hashing allocate.
//!
//! The only `unsafe` in the project: a global allocator cannot be written without it. It
//! delegates to the system allocator unchanged.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use kvgate::routing::prefix::{BlockHasher, PrefixConfig};
use kvgate::routing::request::{ApiKind, parse};

struct Counting;

thread_local! {
    static COUNT: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

// SAFETY: every call is forwarded to `System` with the caller's own arguments.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        COUNT.with(|c| {
            let (n, bytes) = c.get();
            c.set((n + 1, bytes + layout.size()));
        });
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn counted<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    COUNT.with(|c| c.set((0, 0)));
    let out = f();
    let (n, bytes) = COUNT.with(|c| c.get());
    (out, n, bytes)
}

fn chat(messages: usize, each: usize) -> Vec<u8> {
    let text = "lorem ipsum dolor sit amet, \\\"quoted\\\" and\\nnew lines ".repeat(each / 50 + 1);
    let msgs: Vec<String> = (0..messages)
        .map(|i| format!(r#"{{"role":"{}","content":"{i} {text}"}}"#, if i % 2 == 0 { "user" } else { "assistant" }))
        .collect();
    format!(r#"{{"model":"m","stream":true,"messages":[{}]}}"#, msgs.join(",")).into_bytes()
}

#[test]
fn big_chat_parses_with_a_handful_of_allocations() {
    for messages in [10usize, 400] {
        let body = chat(messages, 220_000 / messages);
        assert!(body.len() > 200_000);
        let (req, n, bytes) = counted(|| parse(ApiKind::ChatCompletions, &body, 32 << 20).expect("parses"));
        // One growing message list: O(log messages) reallocations, never one per message.
        assert!(n <= 16, "{messages} messages: {n} allocations");
        // What is allocated is the list of borrowed slices, whatever the length of the text.
        let small = chat(messages, 100);
        let (_, _, small_bytes) = counted(|| parse(ApiKind::ChatCompletions, &small, 32 << 20).expect("parses"));
        assert_eq!(bytes, small_bytes, "{messages} messages: allocation grows with the prompt text");
        let cfg = PrefixConfig::default();
        let (hashes, n, _) = counted(|| {
            let mut h = BlockHasher::new(&cfg, &req.model, None);
            req.feed_prompt(&mut |b| h.update(b));
            h.finish()
        });
        assert!(hashes.hashes.len() > 700);
        assert!(n <= 16, "hashing {messages} messages: {n} allocations");
    }
}
