//! Changed ranges: which parts of a source changed since an older snapshot of it, as
//! `thin_delta` reports them from an LVM-thin pool's metadata, or as a plain list of
//! byte ranges (`--changed-ranges FILE`, formats in `docs/usage.md`).
//!
//! Both are untrusted input: they are read as a stream (memory stays bounded however
//! large the file), every number is checked, and anything that is not exactly one of
//! the two formats (a DOCTYPE or entity, an unknown element, a file cut short, a range
//! past the device's end) is an error naming the line or byte. What comes out is the
//! set of leaves the ranges touch: a range is widened to whole leaves, never narrowed.

use std::io::BufRead;

use quick_xml::events::{BytesStart, Event};

use crate::tree::Layout;

/// Bytes per sector, the unit of `data_block_size`.
const SECTOR: u64 = 512;
/// The largest thin pool block the kernel accepts (1 GiB), in sectors.
const MAX_BLOCK_SECTORS: u64 = 1 << 21;

/// What a changed-ranges input says, in leaves and pieces of the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    /// One flag per leaf: some byte of it changed.
    pub leaves: Vec<bool>,
    /// One bit per piece ([`Layout::piece`]): some byte of it changed (a bit set of
    /// 8 MiB for a 1 TiB device with 16 KiB pieces).
    pieces: Vec<u64>,
    /// Bytes the input reports as changed (within the device).
    pub bytes: u64,
    /// The thin device ids `thin_delta` compared (its `diff left`, `right`), if the
    /// input was its XML.
    pub thin_ids: Option<(u64, u64)>,
    /// The pool's block size in bytes, if the input was `thin_delta`'s XML.
    pub block_bytes: Option<u64>,
}

impl Changed {
    /// How many leaves changed.
    pub fn count(&self) -> u64 {
        self.leaves.iter().filter(|&&c| c).count() as u64
    }

    fn piece_changed(&self, piece: u64) -> bool {
        self.pieces[(piece / 64) as usize] & (1 << (piece % 64)) != 0
    }

    /// The changed runs of whole pieces in leaf `leaf`, as (offset, length) in bytes.
    pub fn runs(&self, layout: &Layout, leaf: u64) -> Vec<(u64, u64)> {
        let (offset, len) = layout.leaf_span(leaf);
        let piece = layout.piece();
        let first = offset / piece;
        let count = layout.pieces_of(leaf);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for k in 0..count {
            if !self.piece_changed(first + k) {
                continue;
            }
            let (start, end) = (offset + k * piece, (offset + (k + 1) * piece).min(offset + len));
            match runs.last_mut() {
                Some((o, l)) if *o + *l == start => *l = end - *o,
                _ => runs.push((start, end - start)),
            }
        }
        runs
    }
}

/// Why a changed-ranges input was refused.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {why}")]
pub struct ChangesError {
    /// The input, and where in it.
    pub what: String,
    /// What is wrong.
    pub why: String,
}

/// Reads `input` (named `name` in errors): `thin_delta`'s XML if its first non-blank
/// byte is `<`, else a ranges file.
pub fn read(mut input: impl BufRead, name: &str, layout: &Layout) -> Result<Changed, ChangesError> {
    let io = |e: std::io::Error| ChangesError { what: name.to_string(), why: format!("cannot be read: {e}") };
    let first = loop {
        let buf = input.fill_buf().map_err(io)?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(at) => break Some(buf[at]),
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    };
    let mut marks = Marks::new(layout);
    match first {
        None => Err(ChangesError { what: name.to_string(), why: "is empty".into() }),
        Some(b'<') => {
            let (ids, block) = thin_delta_xml(input, name, &mut marks)?;
            Ok(marks.done(Some(ids), Some(block)))
        }
        Some(_) => {
            ranges_file(input, name, &mut marks)?;
            Ok(marks.done(None, None))
        }
    }
}

/// The leaves and pieces marked so far.
struct Marks {
    layout: Layout,
    leaves: Vec<bool>,
    pieces: Vec<u64>,
    bytes: u64,
}

impl Marks {
    fn new(layout: &Layout) -> Marks {
        let (leaves, pieces) = (layout.leaf_count() as usize, layout.device_size.div_ceil(layout.piece()));
        Marks { layout: *layout, leaves: vec![false; leaves], pieces: vec![0; pieces.div_ceil(64) as usize], bytes: 0 }
    }

