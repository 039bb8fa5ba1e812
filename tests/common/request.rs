//! The one builder of OpenAI chat completions bodies the tests send: messages in the order they
//! are added, then the sampling and streaming fields a test names.

use serde_json::{Value, json};

/// A chat completions request body for `model`, without messages yet.
pub fn chat(model: &str) -> Chat {
    Chat(json!({"model": model, "messages": []}))
}

/// A chat completions body being built; [`Chat::json`] or [`Chat::bytes`] ends it.
#[derive(Debug, Clone)]
pub struct Chat(Value);

impl Chat {
    /// Adds a system message.
    pub fn system(self, content: impl Into<String>) -> Self {
        self.message("system", content)
    }

    /// Adds a user message.
    pub fn user(self, content: impl Into<String>) -> Self {
        self.message("user", content)
    }

    /// Adds an assistant message (an earlier turn of the conversation).
    pub fn assistant(self, content: impl Into<String>) -> Self {
        self.message("assistant", content)
    }

    /// Adds a message with this role.
    pub fn message(mut self, role: &str, content: impl Into<String>) -> Self {
        let m = json!({"role": role, "content": content.into()});
        self.0["messages"].as_array_mut().expect("messages is a list").push(m);
        self
    }

    /// `max_tokens`.
    pub fn max_tokens(self, n: u64) -> Self {
        self.field("max_tokens", json!(n))
    }

    /// `stream: true`.
    pub fn stream(self) -> Self {
        self.field("stream", json!(true))
    }

    /// `stream: true` with the usage in a last chunk (`stream_options.include_usage`).
    pub fn stream_with_usage(self) -> Self {
        self.stream().field("stream_options", json!({"include_usage": true}))
    }

    /// Any other field (`priority`, `temperature`, …), replacing one of that name.
    pub fn field(mut self, key: &str, value: Value) -> Self {
        self.0[key] = value;
        self
    }

    /// The body as JSON.
    pub fn json(self) -> Value {
        self.0
    }

    /// The body as the bytes a client sends.
    pub fn bytes(self) -> Vec<u8> {
        self.0.to_string().into_bytes()
    }
}

impl From<Chat> for Value {
    fn from(c: Chat) -> Self {
        c.0
    }
}
