//! The bitmap FILE of `-b/--bitmap`: the digest of each whole `--buffer` block that the
//! receiver holds, in the current original's format or in basyn's own. Both formats
//! have one layout (`docs/bitmap-format.md`); all integers little endian:
//!
//! ```text
//! offset  size   field
//! 0       8      magic, u64: 239840023593485091 (the original's) or "BASYNBMP" (basyn's)
//! 8       8      device size in bytes, u64
//! 16      8      buffer (block) size in bytes, u64
//! 24      1      hash id, u8: sha1 0, sha224 1, sha256 2, sha384 3, sha512 4, blake2b 5,
//!                blake2s 6, md5 7; basyn's format adds blake3 8
//! 25      n*d    the plain digest of each block in order (n = ceil(size / buffer),
//!                d = the hash's digest length); all zero bytes mean "unknown"
//! ```
//!
//! A digest is the hash of the block's bytes, nothing else (not basyn's leaf rule), so a
//! FILE the original wrote is read here and the reverse. There is no checksum: the
//! original has none. A FILE is refused unless its magic, hash id, sizes and length all
//! fit. Digests are updated in place, so that a block can be marked unknown before the
//! receiver's copy of it changes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::hash::HashAlgo;

/// The original's magic number.
pub const ORIGINAL_MAGIC: u64 = 239_840_023_593_485_091;
/// basyn's own magic: the bytes `BASYNBMP`.
pub const BASYN_MAGIC: u64 = u64::from_le_bytes(*b"BASYNBMP");
/// Bytes before the first digest.
pub const HEADER_LEN: u64 = 25;
/// Largest digest table read into memory (as for a state's leaves: 32 TiB of device at
/// 2 MiB blocks with BLAKE3).
pub const MAX_TABLE: u64 = 512 << 20;

/// The hashes the original knows, in the order of their ids: every one basyn lists
/// after its own BLAKE3 (`HashAlgo::ALL` keeps the original's order for them).
fn original_hashes() -> &'static [HashAlgo] {
    &HashAlgo::ALL[1..]
}

/// Which of the two formats a FILE is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The current original's: its magic, its eight hashes.
    Original,
    /// basyn's own: its magic, the original's ids plus BLAKE3.
    Basyn,
}

impl Format {
    /// The format a new FILE gets: the original's when it knows the hash, so that the
    /// original can use the FILE too; basyn's otherwise.
    pub fn for_hash(hash: HashAlgo) -> Format {
        if original_hashes().contains(&hash) { Format::Original } else { Format::Basyn }
    }

    /// The magic number.
    pub fn magic(self) -> u64 {
        match self {
            Format::Original => ORIGINAL_MAGIC,
            Format::Basyn => BASYN_MAGIC,
        }
    }

    fn from_magic(magic: u64) -> Option<Format> {
        [Format::Original, Format::Basyn].into_iter().find(|f| f.magic() == magic)
    }

    /// The id this format gives `hash`, if it can hold it.
    pub fn hash_id(self, hash: HashAlgo) -> Option<u8> {
        if let Some(i) = original_hashes().iter().position(|h| *h == hash) {
            return Some(i as u8);
        }
        (self == Format::Basyn && hash == HashAlgo::Blake3).then_some(original_hashes().len() as u8)
    }

    /// The hash that `id` names in this format.
    pub fn hash(self, id: u8) -> Option<HashAlgo> {
        match original_hashes().get(usize::from(id)) {
            Some(h) => Some(*h),
            None if self == Format::Basyn && usize::from(id) == original_hashes().len() => Some(HashAlgo::Blake3),
            None => None,
        }
    }
}

/// What a FILE describes: the device size, the block size and the hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes of the device (the source's length).
    pub device_size: u64,
    /// Block (`--buffer`) size in bytes.
    pub buffer: u64,
    /// Digest algorithm.
    pub hash: HashAlgo,
}

impl Geometry {
    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.device_size.div_ceil(self.buffer.max(1))
    }

    /// Bytes of the digest table.
    pub fn table_len(&self) -> u64 {
        self.blocks().saturating_mul(self.hash.digest_len() as u64)
    }

    /// The header of a FILE in `format`; `None` if the format cannot hold the hash.
    pub fn header(&self, format: Format) -> Option<[u8; HEADER_LEN as usize]> {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(&format.magic().to_le_bytes());
        h[8..16].copy_from_slice(&self.device_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.buffer.to_le_bytes());
        h[24] = format.hash_id(self.hash)?;
        Some(h)
    }
}