    /// Marks the leaves and pieces `[offset, offset+len)` touches; an error names why it
    /// does not fit the device.
    fn mark(&mut self, offset: u64, len: u64) -> Result<(), String> {
        let size = self.layout.device_size;
        if len == 0 {
            return Err("a range of length 0".into());
        }
        let end = offset.checked_add(len).ok_or_else(|| format!("range {offset}+{len} overflows"))?;
        if offset >= size {
            return Err(format!(
                "range at byte {offset} is past the end of the device ({size} bytes): is it the list for this device?"
            ));
        }
        let end = end.min(size);
        self.bytes += end - offset;
        let buffer = self.layout.buffer;
        for leaf in offset / buffer..end.div_ceil(buffer) {
            self.leaves[leaf as usize] = true;
        }
        let piece = self.layout.piece();
        for p in offset / piece..end.div_ceil(piece) {
            self.pieces[(p / 64) as usize] |= 1 << (p % 64);
        }
        Ok(())
    }

    fn done(self, thin_ids: Option<(u64, u64)>, block_bytes: Option<u64>) -> Changed {
        Changed { leaves: self.leaves, pieces: self.pieces, bytes: self.bytes, thin_ids, block_bytes }
    }
}

/// A number as the inputs write it: decimal, or hexadecimal after `0x`.
fn number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => text.parse().ok(),
        None => None,
    }
}

/// A ranges file: one `OFFSET LENGTH` in bytes per line; `#` starts a comment.
fn ranges_file(input: impl BufRead, name: &str, marks: &mut Marks) -> Result<(), ChangesError> {
    for (n, line) in input.split(b'\n').enumerate() {
        let at = || format!("{name}: line {}", n + 1);
        let line = line.map_err(|e| ChangesError { what: at(), why: format!("cannot be read: {e}") })?;
        let line = std::str::from_utf8(&line).map_err(|_| ChangesError { what: at(), why: "is not text".into() })?;
        let line = line.split('#').next().unwrap_or_default();
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let (offset, len) = match fields[..] {
            [] => continue,
            [o, l] => (number(o), number(l)),
            _ => (None, None),
        };
        let (Some(offset), Some(len)) = (offset, len) else {
            return Err(ChangesError { what: at(), why: format!("{:?} is not OFFSET LENGTH in bytes", line.trim()) });
        };
        marks.mark(offset, len).map_err(|why| ChangesError { what: at(), why })?;
    }
    Ok(())
}

/// Where the XML reader is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Before `<superblock>`.
    Top,
    /// In `<superblock>`, before `<diff>`.
    Superblock,
    /// In `<diff>`.
    Diff,
    /// In a `<same>`, `<different>`, `<left_only>` or `<right_only>` of the verbose form,
    /// which holds `<range>` elements; true if its ranges changed.
    Kind(bool),
    /// In `<superblock>`, after `</diff>`.
    AfterDiff,
    /// After `</superblock>`.
    End,
}

/// The attribute `key` of `e` as a number.
fn attribute(e: &BytesStart<'_>, key: &str) -> Result<u64, String> {
    let element = e.name().as_ref().to_string();
    for a in e.attributes() {
        let a = a.map_err(|err| format!("<{element}>: {err}"))?;
        if a.key.as_ref() == key {
            let text: &str = &a.value;
            return number(text).ok_or_else(|| format!("<{element} {key}={text:?}>: not a number"));
        }
    }
    Err(format!("<{element}> has no {key}"))
}

/// Whether thin_delta's element `name` lists changed blocks; `None` if it is not one
/// of its four kinds.
fn kind(name: &str) -> Option<bool> {
    match name {
        "same" => Some(false),
        "different" | "left_only" | "right_only" => Some(true),
        _ => None,
    }
}

