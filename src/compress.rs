//! Per-block compression codecs for bulk data on the wire.

use std::io::{self, Read, Write};

/// How block payloads are compressed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Codec {
    /// Raw bytes.
    None,
    /// zstd at the given level (1..=19).
    Zstd(i32),
    /// zlib (deflate) at the given level (1..=9), as the original tool uses.
    Zlib(u32),
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
            Codec::Zstd(level) => zstd::bulk::compress(raw, level).ok().map(|v| (PayloadCodec::Zstd, v)),
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

/// Decodes a payload that must expand to exactly `raw_len` bytes; anything else
/// (corrupt data, a decompression bomb) is an error, and at most `raw_len` bytes are
/// ever allocated.
pub fn decode(codec: PayloadCodec, payload: &[u8], raw_len: usize) -> io::Result<Vec<u8>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let out = match codec {
        PayloadCodec::Zero if payload.is_empty() => vec![0u8; raw_len],
        PayloadCodec::Zero => return Err(bad("a zero token with a payload")),
        PayloadCodec::Raw => payload.to_vec(),
        PayloadCodec::Zstd => {
            zstd::bulk::decompress(payload, raw_len).map_err(|e| bad(&format!("bad zstd block: {e}")))?
        }
        PayloadCodec::Zlib => {
            let mut out = Vec::with_capacity(raw_len);
            flate2::read::ZlibDecoder::new(payload)
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
                prop_assert_eq!(decode(pc, &payload, data.len()).unwrap(), data.clone());
            }
        }
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
            assert!(decode(pc, &payload, 4096).is_err());
            assert!(decode(pc, &payload, (1 << 20) + 1).is_err());
        }
        assert!(decode(PayloadCodec::Raw, &[1, 2, 3], 4).is_err());
    }

    #[test]
    fn zero_data_is_a_token_and_its_last_byte_counts() {
        for codec in [Codec::None, Codec::Zstd(3), Codec::Zlib(6)] {
            assert_eq!(codec.encode(&vec![0u8; 65536]), (PayloadCodec::Zero, Vec::new()));
            let mut last = vec![0u8; 65536];
            last[65535] = 1;
            let (pc, payload) = codec.encode(&last);
            assert_ne!(pc, PayloadCodec::Zero);
            assert_eq!(decode(pc, &payload, 65536).unwrap(), last);
        }
        assert_eq!(decode(PayloadCodec::Zero, &[], 5).unwrap(), vec![0u8; 5]);
        assert!(decode(PayloadCodec::Zero, &[0], 5).is_err());
    }
}