/// Why a FILE cannot be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum Problem {
    /// It has no bytes.
    Empty,
    /// Shorter than the header.
    ShortHeader(u64),
    /// Neither magic.
    Magic(u64),
    /// An id its format does not know.
    UnknownHash(u8),
    /// A block size of zero.
    ZeroBuffer,
    /// Built for another device size.
    DeviceSize {
        /// The FILE's.
        file: u64,
        /// The run's.
        run: u64,
        /// The source, with its side.
        source: String,
    },
    /// Built for another `--buffer`.
    Buffer {
        /// The FILE's, in bytes.
        file: u64,
        /// The run's, in bytes.
        run: u64,
    },
    /// Built with another `--hash`.
    Hash {
        /// The FILE's.
        file: HashAlgo,
        /// The run's.
        run: HashAlgo,
    },
    /// The length does not match the header.
    Length {
        /// Bytes found.
        len: u64,
        /// Bytes the header implies.
        expected: u64,
    },
    /// The digests would not fit in memory.
    TooLarge(u64),
    /// A symbolic link or not a regular file: never replaced.
    Kind(&'static str),
    /// The hash cannot be stored in the FILE's format.
    Unrepresentable(HashAlgo),
    /// Reading or writing failed.
    Io(&'static str, io::Error),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Empty => f.write_str("is empty, not a bitmap file"),
            Problem::ShortHeader(len) => write!(f, "is {len} bytes, shorter than a bitmap header ({HEADER_LEN})"),
            Problem::Magic(m) => write!(f, "is not a bitmap file (magic {m:#018x})"),
            Problem::UnknownHash(id) => write!(f, "names an unknown hash function (id {id})"),
            Problem::ZeroBuffer => f.write_str("has a buffer size of 0"),
            Problem::DeviceSize { file, run, source } => {
                write!(f, "device size mismatch: it was built for {file} bytes, {source} has {run} bytes")
            }
            Problem::Buffer { file, run } => write!(
                f,
                "buffer size mismatch: it was built with --buffer {} ({file} bytes), this run uses --buffer {} ({run} bytes)",
                file / 1024,
                run / 1024
            ),
            Problem::Hash { file, run } => {
                write!(f, "hash function mismatch: it was built with --hash {file}, this run uses --hash {run}")
            }
            Problem::Length { len, expected } => {
                write!(f, "is {len} bytes where its header implies {expected} (truncated or garbage)")
            }
            Problem::TooLarge(n) => write!(f, "would hold {n} bytes of digests, more than {MAX_TABLE}"),
            Problem::Kind(what) => write!(f, "is {what}; refusing to replace it"),
            Problem::Unrepresentable(h) => write!(f, "is in a format that cannot hold {h} digests"),
            Problem::Io(doing, e) => write!(f, "cannot {doing}: {}", crate::device::describe_io(e)),
        }
    }
}

/// A FILE that cannot be used, naming it.
#[derive(Debug, thiserror::Error)]
#[error("bitmap {path}: {problem}")]
pub struct BitmapFileError {
    /// The FILE, as the user gave it.
    pub path: String,
    /// What is wrong.
    pub problem: Problem,
}

impl BitmapFileError {
    /// True if the FILE's content is what is wrong (garbage, or built for another
    /// run): `--reset-bitmap` starts it from scratch.
    pub fn is_content(&self) -> bool {
        !matches!(self.problem, Problem::Kind(_) | Problem::Io(..) | Problem::Unrepresentable(_))
    }
}

/// An open FILE whose geometry is the run's; written in place.
#[derive(Debug)]
pub struct BitmapFile {
    path: PathBuf,
    file: File,
    format: Format,
    geometry: Geometry,
}

/// Refuses a symbolic link, or something that exists and is not a regular file: a FILE
/// is only ever written over nothing or over a regular file.
pub fn check_kind(path: &Path) -> Result<(), BitmapFileError> {
    let problem = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Problem::Kind("a symbolic link"),
        Ok(m) if !m.is_file() => Problem::Kind("not a regular file"),
        _ => return Ok(()),
    };
    Err(error(path, problem))
}

fn error(path: &Path, problem: Problem) -> BitmapFileError {
    BitmapFileError { path: path.display().to_string(), problem }
}

