//! vLLM's KV-cache event batches, decoded from their msgpack payload.
//!
//! A batch is a positional array `[ts, events, data_parallel_rank]` (trailing defaults may be
//! missing). Its events come in either of vLLM's two encodings, and a consumer meets both:
//! tagged arrays (`["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
//! lora_id, medium, lora_name, extra_keys, group_idx, …]`, vLLM up to ~0.23, older versions ending
//! earlier) and tagged maps (`{"type": "BlockStored", "block_hashes": …}`, newer vLLM). Block
//! hashes may be uint64, int64 (very old vLLM) or raw digest bytes
//! (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`); all become the u64 vLLM itself would publish (the
//! digest's last 8 bytes, big-endian). Event types this decoder does not know are skipped and
//! counted, so a newer engine's additions do not stop the stream.
//!
//! Part of the decision core: bytes in, values out; no I/O.

use rmpv::Value;

/// A decoded `EventBatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// The engine's wall-clock time of the batch, in seconds since the epoch.
    pub ts: f64,
    /// Its events, in order.
    pub events: Vec<KvEvent>,
    /// The data-parallel rank that published it, when stamped.
    pub dp_rank: Option<u32>,
    /// Events of a type this decoder does not know (skipped).
    pub unknown: usize,
}

/// Where a block lives (`medium`): the GPU (also when unstated) or another tier, such as the
/// CPU of an offloading connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Medium {
    /// `"GPU"` or null.
    Gpu,
    /// Any other tier.
    Other,
}

impl Medium {
    fn of(v: Option<&Value>) -> Self {
        match v.and_then(Value::as_str) {
            None => Self::Gpu,
            Some(s) if s.eq_ignore_ascii_case("gpu") => Self::Gpu,
            Some(_) => Self::Other,
        }
    }
}

/// One item of a block's `extra_keys` (LoRA id or name, `cache_salt`, multimodal hashes, …).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExtraKey {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// Anything else, by a hash of its msgpack encoding.
    Other(u64),
}

/// `BlockStored`: full blocks became cached.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    /// The blocks' engine hashes, in chain order.
    pub block_hashes: Vec<u64>,
    /// The engine hash of the block before the first, `None` at a sequence's start.
    pub parent_block_hash: Option<u64>,
    /// The blocks' tokens, concatenated (`block_size` per block).
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: u32,
    /// vLLM's integer LoRA id, if any.
    pub lora_id: Option<i64>,
    /// The tier.
    pub medium: Medium,
    /// The LoRA adapter's name, if any.
    pub lora_name: Option<String>,
    /// Per block, its extra hash keys (`None` when the engine did not send the field).
    pub extra_keys: Option<Vec<Vec<ExtraKey>>>,
    /// The KV-cache group (hybrid models have several; 0 is full attention).
    pub group_idx: u32,
}

/// One KV-cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Blocks were cached.
    BlockStored(BlockStored),
    /// Cached blocks were evicted.
    BlockRemoved {
        /// Their engine hashes.
        block_hashes: Vec<u64>,
        /// The tier they left.
        medium: Medium,
        /// Their KV-cache group.
        group_idx: u32,
    },
    /// Every cached block is gone.
    AllBlocksCleared,
}

/// Why a payload is not an event batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

fn bad(message: impl Into<String>) -> DecodeError {
    DecodeError(message.into())
}

/// Nesting deeper than this is not an event batch.
const MAX_DEPTH: usize = 16;

/// Decodes one batch payload (the message's third frame).
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    let mut rd = payload;
    let v = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH).map_err(|e| bad(format!("msgpack: {e}")))?;
    if !rd.is_empty() {
        return Err(bad(format!("{} bytes after the batch", rd.len())));
    }
    let Value::Array(items) = v else { return Err(bad("the batch is not an array")) };
    let ts = match items.first() {
        Some(Value::F64(t)) => *t,
        Some(Value::F32(t)) => f64::from(*t),
        Some(v) if v.is_i64() || v.is_u64() => v.as_f64().unwrap_or(0.0),
        _ => return Err(bad("the batch has no timestamp")),
    };
    let Some(Value::Array(raw)) = items.get(1) else { return Err(bad("the batch has no event list")) };
    let dp_rank = match items.get(2) {
        None | Some(Value::Nil) => None,
        Some(v) => Some(v.as_u64().and_then(|r| u32::try_from(r).ok()).ok_or_else(|| bad("bad data_parallel_rank"))?),
    };
    let mut events = Vec::with_capacity(raw.len());
    let mut unknown = 0;
    for (i, e) in raw.iter().enumerate() {
        match decode_event(e).map_err(|m| bad(format!("event {i}: {m}")))? {
            Some(e) => events.push(e),
            None => unknown += 1,
        }
    }
    Ok(EventBatch { ts, events, dp_rank, unknown })
}

