//! Tests of request parsing: the fields read, the canonical prompt stream, the errors, and
//! property tests of the stream's prefix invariants.

use super::*;

fn stream(api: ApiKind, body: &str) -> Vec<u8> {
    let req = parse(api, body.as_bytes(), DEFAULT_MAX_BODY_BYTES).expect("parses");
    let mut out = Vec::new();
    req.feed_prompt(&mut |b| out.extend_from_slice(b));
    out
}

/// One table row: API, body, and either the expected prompt stream or the expected error.
fn check(api: ApiKind, body: &str, want: Result<&[u8], &str>) {
    match (parse(api, body.as_bytes(), 1 << 20), want) {
        (Ok(req), Ok(bytes)) => {
            let mut out = Vec::new();
            req.feed_prompt(&mut |b| out.extend_from_slice(b));
            assert_eq!(out, bytes, "prompt stream of {body}");
        }
        (Err(e), Err(msg)) => {
            assert!(e.to_string().contains(msg), "error for {body}: got `{e}`, want `{msg}`");
            assert_eq!(e.status(), 400);
        }
        (Ok(_), Err(msg)) => panic!("{body} parsed, want error `{msg}`"),
        (Err(e), Ok(_)) => panic!("{body} failed: {e}"),
    }
}

#[test]
fn completions_prompt_shapes() {
    use ApiKind::Completions as C;
    check(C, r#"{"model":"m","prompt":"hello"}"#, Ok(b"hello"));
    check(C, r#"{"model":"m","prompt":"a\nb"}"#, Ok(br"a\nb"));
    check(C, r#"{"model":"m","prompt":["first","second"]}"#, Ok(b"first"));
    check(C, r#"{"model":"m","prompt":[1,2]}"#, Ok(&[1, 0, 0, 0, 2, 0, 0, 0]));
    check(C, r#"{"model":"m","prompt":[[258],[3]]}"#, Ok(&[2, 1, 0, 0]));
    check(C, r#"{"model":"m","prompt":[]}"#, Err("must not be empty"));
    check(C, r#"{"model":"m","prompt":5}"#, Err("invalid field `prompt`"));
    check(C, r#"{"model":"m","prompt":[1,"x"]}"#, Err("invalid field `prompt`"));
    check(C, r#"{"model":"m","prompt":[-1]}"#, Err("invalid field `prompt`"));
    check(C, r#"{"model":"m"}"#, Err("no `prompt` field"));
}

#[test]
fn chat_messages_and_parts() {
    use ApiKind::ChatCompletions as Chat;
    check(
        Chat,
        r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#,
        Ok(b"\x1esystem\x1fbe brief\x1euser\x1fhi"),
    );
    check(
        Chat,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        Ok(b"\x1euser\x1fab"),
    );
    check(
        Chat,
        r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1"}]}]}"#,
        Ok(b"\x1eassistant\x1f\x1f[{\"id\":\"1\"}]"),
    );
    check(
        Chat,
        r#"{"model":"m","tools":[{"t":1}],"messages":[{"role":"user","content":"x"}]}"#,
        Ok(b"\x1etools\x1f[{\"t\":1}]\x1euser\x1fx"),
    );
    check(Chat, r#"{"model":"m","messages":[{"role":"user","content":7}]}"#, Err("messages[0].content"));
    check(Chat, r#"{"model":"m","messages":[{"role":"user","content":[{"text":"a"}]}]}"#, Err("messages[0].content"));
    check(Chat, r#"{"model":"m","messages":[{"content":"x"}]}"#, Err("missing field `role`"));
    check(Chat, r#"{"model":"m","messages":"hi"}"#, Err("invalid field `messages`"));
    check(Chat, r#"{"model":"m"}"#, Err("no `messages` field"));
}

#[test]
fn image_parts_are_stable_placeholders() {
    let img = |url: &str| {
        stream(
            ApiKind::ChatCompletions,
            &format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{url}"}}}},{{"type":"text","text":"what is it"}}]}}]}}"#
            ),
        )
    };
    assert_eq!(img("a.png"), img("a.png"));
    assert_ne!(img("a.png"), img("b.png"));
    assert!(img("a.png").ends_with(b"what is it"));
}

#[test]
fn responses_and_embeddings() {
    check(ApiKind::Responses, r#"{"model":"m","input":"hello"}"#, Ok(b"\x1ehello"));
    check(
        ApiKind::Responses,
        r#"{"model":"m","instructions":"sys","input":[{"role":"user","content":"q"}]}"#,
        Ok(b"\x1esys\x1e{\"role\":\"user\",\"content\":\"q\"}"),
    );
    check(ApiKind::Responses, r#"{"model":"m","input":3}"#, Err("invalid field `input`"));
    check(ApiKind::Embeddings, r#"{"model":"m","input":["x","y"]}"#, Ok(b"x"));
}

#[test]
fn body_level_errors() {
    use ApiKind::Completions as C;
    check(C, "not json", Err("not valid JSON"));
    check(C, r#"{"model":"m","prompt":"x""#, Err("not valid JSON"));
    check(C, "[1,2]", Err("must be a JSON object"));
    check(C, "\"str\"", Err("must be a JSON object"));
    check(C, "", Err("not valid JSON"));
    check(C, r#"{"prompt":"x"}"#, Err("no `model` field"));
    check(C, r#"{"model":null,"prompt":"x"}"#, Err("no `model` field"));
    check(C, r#"{"model":"","prompt":"x"}"#, Err("must not be empty"));
    check(C, r#"{"model":5,"prompt":"x"}"#, Err("invalid field `model`"));
    check(C, r#"{"model":"m","cache_salt":[],"prompt":"x"}"#, Err("invalid field `cache_salt`"));
    check(C, r#"{"model":"m","prompt":"x","stream":"yes"}"#, Err("invalid field `stream`"));
    check(C, r#"{"model":"m","prompt":"x","max_tokens":-3}"#, Err("invalid field `max_tokens`"));
    let e = parse(C, b"{\"model\":\"\xff\"}", 100).expect_err("bad utf8");
    assert!(matches!(e, RequestError::InvalidUtf8 { offset: 10 }), "{e:?}");
    let e = parse(C, &[b' '; 101], 100).expect_err("too large");
    assert!(matches!(e, RequestError::TooLarge { size: 101, limit: 100 }), "{e:?}");
}

#[test]
fn routing_fields() {
    let body = r#"{"model":"llama","stream":true,"stream_options":{"include_usage":true},
        "max_tokens":5,"max_completion_tokens":7,"cache_salt":"s1","priority":-2,
        "kv_transfer_params":{"do_remote_decode":true},"unknown":[1,{"x":2}],
        "messages":[{"role":"user","content":"hi"}]}"#;
    let r = parse(ApiKind::ChatCompletions, body.as_bytes(), 1 << 20).expect("parses");
    assert_eq!(r.model, "llama");
    assert!(r.stream && r.include_usage);
    assert_eq!(r.max_tokens, Some(7));
    assert_eq!(r.cache_salt.as_deref(), Some("s1"));
    assert_eq!(r.priority, -2);
    assert_eq!(r.kv_transfer_params.map(|p| p.get()), Some(r#"{"do_remote_decode":true}"#));
    assert!(matches!(r.model, Cow::Borrowed(_)), "model must borrow from the body");
    let r = parse(ApiKind::Completions, br#"{"model":"a\u0062","prompt":"x"}"#, 100).expect("parses");
    assert_eq!(r.model, "ab");
}

#[test]
fn model_of_any_body() {
    assert_eq!(model_of(br#"{"input":[1,{"x":2}],"model":"m"}"#).as_deref(), Some("m"));
    assert_eq!(model_of(br#"{"input":"x"}"#), None);
    assert_eq!(model_of(b"not json"), None);
}

#[test]
fn paths() {
    assert_eq!(ApiKind::from_path("/v1/chat/completions?x=1"), Some(ApiKind::ChatCompletions));
    assert_eq!(ApiKind::from_path("/v1/completions/"), Some(ApiKind::Completions));
    assert_eq!(ApiKind::from_path("/v1/models"), None);
    for api in ApiKind::ALL {
        assert_eq!(ApiKind::from_path(api.path()), Some(api));
    }
}

mod properties {
    use super::super::*;
    use crate::routing::prefix::{PrefixConfig, hash_prompt};
    use proptest::prelude::*;

    fn hashes(body: &str) -> Vec<crate::routing::prefix::BlockHash> {
        let req = parse(ApiKind::ChatCompletions, body.as_bytes(), DEFAULT_MAX_BODY_BYTES).expect("parses");
        let mut bytes = Vec::new();
        req.feed_prompt(&mut |b| bytes.extend_from_slice(b));
        let cfg = PrefixConfig { block_bytes: 16, ..PrefixConfig::default() };
        hash_prompt(&cfg, &req.model, None, &bytes).hashes
    }

    fn body(messages: &[(bool, String)], tools: bool) -> String {
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|(parts, text)| {
                if *parts {
                    serde_json::json!({"role": "user", "content": [{"type": "text", "text": text}]})
                } else {
                    serde_json::json!({"role": "assistant", "content": text})
                }
            })
            .collect();
        let mut v = serde_json::json!({"model": "m", "messages": msgs, "stream": true});
        if tools {
            v["tools"] = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        }
        v.to_string()
    }

    proptest! {
        /// A later turn of a conversation (the same messages plus more) extends the earlier
        /// turn's block hashes.
        #[test]
        fn later_turns_extend_earlier_hashes(
            turns in proptest::collection::vec((any::<bool>(), "[ -~\n\"\\\\é]{0,80}"), 1..8),
            cut in 0usize..8,
            tools in any::<bool>(),
        ) {
            let cut = cut.min(turns.len());
            let early = hashes(&body(&turns[..cut], tools));
            let late = hashes(&body(&turns, tools));
            prop_assert!(early.len() <= late.len());
            prop_assert_eq!(&late[..early.len()], &early[..]);
        }
    }

    /// JSON-looking text: the tokens a request body is made of, in any order.
    const JSONISH: &str = r#"(\{|\}|\[|\]|:|,|"model"|"prompt"|"messages"|"role"|"content"|"input"|"stream"|"tools"|"text"|"type"|"m"|null|true|1|-1|1e9|"\\u00e9"|"\\ud800"| ){0,60}"#;

    proptest! {
        /// The parser of untrusted bodies never panics: any bytes are a request or a 4xx.
        #[test]
        fn any_bytes_are_a_request_or_a_client_error(
            body in proptest::collection::vec(any::<u8>(), 0..400),
            api in 0usize..4,
        ) {
            let api = ApiKind::ALL[api];
            if let Err(e) = parse(api, &body, 256) {
                prop_assert!(matches!(e.status(), 400 | 413), "{e:?}");
            }
        }

        /// The same for text shaped like JSON, which gets much further into the parser; a body
        /// that parses also streams its prompt without panicking.
        #[test]
        fn json_like_bodies_are_a_request_or_a_client_error(text in JSONISH, api in 0usize..4) {
            let api = ApiKind::ALL[api];
            match parse(api, text.as_bytes(), 1 << 16) {
                Ok(req) => req.feed_prompt(&mut |_| {}),
                Err(e) => prop_assert!(matches!(e.status(), 400 | 413), "{e:?}"),
            }
        }
    }
}
