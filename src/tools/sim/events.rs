//! KV-cache events over ZMQ, as vLLM publishes them.
//!
//! Each engine step's events go out as one message of three frames: the topic, the sequence
//! number (8 bytes, big-endian, from 0), and a msgpack `EventBatch` `[ts, events, dp_rank]`.
//! Events are encoded either as tagged arrays (`["BlockStored", hashes, parent, tokens, …]`, vLLM
//! up to ~0.23) or as tagged maps (`{"type": "BlockStored", "block_hashes": …}`, newer vLLM).
//! An endpoint containing `*` (or `::`) binds; any other connects, so the subscriber may be the
//! side that listens. Data-parallel rank r publishes on the endpoint's port + r. With a
//! `replay_endpoint`, a ROUTER socket answers a start sequence number (8 bytes, big-endian) with
//! every buffered batch from there on and then a `-1` terminator.

use std::collections::VecDeque;

use bytes::Bytes;
use rmpv::Value;
use serde::Deserialize;
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::kv::KvEvent;

/// vLLM's `--kv-events-config` JSON.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct KvEventsConfig {
    /// Turn publishing on.
    pub enable_kv_cache_events: bool,
    /// `zmq` or `null`.
    pub publisher: Option<String>,
    /// Where to publish.
    pub endpoint: String,
    /// ROUTER endpoint for replays.
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// PUB high-water mark (accepted; the queue bound below applies).
    pub hwm: usize,
    /// Batches queued before the oldest are dropped.
    pub max_queue_size: usize,
    /// ZMQ topic.
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enable_kv_cache_events: false,
            publisher: None,
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
        }
    }
}

impl KvEventsConfig {
    /// Whether events are published at all.
    pub(crate) fn enabled(&self) -> bool {
        self.enable_kv_cache_events && self.publisher.as_deref() != Some("null")
    }
}

/// Event encoding on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    /// Tagged maps (vLLM ≥ ~0.24).
    Map,
    /// Tagged arrays (older vLLM).
    Array,
}

/// `endpoint` with `rank` added to its TCP port, and whether to bind (vs connect). A bound `*`
/// means `host`, the simulator's own `--host` (every interface for `0.0.0.0`), so simulators on
/// several loopback addresses of one machine can each publish on the same port, as pods do.
pub(crate) fn rank_endpoint(endpoint: &str, rank: u32, host: &str) -> Result<(String, bool), String> {
    let bind = endpoint.contains('*') || endpoint.contains("::");
    let rest =
        endpoint.strip_prefix("tcp://").ok_or_else(|| format!("`{endpoint}`: only tcp:// endpoints are supported"))?;
    let own = host;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("`{endpoint}` has no port"))?;
    let port: u32 = port.parse().map_err(|_| format!("`{endpoint}`: bad port"))?;
    let port = u16::try_from(port + rank).map_err(|_| format!("`{endpoint}`: port + rank {rank} is out of range"))?;
    let host = match host {
        "*" | "[::]" | "::" if own.parse::<std::net::Ipv4Addr>().is_ok() => own,
        "*" | "[::]" | "::" => "0.0.0.0",
        h => h,
    };
    Ok((format!("tcp://{host}:{port}"), bind))
}

fn hashes(v: &[u64]) -> Value {
    Value::Array(v.iter().map(|&h| Value::from(h)).collect())
}

fn opt_u64(v: Option<u64>) -> Value {
    v.map_or(Value::Nil, Value::from)
}

fn opt_str(v: Option<&str>) -> Value {
    v.map_or(Value::Nil, Value::from)
}

/// vLLM's integer id of an adapter (stable per name here; vLLM numbers adapters as it loads them).
fn lora_id(name: Option<&str>) -> Value {
    name.map_or(Value::Nil, |n| Value::from(xxhash_rust::xxh3::xxh3_64(n.as_bytes()) % (1 << 31) + 1))
}

/// `extra_keys`: per block, null or the list of its keys.
fn extra_keys(per_block: &[Vec<String>]) -> Value {
    Value::Array(
        per_block
            .iter()
            .map(|keys| {
                if keys.is_empty() {
                    Value::Nil
                } else {
                    Value::Array(keys.iter().map(|k| Value::from(k.as_str())).collect())
                }
            })
            .collect(),
    )
}