/// `thin_delta`'s XML, plain or `--verbose`: returns the compared thin ids and the
/// pool's block size in bytes.
fn thin_delta_xml(input: impl BufRead, name: &str, marks: &mut Marks) -> Result<((u64, u64), u64), ChangesError> {
    let mut reader = quick_xml::Reader::from_reader(input);
    let mut buf = Vec::new();
    let mut place = Place::Top;
    let mut block = 0u64;
    let mut ids = None;
    loop {
        let at = |reader: &quick_xml::Reader<_>| format!("{name}: byte {}", reader.buffer_position());
        let event = reader.read_event_into(&mut buf).map_err(|e| ChangesError {
            what: at(&reader),
            why: format!("is not well-formed XML, or is cut short ({e})"),
        })?;
        let fail = |why: String| ChangesError { what: at(&reader), why };
        let empty = matches!(event, Event::Empty(_));
        match (place, event) {
            (_, Event::Comment(_)) | (Place::Top, Event::Decl(_)) => {}
            (_, Event::Text(t)) if t.bytes().all(|b| b.is_ascii_whitespace()) => {}
            (_, Event::DocType(_)) => return Err(fail("has a DOCTYPE: thin_delta's output has none".into())),
            (_, Event::Eof) if place == Place::End => break,
            (_, Event::Eof) => return Err(fail("ends before </superblock>: the XML is cut short".into())),
            (Place::Top, Event::Start(e)) if e.name().as_ref() == "superblock" => {
                block = attribute(&e, "data_block_size").map_err(fail)?;
                if block == 0 || block > MAX_BLOCK_SECTORS {
                    return Err(fail(format!("data_block_size {block} is not a thin pool block size in sectors")));
                }
                place = Place::Superblock;
            }
            (Place::Superblock, Event::Start(e)) if e.name().as_ref() == "diff" => {
                let left = attribute(&e, "left").map_err(fail)?;
                let right = attribute(&e, "right").map_err(fail)?;
                ids = Some((left, right));
                place = Place::Diff;
            }
            (Place::Diff, Event::Start(e) | Event::Empty(e)) if kind(e.name().as_ref()).is_some() => {
                let changed = kind(e.name().as_ref()) == Some(true);
                if empty {
                    range(&e, changed, block, marks).map_err(fail)?;
                } else {
                    place = Place::Kind(changed);
                }
            }
            (Place::Kind(changed), Event::Empty(e)) if e.name().as_ref() == "range" => {
                range(&e, changed, block, marks).map_err(fail)?;
            }
            (Place::Kind(_), Event::End(e)) if kind(e.name().as_ref()).is_some() => place = Place::Diff,
            (Place::Diff, Event::End(e)) if e.name().as_ref() == "diff" => place = Place::AfterDiff,
            (Place::AfterDiff, Event::End(e)) if e.name().as_ref() == "superblock" => place = Place::End,
            (_, other) => {
                let what = match &other {
                    Event::Start(e) | Event::Empty(e) => format!("element <{}>", e.name().as_ref()),
                    Event::End(e) => format!("</{}>", e.name().as_ref()),
                    Event::Text(_) => "text".into(),
                    Event::GeneralRef(_) => "an entity reference".into(),
                    _ => format!("{other:?}").chars().take(40).collect(),
                };
                return Err(fail(format!("unexpected {what}: not thin_delta's XML")));
            }
        }
        buf.clear();
    }
    let ids = ids.ok_or_else(|| ChangesError { what: name.into(), why: "has no <diff>".into() })?;
    Ok((ids, block * SECTOR))
}

