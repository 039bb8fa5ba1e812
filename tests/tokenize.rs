//! In-process tokenization gives exactly the token ids a real vLLM 0.32 server published in its
//! KV events for the same prompts (`tests/data/vllm-0.32-kv-events.jsonl`, recorded with the
//! model whose tokenizer folder is `tests/data/tiny-llama-tokenizer`): every `BlockStored`
//! block's `token_ids` is a block-aligned slice of kvgate's tokens for a request of its batch
//! (the first block of a chain at offset 0), and `usage.prompt_tokens` is kvgate's count.

use std::path::Path;

use kvgate::routing::tokenize::{ChatPrompt, PromptTokenizer};
use serde_json::{Value, json};

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn tiny_llama() -> PromptTokenizer {
    let dir = data("tiny-llama-tokenizer");
    let read = |f: &str| std::fs::read(dir.join(f)).expect("tokenizer file");
    let template = String::from_utf8(read("chat_template.jinja")).expect("UTF-8");
    PromptTokenizer::from_parts(&read("tokenizer.json"), Some(&read("tokenizer_config.json")), Some(&template))
        .expect("the tokenizer loads")
}

/// The request bodies that caused a recorded batch (one, or several sent together).
fn requests_of(cause: &Value) -> Option<Vec<&Value>> {
    match (&cause["request"], &cause["requests"]) {
        (Value::Object(_), _) => Some(vec![&cause["request"]]),
        (_, Value::Array(list)) => Some(list.iter().collect()),
        _ => None,
    }
}

/// kvgate's token ids for a recorded request body.
fn tokens(t: &PromptTokenizer, req: &Value) -> Vec<u32> {
    if req.get("messages").is_some() {
        return t.encode_chat(&ChatPrompt::of_request(req)).expect("chat");
    }
    match &req["prompt"] {
        Value::String(p) => t.encode_completion(p).expect("completion"),
        Value::Array(ids) => ids.iter().map(|i| i.as_u64().expect("token id") as u32).collect(),
        other => panic!("unexpected prompt {other}"),
    }
}

#[test]
fn token_ids_match_what_a_real_vllm_published() {
    let t = tiny_llama();
    let text = std::fs::read_to_string(data("vllm-0.32-kv-events.jsonl")).expect("recording");
    let (mut blocks, mut counted, mut kinds) = (0, 0, std::collections::BTreeSet::new());
    for line in text.lines() {
        let row: Value = serde_json::from_str(line).expect("a JSON line");
        let cause = &row["caused_by"];
        let Some(requests) = requests_of(cause) else { continue };
        // Blocks filled by generated tokens are not the prompt's.
        if cause["kind"] == "decode-fill" {
            continue;
        }
        let ours: Vec<Vec<u32>> = requests.iter().map(|r| tokens(&t, r)).collect();
        if let (Some(usage), [one]) = (cause["usage"]["prompt_tokens"].as_u64(), ours.as_slice()) {
            assert_eq!(one.len() as u64, usage, "row {}: prompt_tokens", row["n"]);
            counted += 1;
        }
        kinds.insert(cause["kind"].as_str().unwrap_or("").to_owned());
        for event in row["decoded"][1].as_array().expect("events") {
            if event["type"] != "BlockStored" {
                continue;
            }
            let ids: Vec<u32> = event["token_ids"]
                .as_array()
                .expect("token_ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect();
            let size = event["block_size"].as_u64().expect("block_size") as usize;
            let first = event["parent_block_hash"].is_null();
            let found = ours
                .iter()
                .any(|toks| (0..toks.len()).step_by(size).any(|k| (!first || k == 0) && toks[k..].starts_with(&ids)));
            assert!(
                found,
                "row {} ({}): a stored run of {} tokens is not in kvgate's tokens",
                row["n"],
                cause["kind"],
                ids.len()
            );
            blocks += ids.len() / size;
        }
    }
    assert!(blocks >= 100 && counted >= 8, "blocks {blocks}, counted {counted}");
    for kind in ["completion", "chat", "chat-2turn", "token-ids", "concurrent-3"] {
        assert!(kinds.contains(kind), "{kind} covered: {kinds:?}");
    }
}

/// A chat prompt without template variables of its own.
fn chat<'a>(messages: &'a Value, tools: Option<&'a Value>, add_generation_prompt: bool) -> ChatPrompt<'a> {
    ChatPrompt { messages, tools, add_generation_prompt, kwargs: None }
}

#[test]
fn chat_templates_render_as_hugging_face_does() {
    let t = tiny_llama();
    let messages = json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]);
    assert_eq!(
        t.render_chat(&chat(&messages, None, true)).expect("render"),
        "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    );
    assert_eq!(
        t.render_chat(&chat(&messages, None, false)).expect("render"),
        "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n"
    );
    // A template with the constructs real models use: loop controls, Python methods, tojson,
    // raise_exception, special tokens, trim_blocks/lstrip_blocks.
    let template = r#"{{ bos_token }}
{% for m in messages %}
  {% if m.role not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
  {% if loop.index0 == 0 and tools %}[TOOLS]{{ tools | tojson }}[/TOOLS]{% endif %}
  [{{ m.role | upper }}]{{ m.content.strip() }}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"#;
    let config = br#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#;
    let tok = std::fs::read(data("tiny-llama-tokenizer/tokenizer.json")).expect("tokenizer");
    let t2 = PromptTokenizer::from_parts(&tok, Some(config), Some(template)).expect("loads");
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"a": 1}}}]);
    let hello = json!([{"role": "user", "content": "  hello  "}]);
    let out = t2.render_chat(&chat(&hello, Some(&tools), true)).expect("render");
    assert_eq!(
        out,
        "<s>\n[TOOLS][{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"a\": 1}}}][/TOOLS]  [USER]hello\n[ASSISTANT]"
    );
    let robot = json!([{"role": "robot", "content": "x"}]);
    let bad = t2.render_chat(&chat(&robot, None, true));
    assert!(bad.expect_err("raise_exception").to_string().contains("bad role robot"));
    // Encoding the rendered text adds no special tokens of its own.
    let ids = t.encode_chat(&chat(&messages, None, true)).expect("ids");
    assert_eq!(ids[0], 4, "starts with <|system|>, no BOS added");
}