/// One event in the chosen encoding.
pub(crate) fn encode_event(e: &KvEvent, enc: Encoding) -> Value {
    let map = |pairs: Vec<(&str, Value)>| Value::Map(pairs.into_iter().map(|(k, v)| (Value::from(k), v)).collect());
    match (e, enc) {
        (
            KvEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_name,
                extra_keys: extra,
            },
            _,
        ) => {
            let fields = [
                ("block_hashes", hashes(block_hashes)),
                ("parent_block_hash", opt_u64(*parent_block_hash)),
                ("token_ids", Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect())),
                ("block_size", Value::from(*block_size as u64)),
                ("lora_id", lora_id(lora_name.as_deref())),
                ("medium", Value::from("GPU")),
                ("lora_name", opt_str(lora_name.as_deref())),
                ("extra_keys", extra_keys(extra)),
                ("group_idx", Value::from(0)),
            ];
            match enc {
                // Positional, in vLLM's field order after the tag.
                Encoding::Array => Value::Array(
                    std::iter::once(Value::from("BlockStored")).chain(fields.into_iter().map(|(_, v)| v)).collect(),
                ),
                Encoding::Map => map(std::iter::once(("type", Value::from("BlockStored")))
                    .chain(fields)
                    .chain([("kv_cache_spec_kind", Value::from("full_attention"))])
                    .collect()),
            }
        }
        (KvEvent::BlockRemoved { block_hashes }, Encoding::Array) => {
            Value::Array(vec![Value::from("BlockRemoved"), hashes(block_hashes), Value::from("GPU")])
        }
        (KvEvent::BlockRemoved { block_hashes }, Encoding::Map) => map(vec![
            ("type", Value::from("BlockRemoved")),
            ("block_hashes", hashes(block_hashes)),
            ("medium", Value::from("GPU")),
            ("group_idx", Value::from(0)),
        ]),
        (KvEvent::AllBlocksCleared, Encoding::Array) => Value::Array(vec![Value::from("AllBlocksCleared")]),
        (KvEvent::AllBlocksCleared, Encoding::Map) => map(vec![("type", Value::from("AllBlocksCleared"))]),
    }
}

/// A msgpack `EventBatch` payload.
pub(crate) fn encode_batch(events: &[KvEvent], rank: u32, enc: Encoding) -> Vec<u8> {
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let batch = Value::Array(vec![
        Value::F64(ts),
        Value::Array(events.iter().map(|e| encode_event(e, enc)).collect()),
        Value::from(rank),
    ]);
    let mut buf = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut buf, &batch);
    buf
}

