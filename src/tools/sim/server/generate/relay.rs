//! A generation's tokens on their way to the client: the events of every choice's engine
//! request merged as they come ([`Merged`]), each applied to its choice, and the answer sent as
//! an SSE stream or collected into one JSON body — cut part-way when an abort is injected.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

use super::Api;
use super::reply::{Choice, Reply, end_of};
use crate::tools::sim::engine::Event;
use crate::tools::sim::server::ApiError;

/// The events of every choice's engine request, as they come.
pub(super) struct Merged {
    receivers: Vec<Option<mpsc::UnboundedReceiver<Event>>>,
}

impl Merged {
    /// The events of these engine requests, one per choice.
    pub(super) fn new(receivers: Vec<mpsc::UnboundedReceiver<Event>>) -> Self {
        Self { receivers: receivers.into_iter().map(Some).collect() }
    }

    /// The next event of some choice (`None` in it: that request was dropped by its engine);
    /// `None` once every choice has ended.
    async fn recv(&mut self) -> Option<(usize, Option<Event>)> {
        std::future::poll_fn(|cx| {
            let mut open = false;
            for (k, slot) in self.receivers.iter_mut().enumerate() {
                let Some(rx) = slot else { continue };
                open = true;
                match rx.poll_recv(cx) {
                    std::task::Poll::Ready(Some(e)) => {
                        if e.done.is_some() {
                            *slot = None;
                        }
                        return std::task::Poll::Ready(Some((k, Some(e))));
                    }
                    std::task::Poll::Ready(None) => {
                        *slot = None;
                        return std::task::Poll::Ready(Some((k, None)));
                    }
                    std::task::Poll::Pending => {}
                }
            }
            if open { std::task::Poll::Pending } else { std::task::Poll::Ready(None) }
        })
        .await
    }
}

/// Applies an engine event to its choice: the text it may show now, and whether it ended.
fn apply(reply: &mut Reply, c: &mut Choice, event: Event) -> (String, Vec<Value>, bool) {
    let mut shown = String::new();
    let mut entries = Vec::new();
    if let Some(t) = event.token {
        let piece = (reply.text_of)(t);
        if c.cutter.matched.is_none() {
            if let Some(e) = reply.logprob_entry(t, &piece, c.offset + shown.len()) {
                entries.push(e);
            }
            shown.push_str(&c.cutter.push(&piece));
        }
    }
    let ended = event.done.is_some();
    if let Some(d) = event.done {
        shown.push_str(&c.cutter.finish());
        c.done = Some(d);
    }
    c.offset += shown.len();
    (shown, entries, ended)
}

/// The SSE response: one event per token (each naming its choice), the usage chunk if asked
/// for, then `[DONE]` — or, for the Responses API, its own event sequence; the stream ends
/// `linger` after its last event.
pub(super) fn stream_response(
    reply: Reply,
    choices: Vec<Choice>,
    merged: Merged,
    abort_after: Option<usize>,
    linger: Duration,
) -> Response {
    struct S {
        reply: Reply,
        choices: Vec<Choice>,
        merged: Merged,
        sent: usize,
        finished: bool,
        abort_after: Option<usize>,
        /// Events to send before reading more, in order.
        queue: std::collections::VecDeque<Bytes>,
        opened: bool,
        /// How long the stream stays open after its last event (taken once spent).
        linger: Duration,
    }
    let s = S {
        reply,
        choices,
        merged,
        sent: 0,
        finished: false,
        abort_after,
        queue: std::collections::VecDeque::new(),
        opened: false,
        linger,
    };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(b) = s.queue.pop_front() {
                return Some((Ok::<Bytes, std::io::Error>(b), s));
            }
            if s.finished {
                let linger = std::mem::take(&mut s.linger);
                if linger.is_zero() {
                    return None;
                }
                tokio::time::sleep(linger).await;
                continue;
            }
            if s.abort_after.is_some_and(|n| s.sent >= n.max(1)) {
                s.finished = true;
                // A pause first, so what was sent is flushed to the client before the connection
                // breaks: the client sees a response cut part-way, not a connection closed unanswered.
                tokio::time::sleep(Duration::from_millis(2)).await;
                return Some((Err(std::io::Error::other("injected abort")), s));
            }
            let Some((k, event)) = s.merged.recv().await else {
                // Every choice has ended.
                s.finished = true;
                match s.reply.api {
                    Api::Responses => {
                        let closing = s.reply.response_closing(&s.choices);
                        s.queue.extend(closing);
                    }
                    _ => {
                        if s.reply.include_usage {
                            s.queue.push_back(s.reply.usage_chunk(&s.choices));
                        }
                        s.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    }
                }
                continue;
            };
            let Some(event) = event else {
                s.finished = true;
                return Some((Err(std::io::Error::other("engine dropped the request")), s));
            };
            if !s.opened {
                s.opened = true;
                match s.reply.api {
                    Api::Chat => {
                        for i in 0..s.choices.len() {
                            s.queue.push_back(s.reply.role_chunk(i));
                        }
                    }
                    Api::Responses => {
                        let opening = s.reply.response_opening(&s.choices);
                        s.queue.extend(opening);
                    }
                    Api::Completions => {}
                }
            }
            s.sent += 1;
            let (shown, entries, ended) = apply(&mut s.reply, &mut s.choices[k], event);
            if s.reply.api == Api::Responses {
                s.choices[k].text.push_str(&shown);
                if !shown.is_empty() {
                    let delta = s.reply.response_delta(&shown);
                    s.queue.push_back(delta);
                }
                continue;
            }
            let end = ended.then(|| end_of(&s.choices[k]));
            s.queue.push_back(s.reply.chunk(k, &shown, &entries, end));
        }
    });
    let content_type = "text/event-stream; charset=utf-8";
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The whole answer as one JSON body, once every choice has ended.
pub(super) async fn collect_response(
    mut reply: Reply,
    mut choices: Vec<Choice>,
    mut merged: Merged,
    abort_after: Option<usize>,
) -> Result<Response, ApiError> {
    while let Some((k, event)) = merged.recv().await {
        let Some(event) = event else {
            return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "the engine dropped the request"));
        };
        let (shown, entries, _) = apply(&mut reply, &mut choices[k], event);
        choices[k].text.push_str(&shown);
        choices[k].logprobs.extend(entries);
    }
    let body = reply.full(&choices).to_string();
    if abort_after.is_some() {
        // Send the head and half the body (flushed, with a pause before the break), then break
        // the connection.
        let body = Bytes::from(body.into_bytes());
        let half = body.slice(..body.len() / 2);
        let broken = async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Err(std::io::Error::other("injected abort"))
        };
        let parts =
            futures_util::stream::iter([Ok::<_, std::io::Error>(half)]).chain(futures_util::stream::once(broken));
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(parts))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()));
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}