/// The format of the FILE at `path`, if it starts with either magic.
pub fn format_of(path: &Path) -> Option<Format> {
    let mut magic = [0u8; 8];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).ok()?;
    Format::from_magic(u64::from_le_bytes(magic))
}

/// Opens the FILE at `path` for reading and writing and checks it against `want`, as
/// the original does: `Ok(None)` if there is none. `source` names the source in a
/// device size mismatch. Returns the FILE and its digests.
pub fn load(path: &Path, want: &Geometry, source: &str) -> Result<Option<(BitmapFile, Vec<u8>)>, BitmapFileError> {
    check_kind(path)?;
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(error(path, Problem::Io("open it for reading and writing", e))),
    };
    let len = file.metadata().map_err(|e| error(path, Problem::Io("stat it", e)))?.len();
    let mut head = [0u8; HEADER_LEN as usize];
    if len >= HEADER_LEN {
        file.read_exact_at(&mut head, 0).map_err(|e| error(path, Problem::Io("read it", e)))?;
    }
    let format = parse_header(len, &head, want, source).map_err(|p| error(path, p))?;
    let mut digests = vec![0u8; want.table_len() as usize];
    file.read_exact_at(&mut digests, HEADER_LEN).map_err(|e| error(path, Problem::Io("read it", e)))?;
    Ok(Some((BitmapFile { path: path.to_path_buf(), file, format, geometry: *want }, digests)))
}

/// Checks a FILE of `len` bytes starting with `head` against `want`: its structure
/// first, then what it was built for, then its length. Returns its format.
fn parse_header(len: u64, head: &[u8; HEADER_LEN as usize], want: &Geometry, source: &str) -> Result<Format, Problem> {
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(b)
    };
    match len {
        0 => return Err(Problem::Empty),
        n if n < HEADER_LEN => return Err(Problem::ShortHeader(n)),
        _ => {}
    }
    let format = Format::from_magic(u64_at(0)).ok_or(Problem::Magic(u64_at(0)))?;
    let hash = format.hash(head[24]).ok_or(Problem::UnknownHash(head[24]))?;
    let found = Geometry { device_size: u64_at(8), buffer: u64_at(16), hash };
    if found.buffer == 0 {
        return Err(Problem::ZeroBuffer);
    }
    if found.device_size != want.device_size {
        return Err(Problem::DeviceSize { file: found.device_size, run: want.device_size, source: source.into() });
    }
    if found.buffer != want.buffer {
        return Err(Problem::Buffer { file: found.buffer, run: want.buffer });
    }
    if found.hash != want.hash {
        return Err(Problem::Hash { file: found.hash, run: want.hash });
    }
    if want.table_len() > MAX_TABLE {
        return Err(Problem::TooLarge(want.table_len()));
    }
    let expected = HEADER_LEN + want.table_len();
    if len != expected {
        return Err(Problem::Length { len, expected });
    }
    Ok(format)
}