/// An event's fields by name, whichever encoding it came in.
struct Fields<'a> {
    tag: &'a str,
    array: Option<&'a [Value]>,
    map: Option<&'a [(Value, Value)]>,
}

impl<'a> Fields<'a> {
    fn of(v: &'a Value) -> Result<Self, String> {
        match v {
            Value::Array(a) => {
                let tag = a.first().and_then(Value::as_str).ok_or("an array event starts with its type name")?;
                Ok(Self { tag, array: Some(a), map: None })
            }
            Value::Map(m) => {
                let tag = m
                    .iter()
                    .find(|(k, _)| k.as_str() == Some("type"))
                    .and_then(|(_, v)| v.as_str())
                    .ok_or("a map event needs a string `type`")?;
                Ok(Self { tag, array: None, map: Some(m) })
            }
            _ => Err("an event is an array or a map".into()),
        }
    }

    /// Field `name`, at position `pos` (counting the tag as 0) in the array encoding.
    fn get(&self, name: &str, pos: usize) -> Option<&'a Value> {
        if let Some(a) = self.array {
            return a.get(pos).filter(|v| !v.is_nil());
        }
        self.map?.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v).filter(|v| !v.is_nil())
    }
}

/// A block hash as vLLM publishes it.
fn hash(v: &Value) -> Result<u64, String> {
    match v {
        Value::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|s| s as u64)).ok_or_else(|| "bad hash".into()),
        Value::Binary(b) if !b.is_empty() => {
            let tail = &b[b.len().saturating_sub(8)..];
            Ok(tail.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
        }
        _ => Err("a block hash is an integer or bytes".into()),
    }
}

fn hashes(v: Option<&Value>) -> Result<Vec<u64>, String> {
    match v {
        Some(Value::Array(a)) => a.iter().map(hash).collect(),
        _ => Err("`block_hashes` must be an array".into()),
    }
}

fn small(v: Option<&Value>, name: &str) -> Result<Option<u32>, String> {
    v.map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| format!("bad `{name}`"))).transpose()
}

fn extra_key(v: &Value) -> ExtraKey {
    match v {
        Value::String(s) => {
            ExtraKey::Str(s.as_str().map_or_else(|| String::from_utf8_lossy(s.as_bytes()).into_owned(), str::to_owned))
        }
        Value::Integer(i) => match i.as_i64() {
            Some(x) => ExtraKey::Int(x),
            None => ExtraKey::Other(i.as_u64().unwrap_or(0)),
        },
        other => {
            let mut buf = Vec::new();
            // Writing to a Vec cannot fail.
            let _ = rmpv::encode::write_value(&mut buf, other);
            ExtraKey::Other(xxhash_rust::xxh3::xxh3_64(&buf))
        }
    }
}

/// `extra_keys`: one entry per block, each null or a list (a scalar is taken as a one-item list).
fn extra_keys(v: Option<&Value>, blocks: usize) -> Result<Option<Vec<Vec<ExtraKey>>>, String> {
    let Some(v) = v else { return Ok(None) };
    let Value::Array(per_block) = v else { return Err("`extra_keys` must be an array".into()) };
    if per_block.len() != blocks {
        return Err(format!("`extra_keys` has {} entries for {blocks} blocks", per_block.len()));
    }
    Ok(Some(
        per_block
            .iter()
            .map(|e| match e {
                Value::Nil => Vec::new(),
                Value::Array(items) => items.iter().map(extra_key).collect(),
                scalar => vec![extra_key(scalar)],
            })
            .collect(),
    ))
}