/// One `begin`/`length` range of thin blocks, marked if `changed`.
fn range(e: &BytesStart<'_>, changed: bool, block: u64, marks: &mut Marks) -> Result<(), String> {
    let begin = attribute(e, "begin")?;
    let length = attribute(e, "length")?;
    let bytes = block * SECTOR;
    let (Some(offset), Some(len)) = (begin.checked_mul(bytes), length.checked_mul(bytes)) else {
        return Err(format!("blocks {begin}+{length} of {bytes} bytes overflow"));
    };
    if changed { marks.mark(offset, len) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgo;

    const MIB: u64 = 1 << 20;

    fn layout(size: u64) -> Layout {
        Layout { hash: HashAlgo::Blake3, buffer: 2 * MIB, chunk: None, fanout: 64, device_size: size }
    }

    fn parse(text: &str, size: u64) -> Result<Changed, ChangesError> {
        read(text.as_bytes(), "ranges", &layout(size))
    }

    fn marked(c: &Changed) -> Vec<usize> {
        c.leaves.iter().enumerate().filter(|(_, m)| **m).map(|(i, _)| i).collect()
    }

    /// Real output of `thin_delta --snap1 1 --snap2 2 meta.bin` (thin-provisioning-tools
    /// 0.9.0), from metadata made with thin_restore; blocks are 128 sectors (64 KiB).
    const PLAIN: &str = r#"<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1000">
  <diff left="1" right="2">
    <same begin="0" length="2"/>
    <different begin="2" length="1"/>
    <same begin="3" length="1"/>
    <right_only begin="64" length="1"/>
  </diff>
</superblock>
"#;

    /// The same with `--verbose`.
    const VERBOSE: &str = r#"<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1000">
  <diff left="1" right="2">
    <same>
      <range begin="0" data_begin="0" length="2"/>
    </same>
    <different>
      <range begin="2" left_data_begin="2" right_data_begin="10" length="1"/>
    </different>
    <same>
      <range begin="3" data_begin="3" length="1"/>
    </same>
    <right_only>
      <range begin="64" data_begin="11" length="1"/>
    </right_only>
  </diff>
</superblock>
"#;

    #[test]
    fn thin_delta_xml_marks_the_leaves_of_changed_blocks_in_both_forms() {
        for xml in [PLAIN, VERBOSE] {
            let c = parse(xml, 64 * MIB).unwrap();
            // Block 2 is at 128 KiB (leaf 0), block 64 at 4 MiB (leaf 2).
            assert_eq!(marked(&c), vec![0, 2]);
            assert_eq!(c.bytes, 2 * 64 * 1024);
            assert_eq!(c.thin_ids, Some((1, 2)));
            assert_eq!(c.block_bytes, Some(64 * 1024));
        }
    }

    #[test]
    fn a_range_is_widened_to_whole_leaves_and_clipped_at_the_end() {
        let c = parse("# changed\n2097151 2\n\n0x600000 1 # one byte\n10485760 99999999\n", 12 * MIB).unwrap();
        assert_eq!(marked(&c), vec![0, 1, 3, 5]);
        assert_eq!(c.bytes, 2 + 1 + 2 * MIB);
        // In 16 KiB pieces: the last of leaf 0, the first of leaf 1, one of leaf 3, all of leaf 5.
        let l = layout(12 * MIB);
        assert_eq!(c.runs(&l, 0), vec![(2 * MIB - 16384, 16384)]);
        assert_eq!(c.runs(&l, 1), vec![(2 * MIB, 16384)]);
        assert_eq!(c.runs(&l, 2), vec![]);
        assert_eq!(c.runs(&l, 3), vec![(6 * MIB, 16384)]);
        assert_eq!(c.runs(&l, 5), vec![(10 * MIB, 2 * MIB)]);
        assert_eq!(c.thin_ids, None);
    }

    #[test]
    fn a_malformed_ranges_file_is_refused_with_its_line() {
        for (text, line, why) in [
            ("0 10\n5\n", 2, "is not OFFSET LENGTH"),
            ("0 10 20\n", 1, "is not OFFSET LENGTH"),
            ("-1 10\n", 1, "is not OFFSET LENGTH"),
            ("0 0\n", 1, "length 0"),
            ("1 18446744073709551615\n", 1, "overflows"),
            ("0 1\n\n67108864 1\n", 3, "past the end of the device"),
            ("0x 1\n", 1, "is not OFFSET LENGTH"),
        ] {
            let e = parse(text, 64 * MIB).unwrap_err();
            assert_eq!(e.what, format!("ranges: line {line}"), "{text:?}");
            assert!(e.why.contains(why), "{text:?}: {e}");
        }
        assert!(parse("  \n ", MIB).unwrap_err().to_string().contains("is empty"));
        assert!(read(&b"0 1\n\xff\xfe 2\n"[..], "r", &layout(MIB)).unwrap_err().to_string().contains("not text"));
    }

    #[test]
    fn malformed_truncated_or_hostile_xml_is_refused() {
        let cut = &PLAIN[..PLAIN.find("<same begin=\"3\"").unwrap()];
        let cases: Vec<(String, &str)> = vec![
            (cut.to_string(), "cut short"),
            (PLAIN.replace("data_block_size=\"128\"", ""), "has no data_block_size"),
            (PLAIN.replace("\"128\"", "\"0\""), "not a thin pool block size"),
            (PLAIN.replace("length=\"1\"/>\n    <same", "length=\"x1\"/>\n    <same"), "not a number"),
            (PLAIN.replace("<same begin=\"3\"", "<evil begin=\"3\""), "unexpected element <evil>"),
            (format!("<!DOCTYPE lol [<!ENTITY a \"aaaaaaaa\"><!ENTITY b \"&a;&a;&a;\">]>\n{PLAIN}"), "DOCTYPE"),
            (PLAIN.replace("<same begin=\"0\" length=\"2\"/>", "&b;"), "entity reference"),
            (PLAIN.replace("begin=\"64\"", "begin=\"4096\""), "past the end of the device"),
            (PLAIN.replace("begin=\"64\"", "begin=\"18446744073709551615\""), "overflow"),
            (PLAIN.replace("<diff left=\"1\" right=\"2\">", "<diff left=\"1\">"), "has no right"),
            (format!("{PLAIN}<superblock data_block_size=\"128\">"), "unexpected element <superblock>"),
            (PLAIN.replace("</diff>", "</diff>\n  <diff left=\"1\" right=\"2\"></diff>"), "unexpected element <diff>"),
            ("<superblock data_block_size=\"128\"></superblock>".into(), "unexpected </superblock>"),
            (PLAIN.replace("</superblock>", "</superblock>\ntrailing"), "unexpected text"),
        ];
        for (xml, why) in cases {
            let e = parse(&xml, 64 * MIB).unwrap_err();
            assert!(e.what.starts_with("ranges: byte "), "{xml}: {e}");
            assert!(e.to_string().contains(why), "{why:?} not in {e} for\n{xml}");
        }
    }
}