impl BitmapFile {
    /// Creates the FILE at `path`, or replaces whatever regular file is there, with
    /// every block unknown (zero digests). Atomic: a new file is written and synced,
    /// renamed over the old one, and the directory synced.
    pub fn create(path: &Path, format: Format, geometry: Geometry) -> Result<BitmapFile, BitmapFileError> {
        check_kind(path)?;
        let header = geometry.header(format).ok_or_else(|| error(path, Problem::Unrepresentable(geometry.hash)))?;
        let mut tmp = path.as_os_str().to_os_string();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        tmp.push(format!(".tmp{}.{nanos}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let write = || -> io::Result<File> {
            // create_new: never follow or reuse whatever already sits at that name.
            let f = std::os::unix::fs::OpenOptionsExt::mode(
                OpenOptions::new().read(true).write(true).create_new(true),
                0o600,
            )
            .open(&tmp)?;
            f.write_all_at(&header, 0)?;
            // The digests are zeros: a hole, as the original's new FILE reads.
            f.set_len(HEADER_LEN + geometry.table_len())?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir)?.sync_all()?;
            Ok(f)
        };
        let file = write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            error(path, Problem::Io("create it", e))
        })?;
        Ok(BitmapFile { path: path.to_path_buf(), file, format, geometry })
    }

    /// The FILE's format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The FILE's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks `blocks` unknown, durably, before the receiver's copies of them change.
    pub fn forget(&mut self, blocks: &[u64]) -> Result<(), BitmapFileError> {
        let dl = self.geometry.hash.digest_len();
        let zeros = vec![0u8; dl];
        for &b in blocks.iter().filter(|&&b| b < self.geometry.blocks()) {
            self.write_at(&zeros, HEADER_LEN + b * dl as u64)?;
        }
        self.sync()
    }

    /// Marks every block unknown, durably.
    pub fn forget_all(&mut self) -> Result<(), BitmapFileError> {
        let zeros = vec![0u8; (1usize << 20).min(self.geometry.table_len() as usize)];
        let mut at = 0;
        while at < self.geometry.table_len() {
            let n = (self.geometry.table_len() - at).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], HEADER_LEN + at)?;
            at += n as u64;
        }
        self.sync()
    }

    /// Records the digest of every block (`digests`, concatenated), durably. Each block
    /// is either the one before (equal) or unknown until its new digest is written, so
    /// an interruption part way leaves no false claim.
    pub fn record(&mut self, digests: &[u8]) -> Result<(), BitmapFileError> {
        if digests.len() as u64 != self.geometry.table_len() {
            let problem = Problem::Length { len: digests.len() as u64, expected: self.geometry.table_len() };
            return Err(error(&self.path, problem));
        }
        self.write_at(digests, HEADER_LEN)?;
        self.sync()
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> Result<(), BitmapFileError> {
        self.file.write_all_at(bytes, offset).map_err(|e| error(&self.path, Problem::Io("write it", e)))
    }

    fn sync(&self) -> Result<(), BitmapFileError> {
        self.file.sync_data().map_err(|e| error(&self.path, Problem::Io("sync it", e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(hash: HashAlgo) -> Geometry {
        Geometry { device_size: 10_000, buffer: 4096, hash }
    }

    /// A FILE built byte by byte to the original's layout.
    fn original_bytes(size: u64, buffer: u64, id: u8, digests: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&239_840_023_593_485_091u64.to_le_bytes());
        v.extend_from_slice(&size.to_le_bytes());
        v.extend_from_slice(&buffer.to_le_bytes());
        v.push(id);
        v.extend_from_slice(digests);
        v
    }

    fn load_err(path: &Path, want: &Geometry) -> BitmapFileError {
        load(path, want, "local /dev/src").expect_err("the FILE was accepted")
    }

    #[test]
    fn a_file_in_the_original_layout_is_read_and_written_back_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        let digests: Vec<u8> = (0..3 * 32).map(|i| i as u8).collect();
        std::fs::write(&p, original_bytes(10_000, 4096, 2, &digests)).unwrap();
        let want = geometry(HashAlgo::Sha256);
        let (mut f, got) = load(&p, &want, "local x").unwrap().unwrap();
        assert_eq!((f.format(), &got[..]), (Format::Original, &digests[..]));
        f.forget(&[1]).unwrap();
        let mut expect = digests.clone();
        expect[32..64].fill(0);
        assert_eq!(std::fs::read(&p).unwrap(), original_bytes(10_000, 4096, 2, &expect));
        let new: Vec<u8> = (0..3 * 32).map(|i| 255 - i as u8).collect();
        f.record(&new).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), original_bytes(10_000, 4096, 2, &new));
    }

    #[test]
    fn a_new_file_holds_unknown_digests_in_the_format_its_hash_asks_for() {
        let dir = tempfile::tempdir().unwrap();
        for hash in HashAlgo::ALL {
            let p = dir.path().join(hash.name());
            let g = geometry(hash);
            let f = BitmapFile::create(&p, Format::for_hash(hash), g).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(bytes.len() as u64, HEADER_LEN + 3 * hash.digest_len() as u64, "{hash}");
            assert!(bytes[25..].iter().all(|b| *b == 0), "{hash}");
            let expected_magic = if hash == HashAlgo::Blake3 { *b"BASYNBMP" } else { ORIGINAL_MAGIC.to_le_bytes() };
            assert_eq!(bytes[..8], expected_magic, "{hash}");
            assert_eq!(f.format(), format_of(&p).unwrap());
            assert_eq!(load(&p, &g, "x").unwrap().unwrap().1, vec![0u8; 3 * hash.digest_len()]);
        }
    }

    #[test]
    fn the_ids_are_the_originals_and_blake3_only_in_basyns_format() {
        let ids: Vec<(HashAlgo, u8)> = vec![
            (HashAlgo::Sha1, 0),
            (HashAlgo::Sha224, 1),
            (HashAlgo::Sha256, 2),
            (HashAlgo::Sha384, 3),
            (HashAlgo::Sha512, 4),
            (HashAlgo::Blake2b, 5),
            (HashAlgo::Blake2s, 6),
            (HashAlgo::Md5, 7),
        ];
        for (h, id) in ids {
            assert_eq!(Format::Original.hash_id(h), Some(id));
            assert_eq!(Format::Basyn.hash(id), Some(h));
        }
        assert_eq!(Format::Original.hash_id(HashAlgo::Blake3), None);
        assert_eq!(Format::Original.hash(8), None);
        assert_eq!(Format::Basyn.hash(8), Some(HashAlgo::Blake3));
        assert_eq!(Format::for_hash(HashAlgo::Blake3), Format::Basyn);
        assert_eq!(Format::for_hash(HashAlgo::Md5), Format::Original);
    }

    #[test]
    fn a_file_for_another_run_names_what_differs_with_the_originals_words() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        std::fs::write(&p, original_bytes(10_000, 4096, 0, &[7u8; 60])).unwrap();
        let sha1 = geometry(HashAlgo::Sha1);
        let cases = [
            (Geometry { device_size: 20_000, ..sha1 }, ["device size mismatch", "10000", "20000"]),
            (Geometry { buffer: 8192, ..sha1 }, ["buffer size mismatch", "4096", "8192"]),
            (Geometry { hash: HashAlgo::Md5, ..sha1 }, ["hash function mismatch", "SHA1", "MD5"]),
        ];
        for (want, words) in cases {
            let e = load_err(&p, &want);
            let text = e.to_string();
            assert!(e.is_content(), "{text}");
            assert!(text.starts_with(&format!("bitmap {}: ", p.display())), "{text}");
            for w in words {
                assert!(text.contains(w), "{text} lacks {w}");
            }
        }
        assert!(load_err(&p, &Geometry { device_size: 20_000, ..sha1 }).to_string().contains("local /dev/src"));
        assert_eq!(load(&p, &sha1, "x").unwrap().unwrap().1, vec![7u8; 60]);
    }

    #[test]
    fn an_empty_short_or_garbage_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        let want = geometry(HashAlgo::Sha1);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "is empty"),
            (vec![1, 2, 3], "shorter than a bitmap header"),
            (vec![0x55; 200], "is not a bitmap file"),
            (original_bytes(10_000, 4096, 9, &[0; 60]), "unknown hash function (id 9)"),
            (original_bytes(10_000, 0, 0, &[0; 60]), "buffer size of 0"),
            (original_bytes(10_000, 4096, 0, &[0; 59]), "is 84 bytes where its header implies 85"),
            (original_bytes(10_000, 4096, 0, &[0; 61]), "truncated or garbage"),
        ];
        for (bytes, words) in cases {
            std::fs::write(&p, &bytes).unwrap();
            let e = load_err(&p, &want);
            assert!(e.is_content() && e.to_string().contains(words), "{e}");
            assert_eq!(std::fs::read(&p).unwrap(), bytes, "a refused FILE was changed");
        }
        assert!(load(&dir.path().join("none"), &want, "x").unwrap().is_none());
    }

    #[test]
    fn links_and_directories_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let g = geometry(HashAlgo::Sha1);
        for p in [&link, &dir.path().to_path_buf()] {
            let e = BitmapFile::create(p, Format::Original, g).unwrap_err();
            assert!(!e.is_content() && e.to_string().contains("refusing to replace it"), "{e}");
            assert!(!load_err(p, &g).is_content());
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    }

    #[test]
    fn forgetting_everything_leaves_only_unknown_digests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        let g = Geometry { device_size: 3 << 20, buffer: 1024, hash: HashAlgo::Blake3 };
        let mut f = BitmapFile::create(&p, Format::Basyn, g).unwrap();
        f.record(&vec![9u8; g.table_len() as usize]).unwrap();
        assert!(f.record(&[1u8; 32]).is_err(), "a table of the wrong length was written");
        f.forget_all().unwrap();
        assert_eq!(load(&p, &g, "x").unwrap().unwrap().1, vec![0u8; g.table_len() as usize]);
    }
}
