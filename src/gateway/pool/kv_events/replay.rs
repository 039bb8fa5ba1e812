//! The client of an engine's replay socket (vLLM's ROUTER `replay_endpoint`): a start sequence
//! number sent, every buffered batch from there on received, then a `-1` terminator.

use std::time::Duration;

use bytes::Bytes;
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

/// Bound on connecting to the replay socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one replay, from request to terminator.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);
/// Batches one replay may return at most.
const MAX_REPLAY: u64 = 100_000;

/// Asks an engine's replay socket for batches `from..until` (their payloads), in order. `None`
/// when it cannot give all of them (unreachable, or its buffer no longer reaches back to `from`).
pub(super) async fn replay(endpoint: &str, from: u64, until: u64) -> Option<Vec<(u64, Bytes)>> {
    let work = async {
        let mut opts = SocketOptions::default();
        opts.connect_timeout(CONNECT_TIMEOUT);
        let mut s = DealerSocket::with_options(opts);
        s.connect(endpoint).await.ok()?;
        let request = ZmqMessage::try_from(vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())]).ok()?;
        s.send(request).await.ok()?;
        let mut out = Vec::new();
        let mut expect = from;
        for _ in 0..MAX_REPLAY {
            let m = s.recv().await.ok()?;
            let frames = m.into_vec();
            // `[empty, (topic,) seq, payload]`: newer vLLM puts the topic before the sequence
            // number, so both are read from the end.
            let [.., seq_frame, payload] = frames.as_slice() else { return None };
            let frames = [payload];
            let seq = <[u8; 8]>::try_from(seq_frame.as_ref()).ok().map(i64::from_be_bytes)?;
            if seq < 0 {
                break;
            }
            let seq = seq as u64;
            if seq < expect {
                continue;
            }
            if seq >= until {
                continue;
            }
            if seq != expect {
                return None;
            }
            out.push((seq, frames[0].clone()));
            expect += 1;
        }
        (expect == until).then_some(out)
    };
    tokio::time::timeout(REPLAY_TIMEOUT, work).await.ok().flatten()
}