fn decode_event(v: &Value) -> Result<Option<KvEvent>, String> {
    let f = Fields::of(v)?;
    match f.tag {
        "BlockStored" => {
            let block_hashes = hashes(f.get("block_hashes", 1))?;
            let parent_block_hash = f.get("parent_block_hash", 2).map(hash).transpose()?;
            let token_ids = match f.get("token_ids", 3) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or("bad token id"))
                    .collect::<Result<Vec<u32>, _>>()?,
                _ => return Err("`token_ids` must be an array".into()),
            };
            let block_size = small(f.get("block_size", 4), "block_size")?.ok_or("`block_size` is missing")?;
            if block_size == 0 || token_ids.len() != block_size as usize * block_hashes.len() {
                return Err(format!("{} tokens for {} blocks of {block_size}", token_ids.len(), block_hashes.len()));
            }
            let lora_id = f.get("lora_id", 5).map(|v| v.as_i64().ok_or("bad `lora_id`")).transpose()?;
            let medium = Medium::of(f.get("medium", 6));
            let lora_name = match f.get("lora_name", 7) {
                None => None,
                Some(v) => Some(v.as_str().ok_or("bad `lora_name`")?.to_owned()),
            };
            let extra_keys = extra_keys(f.get("extra_keys", 8), block_hashes.len())?;
            let group_idx = small(f.get("group_idx", 9), "group_idx")?.unwrap_or(0);
            Ok(Some(KvEvent::BlockStored(BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
                extra_keys,
                group_idx,
            })))
        }
        "BlockRemoved" => Ok(Some(KvEvent::BlockRemoved {
            block_hashes: hashes(f.get("block_hashes", 1))?,
            medium: Medium::of(f.get("medium", 2)),
            group_idx: small(f.get("group_idx", 3), "group_idx")?.unwrap_or(0),
        })),
        "AllBlocksCleared" => Ok(Some(KvEvent::AllBlocksCleared)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(v: &Value) -> Vec<u8> {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, v).expect("encode");
        buf
    }

    #[test]
    fn both_encodings_decode_alike() {
        let array = Value::Array(vec![
            Value::F64(1.5),
            Value::Array(vec![
                Value::Array(vec![
                    "BlockStored".into(),
                    Value::Array(vec![Value::from(u64::MAX), Value::from(-3i64)]),
                    Value::Nil,
                    Value::Array((0..4).map(Value::from).collect()),
                    Value::from(2),
                    Value::Nil,
                    "GPU".into(),
                ]),
                Value::Array(vec!["BlockRemoved".into(), Value::Array(vec![Value::from(7)]), "CPU".into()]),
                Value::Array(vec!["SomethingNew".into()]),
                Value::Array(vec!["AllBlocksCleared".into()]),
            ]),
            Value::from(1),
        ]);
        let b = decode_batch(&pack(&array)).expect("array batch");
        assert_eq!((b.events.len(), b.unknown, b.dp_rank), (3, 1, Some(1)));
        let KvEvent::BlockStored(s) = &b.events[0] else { panic!("stored first") };
        assert_eq!(s.block_hashes, [u64::MAX, (-3i64) as u64]);
        assert_eq!(s.extra_keys, None);
        assert_eq!(b.events[1], KvEvent::BlockRemoved { block_hashes: vec![7], medium: Medium::Other, group_idx: 0 });

        let map = |pairs: Vec<(&str, Value)>| Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect());
        let stored = map(vec![
            ("type", "BlockStored".into()),
            ("block_hashes", Value::Array(vec![Value::Binary(vec![9; 32])])),
            ("parent_block_hash", Value::from(5)),
            ("token_ids", Value::Array((0..2).map(Value::from).collect())),
            ("block_size", Value::from(2)),
            ("lora_id", Value::from(1)),
            ("medium", Value::Nil),
            ("lora_name", "sql".into()),
            ("extra_keys", Value::Array(vec![Value::Array(vec!["sql".into(), "salt".into()])])),
        ]);
        let b = decode_batch(&pack(&Value::Array(vec![Value::F64(2.0), Value::Array(vec![stored])]))).expect("map");
        let KvEvent::BlockStored(s) = &b.events[0] else { panic!("stored") };
        assert_eq!(s.block_hashes, [0x0909_0909_0909_0909]);
        assert_eq!(s.parent_block_hash, Some(5));
        assert_eq!(s.medium, Medium::Gpu);
        assert_eq!(s.extra_keys, Some(vec![vec![ExtraKey::Str("sql".into()), ExtraKey::Str("salt".into())]]));
        assert_eq!(b.dp_rank, None);
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for bytes in
            [&b""[..], b"\xc1", b"\x93\xcb", &pack(&Value::from(3))[..], &pack(&Value::Array(vec![Value::F64(0.0)]))]
        {
            assert!(decode_batch(bytes).is_err(), "{bytes:?}");
        }
        // Token count disagreeing with the blocks.
        let e = Value::Array(vec![
            "BlockStored".into(),
            Value::Array(vec![Value::from(1)]),
            Value::Nil,
            Value::Array(vec![Value::from(1)]),
            Value::from(16),
        ]);
        let err = decode_batch(&pack(&Value::Array(vec![Value::F64(0.0), Value::Array(vec![e])]))).unwrap_err();
        assert!(err.to_string().contains("1 tokens for 1 blocks of 16"), "{err}");
        // Deep nesting is refused, not recursed into.
        let mut deep = Value::Nil;
        for _ in 0..100 {
            deep = Value::Array(vec![deep]);
        }
        assert!(decode_batch(&pack(&deep)).is_err());
    }
}
