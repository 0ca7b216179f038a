//! Per-block compression codecs for bulk data on the wire.

use std::io::{self, Read, Write};

/// How block payloads are compressed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Codec {
    /// Raw bytes.
    None,
    /// zstd at the given level (1..=19; an adapting level also takes the fast ones,
    /// below 0).
    Zstd(i32),
    /// zlib (deflate) at the given level (1..=9), as the original tool uses.
    Zlib(u32),
}

/// The zstd level a transfer starts from when no level was chosen.
pub const ADAPTIVE_START: i32 = 1;
/// The range an adapting level moves in: zstd's fast levels, when compressing is what
/// holds the transfer back, up to where more effort stops paying on a slow link.
const ADAPTIVE_RANGE: std::ops::RangeInclusive<i32> = -5..=9;

/// A zstd level that follows the transfer's own speed: after each period the sender
/// says how much source data it sent and how long that took, and the level moves one
/// step, on in the same direction while that made the transfer faster, back while it
/// made it slower. Slow links climb to levels that send fewer bytes, a CPU that the link
/// (ssh) shares settles on fast levels: whatever is the limit, the rate is what counts.
/// Shared by the threads that compress.
#[derive(Debug)]
pub struct Adaptive {
    level: std::sync::atomic::AtomicI32,
    period: std::sync::Mutex<Period>,
}

/// The rate of the last period, the way the level moves, and the levels used.
#[derive(Debug, Default)]
struct Period {
    last_rate: Option<f64>,
    up: bool,
    lowest: i32,
    highest: i32,
}

impl Adaptive {
    /// Starts at `level`, trying a higher one first.
    pub fn new(level: i32) -> Adaptive {
        let period = Period { last_rate: None, up: true, lowest: level, highest: level };
        Adaptive { level: level.into(), period: std::sync::Mutex::new(period) }
    }

    fn period(&self) -> std::sync::MutexGuard<'_, Period> {
        self.period.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The codec to compress the next block with.
    pub fn codec(&self) -> Codec {
        Codec::Zstd(self.level.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// A period ended: `bytes` of source data went in `elapsed`. Moves the level one
    /// step (on while the rate rose, back when it fell by 2% or more) and returns it.
    pub fn decide(&self, bytes: u64, elapsed: std::time::Duration) -> Option<i32> {
        let rate = bytes as f64 / elapsed.as_secs_f64().max(1e-6);
        let mut p = self.period();
        if p.last_rate.is_some_and(|last| rate < 0.98 * last) {
            p.up = !p.up;
        }
        p.last_rate = Some(rate);
        let now = self.level.load(std::sync::atomic::Ordering::Relaxed);
        // Level 0 is zstd's default (3), not a step: it is skipped both ways.
        let next = match (p.up, now) {
            (true, -1) => 1,
            (true, l) => l + 1,
            (false, 1) => -1,
            (false, l) => l - 1,
        };
        let next = next.clamp(*ADAPTIVE_RANGE.start(), *ADAPTIVE_RANGE.end());
        if next == now {
            // At an end of the range: the next step goes back.
            p.up = !p.up;
            return None;
        }
        self.level.store(next, std::sync::atomic::Ordering::Relaxed);
        p.lowest = p.lowest.min(next);
        p.highest = p.highest.max(next);
        Some(next)
    }

    /// "zstd level 1 at the end (adapted between -2 and 3)".
    pub fn describe(&self) -> String {
        let now = self.codec().describe();
        let p = self.period();
        if p.lowest == p.highest {
            return format!("{now} (kept)");
        }
        format!("{now} at the end (adapted between {} and {})", p.lowest, p.highest)
    }
}

/// Wire identifier of the codec that a particular payload was encoded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PayloadCodec {
    /// Raw bytes.
    Raw = 0,
    /// A zstd frame.
    Zstd = 1,
    /// A zlib stream.
    Zlib = 2,
    /// All-zero data: no payload, only the length (a token, never the bytes).
    Zero = 3,
}

impl PayloadCodec {
    /// Parses the wire byte.
    pub fn from_byte(b: u8) -> Option<PayloadCodec> {
        match b {
            0 => Some(PayloadCodec::Raw),
            1 => Some(PayloadCodec::Zstd),
            2 => Some(PayloadCodec::Zlib),
            3 => Some(PayloadCodec::Zero),
            _ => None,
        }
    }
}

impl Codec {
    /// Human name for logs and `--stat`.
    pub fn describe(self) -> String {
        match self {
            Codec::None => "none".to_string(),
            Codec::Zstd(l) => format!("zstd level {l}"),
            Codec::Zlib(l) => format!("zlib level {l}"),
        }
    }