/// Publishes one engine's batches until the engine goes away. The faults in `shared` can drop
/// batches on the way or hold them back.
pub(crate) async fn publish(
    cfg: KvEventsConfig,
    rank: u32,
    enc: Encoding,
    mut batches: mpsc::UnboundedReceiver<Vec<KvEvent>>,
    shared: std::sync::Arc<super::server::Shared>,
    host: String,
) -> anyhow::Result<()> {
    let (endpoint, bind) = rank_endpoint(&cfg.endpoint, rank, &host).map_err(anyhow::Error::msg)?;
    let mut publisher = PubSocket::new();
    if bind {
        publisher.bind(&endpoint).await?;
    } else {
        publisher.connect(&endpoint).await?;
    }
    let mut replay = match &cfg.replay_endpoint {
        Some(r) => {
            let (r, _) = rank_endpoint(r, rank, &host).map_err(anyhow::Error::msg)?;
            let mut s = RouterSocket::new();
            s.bind(&r).await?;
            Some(s)
        }
        None => None,
    };
    let topic = Bytes::from(cfg.topic.clone().into_bytes());
    let mut seq: u64 = 0;
    let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::new();
    // Batches held back while the stream is stalled.
    let mut held: VecDeque<ZmqMessage> = VecDeque::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = tick.tick(), if !held.is_empty() => {
                if !shared.faults.read().kv_events_stalled {
                    while let Some(msg) = held.pop_front() {
                        let _ = publisher.send(msg).await;
                    }
                }
            }
            batch = batches.recv() => {
                let Some(batch) = batch else { return Ok(()) };
                let payload = Bytes::from(encode_batch(&batch, rank, enc));
                let msg = ZmqMessage::try_from(vec![topic.clone(), Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone()])
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let (drop_it, stalled) = {
                    let mut f = shared.faults.write();
                    let drop_it = f.kv_events_drop_next > 0;
                    f.kv_events_drop_next = f.kv_events_drop_next.saturating_sub(1);
                    (drop_it, f.kv_events_stalled)
                };
                if stalled || !held.is_empty() {
                    if !drop_it {
                        held.push_back(msg);
                    }
                    // vLLM's queue bound: the oldest go first.
                    while held.len() > cfg.max_queue_size.max(1) {
                        held.pop_front();
                    }
                } else if !drop_it {
                    // A PUB socket drops messages nobody subscribes to; that is not an error.
                    let _ = publisher.send(msg).await;
                }
                buffer.push_back((seq, payload));
                while buffer.len() > cfg.buffer_steps.max(1) {
                    buffer.pop_front();
                }
                seq += 1;
            }
            request = async { match replay.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                let Ok(request) = request else { continue };
                let frames = request.into_vec();
                let Some(identity) = frames.first().cloned() else { continue };
                let start = frames.last().and_then(|f| <[u8; 8]>::try_from(f.as_ref()).ok()).map_or(0, u64::from_be_bytes);
                if let Some(router) = replay.as_mut() {
                    for (s, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
                        let reply = vec![identity.clone(), Bytes::new(), Bytes::copy_from_slice(&s.to_be_bytes()), payload.clone()];
                        if let Ok(m) = ZmqMessage::try_from(reply) {
                            let _ = router.send(m).await;
                        }
                    }
                    let end = vec![identity, Bytes::new(), Bytes::copy_from_slice(&(-1i64).to_be_bytes()), Bytes::new()];
                    if let Ok(m) = ZmqMessage::try_from(end) {
                        let _ = router.send(m).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_per_rank() {
        assert_eq!(rank_endpoint("tcp://*:5557", 2, "0.0.0.0"), Ok(("tcp://0.0.0.0:5559".into(), true)));
        assert_eq!(rank_endpoint("tcp://*:5557", 0, "127.0.0.2"), Ok(("tcp://127.0.0.2:5557".into(), true)));
        assert_eq!(rank_endpoint("tcp://*:5557", 0, "::"), Ok(("tcp://0.0.0.0:5557".into(), true)));
        assert_eq!(rank_endpoint("tcp://10.0.0.1:5557", 0, "0.0.0.0"), Ok(("tcp://10.0.0.1:5557".into(), false)));
        assert!(rank_endpoint("ipc:///tmp/x", 0, "0.0.0.0").is_err());
        assert!(rank_endpoint("tcp://*:65535", 1, "0.0.0.0").is_err());
    }

    #[test]
    fn both_encodings_round_trip() {
        let e = KvEvent::BlockStored {
            block_hashes: vec![u64::MAX, 7],
            parent_block_hash: Some(3),
            token_ids: vec![1, 2],
            block_size: 1,
            lora_name: None,
            extra_keys: vec![vec![], vec!["salt".into()]],
        };
        let payload = encode_batch(std::slice::from_ref(&e), 2, Encoding::Array);
        let v = rmpv::decode::read_value(&mut payload.as_slice()).expect("msgpack");
        let ev = &v[1][0];
        assert_eq!(ev[0].as_str(), Some("BlockStored"));
        assert_eq!(ev[1][0].as_u64(), Some(u64::MAX));
        assert_eq!(v[2].as_u64(), Some(2));
        let payload = encode_batch(&[e], 0, Encoding::Map);
        let v = rmpv::decode::read_value(&mut payload.as_slice()).expect("msgpack");
        let ev = v[1][0].as_map().expect("map event");
        let get = |k: &str| ev.iter().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v.clone());
        assert_eq!(get("type").and_then(|t| t.as_str().map(str::to_owned)).as_deref(), Some("BlockStored"));
        assert_eq!(get("parent_block_hash").and_then(|p| p.as_u64()), Some(3));
    }
}
