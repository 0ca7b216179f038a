//! Fuzz targets, run by the suite with a bounded number of cases: every parser that reads
//! bytes someone else wrote gets arbitrary bytes, and mutations of valid inputs (the
//! golden fixtures), and must answer with an error, never a panic, a hang or an
//! allocation beyond its limits.
//!
//! - the frame decoder (what a peer sends),
//! - `basyn serve` on whole hostile streams against a real image file,
//! - the state parser (a `.basyn-state` file anyone with write access may have changed),
//! - the bitmap parser (a `-b` FILE, maybe written by the original or another tool).
//!
//! `BASYN_FUZZ_CASES=N` sets the cases per target (default 10000); a long run is, for
//! example, `BASYN_FUZZ_CASES=200000 cargo test --release --test fuzz`.

use std::sync::Arc;

use basyn::protocol::{FrameReader, MAGIC, VERSION};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn runner() -> TestRunner {
    let cases = std::env::var("BASYN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10000);
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Arbitrary bytes, or a valid input with a few bytes changed and maybe cut short.
fn inputs(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len();
    let mutated = (proptest::collection::vec((0..len, any::<u8>()), 1..8), 0..=len).prop_map(move |(flips, cut)| {
        let mut v = valid.clone();
        for (at, x) in flips {
            v[at] ^= x.max(1);
        }
        v.truncate(cut.max(1));
        v
    });
    prop_oneof![proptest::collection::vec(any::<u8>(), 0..4096), mutated]
}

/// Every frame of `bytes`, until the first error.
fn decode_all(bytes: &[u8]) -> usize {
    let mut r = FrameReader::new(bytes, Arc::default());
    if r.start().is_err() {
        return 0;
    }
    let mut n = 0;
    while let Ok(Some(_)) = r.recv() {
        n += 1;
    }
    n
}

#[test]
fn the_frame_decoder_takes_any_bytes() {
    let golden = fixture("protocol/session-v6.bin");
    assert!(decode_all(&golden) > 3, "the golden session does not decode");
    runner()
        .run(&inputs(golden), |bytes| {
            decode_all(&bytes);
            // The same bytes after a valid preamble reach the frame parser proper.
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&VERSION.to_be_bytes());
            framed.extend_from_slice(&bytes);
            decode_all(&framed);
            Ok(())
        })
        .unwrap();
}

#[test]
fn basyn_serve_takes_any_stream_and_answers_with_an_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.img");
    let content: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &content).unwrap();
    let golden = fixture("protocol/session-v6.bin");
    // A hostile client: preamble, Hello of this version, then anything.
    let mut hello = Vec::new();
    {
        let mut w = basyn::protocol::FrameWriter::new(&mut hello, Arc::default());
        w.start().unwrap();
        let m = basyn::protocol::Message::Hello { version: u32::from(VERSION), features: 0 };
        w.send(&basyn::protocol::Frame::Control(m)).unwrap();
    }
    let mut runner = TestRunner::new(Config { cases: runner().config().cases / 4 + 1, ..runner().config().clone() });
    // The golden session after its preamble and its own Hello (kind, u32 little-endian length, body).
    let hello_len = u32::from_le_bytes([golden[9], golden[10], golden[11], golden[12]]) as usize;
    let requests = golden[8 + 5 + hello_len..].to_vec();
    runner
        .run(&inputs(requests), |bytes| {
            let mut stream = hello.clone();
            stream.extend_from_slice(&bytes);
            let code = basyn::serve::serve(&basyn::restrict::Config::device(&image), &stream[..], std::io::sink());
            prop_assert!([0, 1, 2].contains(&code), "exit code {code}");
            Ok(())
        })
        .unwrap();
    // Without a valid digest nothing may have been written.
    assert_eq!(std::fs::read(&image).unwrap(), content, "a hostile stream changed the served image");
}

#[test]
fn the_state_parser_takes_any_bytes() {
    let golden = fixture("state/sample-v3.basyn-state");
    assert!(basyn::state::decode(&golden).is_ok(), "the golden state does not decode");
    runner()
        .run(&inputs(golden), |bytes| {
            let _ = basyn::state::decode(&bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_bitmap_parser_takes_any_file() {
    use basyn::bitmap_file::{Format, Geometry, load};
    use basyn::hash::HashAlgo;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.bitmap");
    let want = Geometry { device_size: 10 << 20, buffer: 1 << 20, hash: HashAlgo::Sha256 };
    // A valid FILE in the original's format: the header, then ten digests.
    let mut valid = want.header(Format::for_hash(HashAlgo::Sha256)).unwrap().to_vec();
    valid.extend((0..10 * 32).map(|i| i as u8));
    std::fs::write(&path, &valid).unwrap();
    assert!(matches!(load(&path, &want, "local src"), Ok(Some(_))), "the valid FILE does not load");
    runner()
        .run(&inputs(valid), |bytes| {
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(Some((_, digests))) = load(&path, &want, "local src") {
                prop_assert_eq!(digests.len(), 10 * 32);
            }
            Ok(())
        })
        .unwrap();
}