    /// Compresses `raw`; falls back to raw bytes when compression does not shrink them,
    /// so a payload is never larger than its data. All-zero data becomes a zero token
    /// with any codec.
    pub fn encode(self, raw: &[u8]) -> (PayloadCodec, Vec<u8>) {
        if crate::hash::is_zero(raw) {
            return (PayloadCodec::Zero, Vec::new());
        }
        let packed = match self {
            Codec::None => None,
            Codec::Zstd(_) | Codec::Zlib(_) if !worth_compressing(self, raw) => None,
            Codec::Zstd(level) => zstd_compress(raw, level).map(|v| (PayloadCodec::Zstd, v)),
            Codec::Zlib(level) => {
                let mut enc =
                    flate2::write::ZlibEncoder::new(Vec::with_capacity(raw.len() / 2), flate2::Compression::new(level));
                enc.write_all(raw).and_then(|()| enc.finish()).ok().map(|v| (PayloadCodec::Zlib, v))
            }
        };
        match packed {
            Some((codec, v)) if v.len() < raw.len() => (codec, v),
            _ => (PayloadCodec::Raw, raw.to_vec()),
        }
    }
}

/// Blocks larger than this are sampled before they are compressed.
const SAMPLE: usize = 64 << 10;

/// False when a sample from the start of a large block does not shrink by at least 3%
/// (encrypted or already compressed data): the whole block would not either, and
/// compressing it would only spend CPU.
fn worth_compressing(codec: Codec, raw: &[u8]) -> bool {
    if raw.len() < 4 * SAMPLE {
        return true;
    }
    let sample = &raw[..SAMPLE];
    let packed = match codec {
        Codec::Zstd(level) => zstd_compress(sample, level.min(1)).map(|v| v.len()),
        _ => return true,
    };
    packed.is_some_and(|n| n * 100 < SAMPLE * 97)
}

/// A thread's zstd contexts: the compressor with its level, and the decompressor.
type Contexts = (Option<(i32, zstd::bulk::Compressor<'static>)>, Option<zstd::bulk::Decompressor<'static>>);

thread_local! {
    /// Each thread's zstd contexts, kept from block to block: making one costs more
    /// than compressing a small block.
    static ZSTD: std::cell::RefCell<Contexts> = const { std::cell::RefCell::new((None, None)) };
}

fn zstd_compress(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    ZSTD.with_borrow_mut(|(c, _)| {
        match c {
            Some((l, _)) if *l == level => {}
            Some((l, ctx)) => {
                ctx.set_compression_level(level).ok()?;
                *l = level;
            }
            None => *c = Some((level, zstd::bulk::Compressor::new(level).ok()?)),
        }
        c.as_mut()?.1.compress(raw).ok()
    })
}

fn zstd_decompress(payload: &[u8], raw_len: usize) -> io::Result<Vec<u8>> {
    ZSTD.with_borrow_mut(|(_, d)| {
        let ctx = match d {
            Some(ctx) => ctx,
            None => d.insert(zstd::bulk::Decompressor::new()?),
        };
        ctx.decompress(payload, raw_len)
    })
}

/// Decodes a payload that must expand to exactly `raw_len` bytes; anything else
/// (corrupt data, a decompression bomb) is an error, and at most `raw_len` bytes are
/// ever allocated.
pub fn decode(codec: PayloadCodec, payload: Vec<u8>, raw_len: usize) -> io::Result<Vec<u8>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let out = match codec {
        PayloadCodec::Zero if payload.is_empty() => vec![0u8; raw_len],
        PayloadCodec::Zero => return Err(bad("a zero token with a payload")),
        PayloadCodec::Raw => payload,
        PayloadCodec::Zstd => zstd_decompress(&payload, raw_len).map_err(|e| bad(&format!("bad zstd block: {e}")))?,
        PayloadCodec::Zlib => {
            let mut out = Vec::with_capacity(raw_len);
            flate2::read::ZlibDecoder::new(&payload[..])
                .take(raw_len as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| bad(&format!("bad zlib block: {e}")))?;
            out
        }
    };
    if out.len() != raw_len {
        return Err(bad(&format!("block expands to {} bytes, expected {raw_len}", out.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_codec_round_trips(data in proptest::collection::vec(0u8..4, 0..5000), level in 1i32..6) {
            for codec in [Codec::None, Codec::Zstd(level), Codec::Zlib(level as u32)] {
                let (pc, payload) = codec.encode(&data);
                prop_assert!(payload.len() <= data.len());
                prop_assert_eq!(decode(pc, payload.clone(), data.len()).unwrap(), data.clone());
            }
        }
    }

    #[test]
    fn an_adapting_level_climbs_while_the_rate_rises_and_turns_back_when_it_falls() {
        use std::time::Duration;
        let a = Adaptive::new(ADAPTIVE_START);
        let s = Duration::from_secs(1);
        assert_eq!(a.decide(100, s), Some(2), "the first step goes up");
        assert_eq!(a.decide(120, s), Some(3), "faster: on up");
        assert_eq!(a.decide(90, s), Some(2), "slower: back down");
        assert_eq!(a.decide(95, s), Some(1), "faster again: on down");
        assert_eq!(a.decide(96, s), Some(-1), "past 1 to the fast levels, skipping 0");
        for _ in 0..4 {
            a.decide(96, s);
        }
        assert_eq!(a.codec(), Codec::Zstd(-5), "on down while the rate holds");
        assert_eq!(a.decide(96, s), None, "the end of the range: no step, and the next goes back");
        for k in 0..13 {
            a.decide(1000 + k, s);
        }
        assert_eq!(a.codec(), Codec::Zstd(9), "up while the rate rises, to the top");
        assert!(a.describe().ends_with("(adapted between -5 and 9)"), "{}", a.describe());
        // Negative levels compress and decode like any other.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i / 7 % 13) as u8).collect();
        let (pc, payload) = Codec::Zstd(-5).encode(&data);
        assert_eq!(pc, PayloadCodec::Zstd);
        assert_eq!(decode(pc, payload.clone(), data.len()).unwrap(), data);
    }

    #[test]
    fn a_large_block_that_does_not_shrink_is_sent_raw() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (pc, payload) = Codec::Zstd(3).encode(&noise);
        assert_eq!((pc, payload.len()), (PayloadCodec::Raw, noise.len()));
    }

    #[test]
    fn compressible_data_shrinks() {
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 7) as u8).collect();
        let (pc, payload) = Codec::Zstd(3).encode(&data);
        assert_eq!(pc, PayloadCodec::Zstd);
        assert!(payload.len() < 1000);
    }

    #[test]
    fn a_bomb_or_a_short_block_is_refused() {
        let data = vec![1u8; 1 << 20];
        for codec in [Codec::Zstd(3), Codec::Zlib(6)] {
            let (pc, payload) = codec.encode(&data);
            assert!(decode(pc, payload.clone(), 4096).is_err());
            assert!(decode(pc, payload.clone(), (1 << 20) + 1).is_err());
        }
        assert!(decode(PayloadCodec::Raw, vec![1, 2, 3], 4).is_err());
    }

    #[test]
    fn zero_data_is_a_token_and_its_last_byte_counts() {
        for codec in [Codec::None, Codec::Zstd(3), Codec::Zlib(6)] {
            assert_eq!(codec.encode(&vec![0u8; 65536]), (PayloadCodec::Zero, Vec::new()));
            let mut last = vec![0u8; 65536];
            last[65535] = 1;
            let (pc, payload) = codec.encode(&last);
            assert_ne!(pc, PayloadCodec::Zero);
            assert_eq!(decode(pc, payload.clone(), 65536).unwrap(), last);
        }
        assert_eq!(decode(PayloadCodec::Zero, vec![], 5).unwrap(), vec![0u8; 5]);
        assert!(decode(PayloadCodec::Zero, vec![0], 5).is_err());
    }
}