#[test]
fn broken_tokenizer_files_are_errors() {
    assert!(PromptTokenizer::from_parts(b"{not json", None, None).is_err());
    let tok = std::fs::read(data("tiny-llama-tokenizer/tokenizer.json")).expect("tokenizer");
    assert!(PromptTokenizer::from_parts(&tok, Some(b"[1,"), None).is_err());
    assert!(PromptTokenizer::from_parts(&tok, None, Some("{% for %}")).is_err());
    let plain = PromptTokenizer::from_parts(&tok, None, None).expect("no template is fine");
    assert!(!plain.has_chat_template());
    assert!(plain.render_chat(&chat(&json!([]), None, true)).is_err());
}

/// The recorded frames decode, and kvgate's request keys — computed from its own tokenization of
/// each recorded request — find exactly the blocks the real server said it stored: the precise
/// index works with this server's hash algorithm and seed without knowing either.
#[test]
fn recorded_batches_decode_and_request_keys_find_their_blocks() {
    use kvgate::routing::endpoint::EndpointId;
    use kvgate::routing::kv_events::{KvEvent, decode_batch};
    use kvgate::routing::prefix::precise::{PreciseIndex, request_keys};

    let t = tiny_llama();
    let text = std::fs::read_to_string(data("vllm-0.32-kv-events.jsonl")).expect("recording");
    let index = PreciseIndex::default();
    let ep = EndpointId::new(0);
    let (mut rows, mut checked, mut last_seq) = (0, 0, 0);
    for line in text.lines() {
        let row: Value = serde_json::from_str(line).expect("a JSON line");
        let hex = |h: &str| -> Vec<u8> {
            (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex")).collect()
        };
        let frames: Vec<Vec<u8>> =
            row["frames_hex"].as_array().expect("frames").iter().map(|f| hex(f.as_str().expect("hex"))).collect();
        assert_eq!(frames.len(), 3, "topic, seq, payload");
        let seq = u64::from_be_bytes(frames[1].as_slice().try_into().expect("8-byte seq"));
        assert_eq!(seq, row["seq"].as_u64().expect("seq"));
        assert!(seq > last_seq, "sequence numbers rise");
        last_seq = seq;
        let batch = decode_batch(&frames[2]).expect("every recorded batch decodes");
        let decoded = row["decoded"][1].as_array().expect("events");
        assert_eq!(batch.events.len(), decoded.len(), "row {}", row["n"]);
        assert_eq!(batch.dp_rank, Some(0));
        for (e, d) in batch.events.iter().zip(decoded) {
            let (kind, hashes) = match e {
                KvEvent::BlockStored(s) => ("BlockStored", s.block_hashes.clone()),
                KvEvent::BlockRemoved { block_hashes, .. } => ("BlockRemoved", block_hashes.clone()),
                KvEvent::AllBlocksCleared => ("AllBlocksCleared", vec![]),
            };
            assert_eq!(d["type"], kind);
            let want: Vec<u64> = d["block_hashes"]
                .as_array()
                .map(|a| a.iter().map(|h| h.as_u64().expect("u64")).collect())
                .unwrap_or_default();
            assert_eq!(hashes, want, "row {}: hashes", row["n"]);
        }
        index.apply(ep, &batch, 0);
        rows += 1;
        let cause = &row["caused_by"];
        let (Value::Object(_), true) = (&cause["request"], cause["kind"] != "decode-fill") else { continue };
        let req = &cause["request"];
        let Some(bs) = batch.events.iter().find_map(|e| match e {
            KvEvent::BlockStored(s) => Some(s.block_size),
            _ => None,
        }) else {
            continue;
        };
        let ours = tokens(&t, req);
        let salt = req["cache_salt"].as_str();
        let keys = request_keys(&ours, bs, None, salt, usize::MAX);
        let mut out = Vec::new();
        index.match_into(&[Some(ep)], &keys, &mut out);
        assert_eq!(out[0] as usize, keys.len(), "row {} ({}): the whole prompt is held", row["n"], cause["kind"]);
        if salt.is_some() {
            index.match_into(&[Some(ep)], &request_keys(&ours, bs, None, None, usize::MAX), &mut out);
            assert_eq!(out[0], 0, "row {}: a salted prompt's blocks are not the unsalted prompt's", row["n"]);
        }
        checked += 1;
    }
    assert_eq!(rows, 21);
    assert!(checked >= 8, "{checked} requests checked");
}

/// The segment cache changes nothing: every recorded prompt, and chats with long repeated
/// parts, give the ids the tokenizer gives for the whole text, on first sight and from cache.
#[test]
fn cached_segments_encode_as_the_whole_text() {
    let t = tiny_llama();
    assert!(format!("{t:?}").contains("segment_cache: true"), "{t:?}");
    let text = std::fs::read_to_string(data("vllm-0.32-kv-events.jsonl")).expect("recording");
    let mut checked = 0;
    for line in text.lines() {
        let row: Value = serde_json::from_str(line).expect("a JSON line");
        let cause = &row["caused_by"];
        let Some(requests) = requests_of(cause) else { continue };
        for req in requests {
            for _ in 0..2 {
                if let Some(p) = req["prompt"].as_str() {
                    assert_eq!(t.encode_completion(p).expect("cached"), t.encode_whole(p, true).expect("whole"));
                    checked += 1;
                }
                if req.get("messages").is_some() {
                    let chat = ChatPrompt::of_request(req);
                    let rendered = t.render_chat(&chat).expect("render");
                    assert_eq!(t.encode_chat(&chat).expect("cached"), t.encode_whole(&rendered, false).expect("whole"));
                    checked += 1;
                }
            }
        }
    }
    let system = "You are a router. ".repeat(200);
    for turn in 0..4 {
        let mut messages = vec![json!({"role": "system", "content": system})];
        for k in 0..turn {
            messages.push(json!({"role": "user", "content": format!("question {k} ").repeat(40)}));
            messages.push(json!({"role": "assistant", "content": "<|end|> is a marker; so is <|user|>"}));
        }
        let body = json!({"messages": messages});
        let chat = ChatPrompt::of_request(&body);
        let rendered = t.render_chat(&chat).expect("render");
        assert_eq!(
            t.encode_chat(&chat).expect("cached"),
            t.encode_whole(&rendered, false).expect("whole"),
            "turn {turn}"
        );
        checked += 1;
    }
    assert!(checked >= 20, "{checked}");
}
