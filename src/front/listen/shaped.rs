//! hyper answers a request head it cannot parse — a bad request line, header or framing, too
//! many or too large headers, an overlong URI — itself, before any handler runs, with an empty
//! 400, 431 or 414. This wrapper of a connection's writes gives those answers the OpenAI-shaped
//! body every other error of kvgate's has; all other bytes pass through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::gateway::error::error_body;

/// hyper's automatic answers: status line, message and code of the body kvgate gives instead.
const CANNED: [(&str, &str, &str); 3] = [
    (
        "HTTP/1.1 400 Bad Request\r\n",
        "the request is not valid HTTP/1.1: its request line, a header or its body framing could not be parsed",
        "invalid_http",
    ),
    (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n",
        "the request's headers are too large or too many (at most 100 headers)",
        "headers_too_large",
    ),
    ("HTTP/1.1 414 URI Too Long\r\n", "the request's URI is too long", "uri_too_long"),
];

/// What follows the status line of an automatic answer, before its `date` header.
const EMPTY: &[u8] = b"connection: close\r\ncontent-length: 0\r\n";

/// The shaped answer for `head`, if it is one of hyper's automatic ones: a status line of
/// [`CANNED`], then exactly `connection`, `content-length: 0` and `date` — a head no handler
/// writes, as every response of kvgate's has other headers.
fn reshape(head: &[u8]) -> Option<Vec<u8>> {
    let (line, message, code, rest) =
        CANNED.iter().find_map(|(line, m, c)| Some((*line, *m, *c, head.strip_prefix(line.as_bytes())?)))?;
    let rest = rest.strip_prefix(EMPTY)?;
    let only_date = rest.starts_with(b"date: ")
        && rest.ends_with(b"\r\n\r\n")
        && rest.windows(2).filter(|w| *w == b"\r\n").count() == 2;
    if !only_date {
        return None;
    }
    let status: u16 = line.get(9..12)?.parse().ok()?;
    let body = error_body(status, message, code, None);
    let mut out = Vec::with_capacity(line.len() + rest.len() + body.len() + 96);
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"content-type: application/json\r\nconnection: close\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(rest);
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

/// A connection whose automatic error answers are OpenAI-shaped.
#[derive(Debug)]
pub(crate) struct ShapedErrors<T> {
    inner: T,
    /// A shaped answer still to be written, and how much of it is.
    pending: Vec<u8>,
    at: usize,
    /// Bytes were read since the last write: an automatic answer follows a request head just
    /// read, so only then is a write taken for one (never mid-response, whatever a body holds).
    read_since_write: bool,
}

impl<T> ShapedErrors<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self { inner, pending: Vec::new(), at: 0, read_since_write: false }
    }
}

impl<T: AsyncWrite + Unpin> ShapedErrors<T> {
    /// Writes what is left of a shaped answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.at < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.at += n;
        }
        self.pending = Vec::new();
        self.at = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` as written, to be sent shaped, if it is an automatic answer.
    fn take_shaped(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<io::Result<usize>> {
        if !std::mem::take(&mut self.read_since_write) {
            return None;
        }
        let shaped = reshape(buf)?;
        self.pending = shaped;
        self.at = 0;
        match self.poll_pending(cx) {
            Poll::Ready(Err(e)) => Some(Err(e)),
            // The rest goes out with the flush that follows.
            _ => Some(Ok(buf.len())),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ShapedErrors<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut me.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            me.read_since_write = true;
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ShapedErrors<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.poll_pending(cx))?;
        if let Some(r) = me.take_shaped(cx, buf) {
            return Poll::Ready(r);
        }
        Pin::new(&mut me.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.poll_pending(cx))?;
        let mut full = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (full.next(), full.next())
            && let Some(r) = me.take_shaped(cx, only)
        {
            return Poll::Ready(r);
        }
        Pin::new(&mut me.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_pending(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_pending(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "date: Wed, 02 Dec 2026 02:15:30 GMT\r\n\r\n";

    #[test]
    fn automatic_answers_get_a_json_body_and_others_pass() {
        for (line, _, code) in CANNED {
            let head = format!("{line}connection: close\r\ncontent-length: 0\r\n{DATE}");
            let out = String::from_utf8(reshape(head.as_bytes()).expect("shaped")).expect("utf-8");
            let (head_out, body) = out.split_once("\r\n\r\n").expect("a head and a body");
            assert!(head_out.starts_with(line.trim_end()), "{out}");
            assert!(head_out.contains(&format!("content-length: {}", body.len())), "{out}");
            assert!(head_out.contains("content-type: application/json") && head_out.contains("connection: close"));
            let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
            assert_eq!(v["error"]["code"], code);
        }
        // A handler's own answers are left alone: other headers, another status, a body.
        let own = [
            format!("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n{DATE}"),
            format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\nx-a: b\r\n{DATE}"),
            format!("HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}"),
            format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}body"),
            "data: HTTP/1.1 400 Bad Request\r\n".to_owned(),
        ];
        for o in own {
            assert!(reshape(o.as_bytes()).is_none(), "{o}");
        }
    }
}
