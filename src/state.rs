//! The `.basyn-state` file: a device's Merkle-tree leaves (and chunk digests), the
//! parameters they were built with, the device's identity and freshness stamp, and a
//! checksum of the whole file. See `docs/state-format.md`.
//!
//! ```text
//! offset      size   field
//! 0           8      magic "BASYNSTA"
//! 8           4      format version, u32 little endian (3)
//! 12          4      header length H, u32 little endian (at most 64 KiB)
//! 16          H      header: postcard(Header)
//! 16+H        L*d    leaf digests (L = leaf count, d = digest length)
//! ...         ⌈P/8⌉  zero map: a bit per piece (P = piece count), set for a zero piece
//! ...         N*d    digests of the other pieces, in order (N = header's nonzero_pieces)
//! end-32      32     BLAKE3 of every byte before it
//! ```
//!
//! A state is decoded only through [`decode`], which checks the checksum first and then
//! every count against the header before trusting any of it. [`StateFile::load`] reads
//! the header first and refuses a file whose length the header does not imply before
//! reading the rest, so a corrupt file never makes basyn read or allocate without bound.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hash::{Checksum, HashAlgo};
use crate::piece_table::{self, Digests, PieceTable};
use crate::stamp::Stamp;
use crate::tree::Layout;

/// File magic.
pub const MAGIC: [u8; 8] = *b"BASYNSTA";
/// Format version written and accepted.
pub const FORMAT_VERSION: u32 = 3;
const MAX_HEADER: usize = 64 << 10;
const PREFIX_LEN: usize = 16;
const CHECKSUM_LEN: usize = 32;
/// Piece digests read into memory when a state is loaded, at most: those of a small
/// device. A larger state's stay in its file, read a leaf at a time when a leaf differs,
/// so that loading costs a pass over the file and no allocation per leaf (an unchanged
/// run never needs them), and memory stays flat whatever the device's size.
pub const HOLD_PIECES: u64 = 64 << 10;

/// Largest state file read: the digests of 8 TiB of data at 16 KiB pieces, and a header.
pub const MAX_STATE: u64 = (16 << 30) + (MAX_HEADER + PREFIX_LEN + CHECKSUM_LEN) as u64;

/// The header, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    layout: Layout,
    device_path: String,
    stamp: Stamp,
    valid_leaves: u64,
    nonzero_pieces: u64,
    writer: String,
}

/// A decoded state.
#[derive(Debug, PartialEq, Eq)]
pub struct State {
    /// Parameters.
    pub layout: Layout,
    /// The device path it was made for (informational).
    pub device_path: String,
    /// The device's stamp when the leaves were last confirmed.
    pub stamp: Stamp,
    /// Leaves `0..valid_leaves` are confirmed; the rest are unknown (a checkpoint).
    pub valid_leaves: u64,
    /// Leaf digests, concatenated.
    pub leaves: Vec<u8>,
    /// The piece digests of the confirmed leaves.
    pub pieces: PieceTable,
}

/// Why the bytes of a state file are not a valid state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than the fixed prefix and checksum.
    #[error("too short ({len} bytes)")]
    TooShort {
        /// Bytes found.
        len: u64,
    },
    /// Longer than any state basyn writes.
    #[error("{len} bytes, more than the largest state ({max} bytes)")]
    TooLarge {
        /// Bytes found.
        len: u64,
        /// [`MAX_STATE`].
        max: u64,
    },
    /// Not a state file at all.
    #[error("not a basyn state file (bad magic)")]
    BadMagic,
    /// Another format version.
    #[error("format version {found}, this basyn reads {supported}")]
    Version {
        /// The file's version.
        found: u32,
        /// [`FORMAT_VERSION`].
        supported: u32,
    },
    /// The checksum does not match the content.
    #[error("checksum mismatch (truncated or corrupted)")]
    Checksum,
    /// The header length field points outside the file or past [`MAX_HEADER`].
    #[error("header length {len} is out of bounds")]
    HeaderLength {
        /// Declared header length.
        len: usize,
    },
    /// The header does not decode.
    #[error("undecodable header: {0}")]
    Header(#[source] postcard::Error),
    /// The header has bytes after its end.
    #[error("{0} trailing bytes in the header")]
    TrailingHeader(usize),
    /// Tree parameters no basyn writes.
    #[error("invalid parameters: buffer {buffer}, chunk {chunk:?}, fanout {fanout}")]
    Parameters {
        /// Leaf size.
        buffer: u64,
        /// Chunk size.
        chunk: Option<u64>,
        /// Fan-out.
        fanout: u32,
    },
    /// The digest tables the header implies do not fit in 64 bits.
    #[error("the header implies more digests than can be counted")]
    Overflow,
    /// The file's length is not the one the header implies.
    #[error("{found} bytes of digests, the header implies {expected}")]
    DigestBytes {
        /// Bytes of digests present.
        found: u64,
        /// Bytes the header implies.
        expected: u64,
    },
    /// The file is not as long as its header implies.
    #[error("{len} bytes, its header implies {expected} (truncated or corrupted)")]
    Length {
        /// Bytes in the file.
        len: u64,
        /// Bytes the header implies.
        expected: u64,
    },
    /// The zero map does not count as many data pieces as the header says.
    #[error("the zero map does not fit the piece digests")]
    ZeroMap,
    /// More confirmed leaves than leaves.
    #[error("{valid} valid leaves of {leaves}")]
    ValidLeaves {
        /// Confirmed leaves claimed.
        valid: u64,
        /// Leaves in the tree.
        leaves: u64,
    },
}

/// Why a state file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Reading, writing or locking failed.
    #[error("state file {path}: {}", crate::device::describe_io(source))]
    Io {
        /// The state file.
        path: String,
        /// Cause.
        source: io::Error,
    },
    /// Another basyn holds the device.
    #[error("{0} is in use by another basyn (its lock is held)")]
    Locked(String),
    /// The bytes are not a valid state.
    #[error("state file {path} is not usable: {source}")]
    Invalid {
        /// The state file.
        path: String,
        /// What is wrong.
        source: DecodeError,
    },
    /// The path may not be used for a state: it would replace something that is not one.
    #[error("state file {path}: {why}")]
    Refused {
        /// The path.
        path: String,
        /// Why.
        why: &'static str,
    },
    /// The device has too many leaves for the digest tables of one run.
    #[error(
        "{device}: {leaves} blocks of {buffer} bytes would need {mib} MiB of digests in memory; use a larger --buffer (or --chunk)"
    )]
    TooManyLeaves {
        /// The device.
        device: String,
        /// Its leaf count.
        leaves: u64,
        /// Leaf size.
        buffer: u64,
        /// Memory the tables would take.
        mib: u64,
    },
}

/// Encodes a state (checksum included).
pub fn encode(state: &State) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec fails only if a digest kept in a file cannot be read back.
    let _ = write(state, &mut out);
    out
}

/// Writes a state to `out`, streaming: the piece digests are never gathered in memory.
fn write(state: &State, out: &mut dyn Write) -> io::Result<()> {
    let header = Header {
        layout: state.layout,
        device_path: state.device_path.clone(),
        stamp: state.stamp.clone(),
        valid_leaves: state.valid_leaves,
        nonzero_pieces: state.pieces.nonzero_pieces(state.valid_leaves),
        writer: format!("basyn {}", env!("CARGO_PKG_VERSION")),
    };
    let head = postcard::to_stdvec(&header).map_err(io::Error::other)?;
    let mut out = Summed { inner: out, sum: Checksum::default() };
    out.write_all(&MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes())?;
    out.write_all(&(head.len() as u32).to_le_bytes())?;
    out.write_all(&head)?;
    out.write_all(&state.leaves)?;
    out.write_all(&state.pieces.zero_map(state.valid_leaves))?;
    state.pieces.write_digests(state.valid_leaves, &mut out)?;
    let sum = out.sum.finish();
    out.inner.write_all(sum.as_bytes())
}

/// A writer that checksums what passes through it.
struct Summed<'a> {
    inner: &'a mut dyn Write,
    sum: Checksum,
}

impl Write for Summed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// At least `min` bytes, the magic, and this format version.
fn check_prefix(bytes: &[u8], min: usize) -> Result<(), DecodeError> {
    if bytes.len() < min {
        return Err(DecodeError::TooShort { len: bytes.len() as u64 });
    }
    if bytes[..8] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(DecodeError::Version { found: version, supported: FORMAT_VERSION });
    }
    Ok(())
}

/// The tree parameters and the header, from the prefix and header bytes alone.
fn decode_header(bytes: &[u8]) -> Result<(Header, usize), DecodeError> {
    check_prefix(bytes, PREFIX_LEN)?;
    let head_len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
    if head_len > MAX_HEADER || PREFIX_LEN + head_len > bytes.len() {
        return Err(DecodeError::HeaderLength { len: head_len });
    }
    let (header, rest) =
        postcard::take_from_bytes::<Header>(&bytes[PREFIX_LEN..PREFIX_LEN + head_len]).map_err(DecodeError::Header)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingHeader(rest.len()));
    }
    let l = header.layout;
    if l.buffer == 0 || l.chunk == Some(0) || l.fanout < 2 || l.chunk.is_some_and(|c| c > l.buffer) {
        return Err(DecodeError::Parameters { buffer: l.buffer, chunk: l.chunk, fanout: l.fanout });
    }
    Ok((header, head_len))
}

/// Bytes of leaf digests, of the zero map and of piece digests a header implies.
fn section_bytes(h: &Header) -> Result<(u64, u64, u64), DecodeError> {
    let l = &h.layout;
    let dl = l.hash.digest_len() as u64;
    let leaves = l.leaf_count().checked_mul(dl).ok_or(DecodeError::Overflow)?;
    let map = l.piece_count().div_ceil(8);
    let pieces = h.nonzero_pieces.checked_mul(dl).ok_or(DecodeError::Overflow)?;
    Ok((leaves, map, pieces))
}

/// The file length the prefix and header in `head` imply.
fn implied_len(head: &[u8]) -> Result<u64, DecodeError> {
    let (header, head_len) = decode_header(head)?;
    let (leaves, map, pieces) = section_bytes(&header)?;
    leaves
        .checked_add(map)
        .and_then(|d| d.checked_add(pieces))
        .and_then(|d| d.checked_add((PREFIX_LEN + head_len + CHECKSUM_LEN) as u64))
        .ok_or(DecodeError::Overflow)
}

/// Decodes and verifies a state; any inconsistency is an error, never a panic.
pub fn decode(bytes: &[u8]) -> Result<State, DecodeError> {
    check_prefix(bytes, PREFIX_LEN + CHECKSUM_LEN)?;
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if HashAlgo::Blake3.digest(body).as_bytes() != sum {
        return Err(DecodeError::Checksum);
    }
    let (header, head_len) = decode_header(body)?;
    let (leaves_len, map_len, pieces_len) = section_bytes(&header)?;
    let data = &body[PREFIX_LEN + head_len..];
    let expected =
        leaves_len.checked_add(map_len).and_then(|n| n.checked_add(pieces_len)).ok_or(DecodeError::Overflow)?;
    if expected != data.len() as u64 {
        return Err(DecodeError::DigestBytes { found: data.len() as u64, expected });
    }
    let (leaves, rest) = data.split_at(leaves_len as usize);
    let (map, pieces) = rest.split_at(map_len as usize);
    assemble(header, leaves.to_vec(), map, Digests::Bytes(pieces))
}

/// A state from its checked header and sections.
fn assemble(header: Header, leaves: Vec<u8>, map: &[u8], pieces: Digests<'_>) -> Result<State, DecodeError> {
    let l = header.layout;
    if header.valid_leaves > l.leaf_count() {
        return Err(DecodeError::ValidLeaves { valid: header.valid_leaves, leaves: l.leaf_count() });
    }
    let pieces = PieceTable::decode(l, header.valid_leaves, map, pieces).ok_or(DecodeError::ZeroMap)?;
    Ok(State {
        layout: l,
        device_path: header.device_path,
        stamp: header.stamp,
        valid_leaves: header.valid_leaves,
        leaves,
        pieces,
    })
}

/// Reads exactly `len` bytes into a new buffer, checksumming them.
fn read_section(file: &mut File, len: u64, sum: &mut Checksum) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf)?;
    sum.update(&buf);
    Ok(buf)
}

/// Checksums `len` bytes of `file` without keeping them.
fn skim(file: &mut File, len: u64, sum: &mut Checksum) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..n])?;
        sum.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

/// Where a device's state lives unless `--state` says otherwise: in the state directory
/// ([`state_dir`]), named after the device's canonical path with `/` made `_`
/// (`/dev/vg0/root` → `dev_vg0_root.basyn-state`, `/srv/vm/disk.img` →
/// `srv_vm_disk.img.basyn-state`), never beside an image, where it would be backed up
/// with it or shown as a volume by libvirt and Proxmox directory pools. The stamp inside
/// binds it to the device's identity, so another file at the same path never uses it.
pub fn default_path(device: &Path) -> PathBuf {
    default_path_in(None, device)
}

/// [`default_path`], in `dir` instead of the state directory.
pub fn default_path_in(dir: Option<&Path>, device: &Path) -> PathBuf {
    let canonical = fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let flat: String =
        canonical.to_string_lossy().trim_start_matches('/').chars().map(|c| if c == '/' { '_' } else { c }).collect();
    dir.map_or_else(state_dir, Path::to_path_buf).join(format!("{flat}.basyn-state"))
}

/// Where earlier versions of basyn kept a regular file's default state: beside it.
pub fn legacy_path(device: &Path) -> PathBuf {
    let mut name = fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf()).into_os_string();
    name.push(".basyn-state");
    PathBuf::from(name)
}

/// The default state of a regular file, `path`, had none, but one is beside it where
/// older versions kept it: it is moved into the state directory and used (a dry run,
/// `read_only`, reads it where it is instead). Returns the path to use and what was done.
pub fn adopt_legacy(device: &Path, path: &Path, read_only: bool) -> (PathBuf, Option<String>) {
    let legacy = legacy_path(device);
    if fs::symlink_metadata(path).is_ok() || check_path(&legacy).is_err() || !legacy.is_file() {
        return (path.to_path_buf(), None);
    }
    if read_only {
        return (legacy, None);
    }
    let moved = path.parent().map_or(Ok(()), make_state_dir).and_then(|()| fs::rename(&legacy, path));
    let note = match moved {
        Ok(()) => {
            format!("state {} moved from {} (states now live in the state directory)", path.display(), legacy.display())
        }
        Err(e) => format!(
            "state {} beside the device could not be moved to {} ({e}); it is left there unused",
            legacy.display(),
            path.display()
        ),
    };
    (path.to_path_buf(), Some(note))
}

/// Makes the state directory (and its missing parents) readable by its owner only:
/// digests tell what a device holds. A directory already there keeps its mode.
fn make_state_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// The variable that names the state directory instead of the default one.
pub const STATE_DIR_ENV: &str = "BASYN_STATE_DIR";

/// The directory of default states: `$BASYN_STATE_DIR` if set, else `/var/lib/basyn`
/// for root, else `$XDG_STATE_HOME/basyn` (`~/.local/state/basyn`).
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(STATE_DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/basyn");
    }
    match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("basyn"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/state/basyn"),
    }
}

/// Refuses a path that a state (or bitmap) saved there would wrongly replace: a
/// symbolic link, something that is not a regular file, or a file that exists and is
/// not a basyn state. A missing path, or an existing state, is fine.
pub fn check_path(path: &Path) -> Result<(), StateError> {
    let refuse = |why| Err(StateError::Refused { path: path.display().to_string(), why });
    check_kind(path)?;
    match fs::symlink_metadata(path) {
        Ok(_) => {
            let mut head = [0u8; 8];
            let magic = File::open(path).and_then(|mut f| f.read_exact(&mut head));
            if magic.is_err() || head != MAGIC {
                return refuse("exists and is not a basyn state file; refusing to replace it");
            }
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// Refuses a path that is a symbolic link or exists and is not a regular file.
pub fn check_kind(path: &Path) -> Result<(), StateError> {
    let refuse = |why| Err(StateError::Refused { path: path.display().to_string(), why });
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => refuse("is a symbolic link; refusing to replace it"),
        Ok(m) if !m.is_file() => refuse("is not a regular file; refusing to replace it"),
        _ => Ok(()),
    }
}

/// A state file. The caller holds the device's lock while using it, since the state
/// file itself is replaced by each atomic save.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// Names the state file at `path`, creating its directory if `create_dir`.
    pub fn at(path: &Path, create_dir: bool) -> Result<StateFile, StateError> {
        if create_dir && let Some(dir) = path.parent() {
            make_state_dir(dir).map_err(|source| StateError::Io { path: path.display().to_string(), source })?;
        }
        Ok(StateFile { path: path.to_path_buf() })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads and verifies the state; `Ok(None)` if there is none yet. The header is
    /// read and checked first: a file longer than the header implies (or than
    /// [`MAX_STATE`]) is refused before the rest is read. The file is read once, in
    /// order, and checksummed as it goes; piece digests past [`HOLD_PIECES`] bytes stay in
    /// the file, which is kept open, and a leaf's are read when they are asked for.
    pub fn load(&self) -> Result<Option<State>, StateError> {
        self.load_within(HOLD_PIECES.min(piece_table::budget() as u64))
    }

    /// [`StateFile::load`], keeping at most `budget` bytes of piece digests in memory.
    fn load_within(&self, budget: u64) -> Result<Option<State>, StateError> {
        let shown = || self.path.display().to_string();
        let io_err = |source| StateError::Io { path: shown(), source };
        let invalid = |source| StateError::Invalid { path: shown(), source };
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_err(source)),
        };
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            let source = io::Error::other("is not a regular file");
            return Err(io_err(source));
        }
        let len = meta.len();
        if len > MAX_STATE {
            return Err(invalid(DecodeError::TooLarge { len, max: MAX_STATE }));
        }
        let mut head = Vec::new();
        (&mut file).take((PREFIX_LEN + MAX_HEADER) as u64).read_to_end(&mut head).map_err(io_err)?;
        if head.len() < PREFIX_LEN + CHECKSUM_LEN {
            return decode(&head).map(Some).map_err(invalid);
        }
        // The version and the header first: nothing more is read for a file that cannot
        // be a state of the length it has.
        let expected = implied_len(&head).map_err(invalid)?;
        if expected != len {
            return Err(invalid(DecodeError::Length { len, expected }));
        }
        let pieces_len = decode_header(&head).and_then(|(h, _)| section_bytes(&h)).map_err(invalid)?.2;
        if pieces_len <= budget {
            file.read_to_end(&mut head).map_err(io_err)?;
            return decode(&head).map(Some).map_err(invalid);
        }
        self.load_streaming(file, &head).map(Some)
    }

    /// Loads a state too large to hold: sections read in order, piece digests left in
    /// the file, the checksum verified before anything is used.
    fn load_streaming(&self, mut file: File, head: &[u8]) -> Result<State, StateError> {
        let shown = || self.path.display().to_string();
        let io_err = |source| StateError::Io { path: shown(), source };
        let invalid = |source| StateError::Invalid { path: shown(), source };
        let (header, head_len) = decode_header(head).map_err(invalid)?;
        let (leaves_len, map_len, pieces_len) = section_bytes(&header).map_err(invalid)?;
        let start = (PREFIX_LEN + head_len) as u64;
        file.seek(io::SeekFrom::Start(0)).map_err(io_err)?;
        let mut sum = Checksum::default();
        read_section(&mut file, start, &mut sum).map_err(io_err)?;
        let leaves = read_section(&mut file, leaves_len, &mut sum).map_err(io_err)?;
        let map = read_section(&mut file, map_len, &mut sum).map_err(io_err)?;
        skim(&mut file, pieces_len, &mut sum).map_err(io_err)?;
        let mut stored = [0u8; CHECKSUM_LEN];
        file.read_exact(&mut stored).map_err(io_err)?;
        if sum.finish().as_bytes() != stored {
            return Err(invalid(DecodeError::Checksum));
        }
        let offset = start + leaves_len + map_len;
        let pieces = Digests::File { file, offset, len: pieces_len };
        assemble(header, leaves, &map, pieces).map_err(invalid)
    }

    /// Saves atomically: temp file, fsync, rename over the old one, fsync the directory.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let io_err = |source| StateError::Io { path: self.path.display().to_string(), source };
        let mut tmp = self.path.as_os_str().to_os_string();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        tmp.push(format!(".tmp{}.{nanos}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let write = || -> io::Result<()> {
            // create_new: never follow or reuse whatever already sits at that name.
            // 0600: digests tell what a device holds (`security.md`).
            let f = std::os::unix::fs::OpenOptionsExt::mode(
                std::fs::OpenOptions::new().write(true).create_new(true),
                0o600,
            )
            .open(&tmp)?;
            let mut out = io::BufWriter::with_capacity(1 << 20, f);
            write(state, &mut out)?;
            let f = out.into_inner().map_err(io::IntoInnerError::into_error)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(e)
        })
    }

    /// Removes the state (used when it can no longer be trusted and cannot be replaced).
    pub fn remove(&self) -> Result<(), StateError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path: self.path.display().to_string(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stamp::FileStamp;
    use proptest::prelude::*;

    pub(crate) fn sample() -> State {
        let layout = Layout { hash: HashAlgo::Blake3, buffer: 4096, chunk: Some(1024), fanout: 4, device_size: 10000 };
        let leaves: Vec<u8> = (0..3).flat_map(|i| HashAlgo::Blake3.digest(&[i]).as_bytes().to_vec()).collect();
        // Leaf 0 all zeros, leaf 1 with a zero piece among data, leaf 2 (short) data.
        let mut pieces = PieceTable::new(layout);
        pieces.set_zero(0);
        let zero = HashAlgo::Blake3.zero_digest(1024);
        let digest = |i: u8| HashAlgo::Blake3.digest(&[i, 1]);
        pieces.set(1, &[digest(4), zero, digest(6), digest(7)]);
        pieces.set(2, &[digest(8), digest(9)]);
        State {
            layout,
            device_path: "/tmp/disk.img".into(),
            stamp: Stamp::File(FileStamp { dev: 1, ino: 2, size: 10000, mtime: (3, 4), ctime: (5, 6) }),
            valid_leaves: 3,
            leaves,
            pieces,
        }
    }

    #[test]
    fn zero_pieces_take_a_bit_and_zero_leaves_no_digest() {
        let s = sample();
        let bytes = encode(&s);
        // Prefix, header, 3 leaf digests, 2 bytes of zero map, 5 piece digests, checksum.
        let header = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), 16 + header + 3 * 32 + 2 + 5 * 32 + 32);
    }

    #[test]
    fn a_state_of_the_previous_format_is_named_as_such() {
        let mut bytes = encode(&sample());
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = decode(&bytes).unwrap_err();
        assert!(matches!(e, DecodeError::Version { found: 2, supported: 3 }), "{e}");
        assert_eq!(e.to_string(), "format version 2, this basyn reads 3");
    }

    #[test]
    fn layout_arithmetic() {
        let l = sample().layout;
        assert_eq!(l.leaf_count(), 3);
        assert_eq!(l.pieces_of(2), 2); // 10000 - 8192 = 1808 bytes: 2 pieces of 1 KiB
        assert_eq!(l.piece_count(), 10);
    }

    #[test]
    fn round_trip_and_golden_fixture() {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(decode(&bytes).unwrap(), s);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/state/sample-v3.basyn-state");
        if std::env::var_os("BASYN_BLESS").is_some() {
            fs::write(path, &bytes).unwrap();
        }
        let golden = fs::read(path).expect("fixtures/state/sample-v3.basyn-state (BASYN_BLESS=1 writes it)");
        assert_eq!(decode(&golden).unwrap(), s, "the golden state no longer decodes to the sample");
        assert_eq!(bytes, golden, "the state encoding changed; bump FORMAT_VERSION instead");
    }

    #[test]
    fn saving_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.basyn-state");
        let f = StateFile::at(&p, false).unwrap();
        assert!(f.load().unwrap().is_none());
        f.save(&sample()).unwrap();
        assert_eq!(f.load().unwrap(), Some(sample()));
        f.save(&sample()).unwrap();
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_state_too_large_for_memory_is_verified_streaming_and_its_digests_read_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.basyn-state");
        let f = StateFile::at(&p, false).unwrap();
        f.save(&sample()).unwrap();
        let loaded = f.load_within(0).unwrap().unwrap();
        assert_eq!(loaded, sample());
        // Replaced under it (as a checkpoint does), the loaded state still reads its own file.
        f.save(&State { valid_leaves: 1, ..sample() }).unwrap();
        assert_eq!(loaded.pieces, sample().pieces);
        assert_eq!(encode(&loaded), encode(&sample()));
        // A flipped digest byte is caught by the checksum before anything is used.
        let mut bytes = fs::read(&p).unwrap();
        let at = bytes.len() - CHECKSUM_LEN - 1;
        bytes[at] ^= 1;
        fs::write(&p, &bytes).unwrap();
        match f.load_within(0) {
            Err(StateError::Invalid { source: DecodeError::Checksum, .. }) => {}
            other => panic!("expected a checksum error, got {other:?}"),
        }
    }

    #[test]
    fn a_file_not_as_long_as_its_header_implies_is_refused_before_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.basyn-state");
        let f = StateFile::at(&p, false).unwrap();
        f.save(&sample()).unwrap();
        let good = fs::read(&p).unwrap().len() as u64;
        fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(&vec![0u8; 1 << 20]).unwrap();
        match f.load() {
            Err(StateError::Invalid { source: DecodeError::Length { len, expected }, .. }) => {
                assert_eq!((len, expected), (good + (1 << 20), good));
            }
            other => panic!("expected a length error, got {other:?}"),
        }
        let text = f.load().unwrap_err().to_string();
        assert!(text.contains(&format!("its header implies {good}")), "{text}");
    }

    proptest! {
        #[test]
        fn corrupted_states_are_refused_never_a_panic(pos in any::<proptest::sample::Index>(), val in 1u8..=255) {
            let mut bytes = encode(&sample());
            let i = pos.index(bytes.len());
            bytes[i] ^= val;
            prop_assert!(decode(&bytes).is_err());
        }

        #[test]
        fn truncated_states_are_refused(cut in any::<proptest::sample::Index>()) {
            let bytes = encode(&sample());
            prop_assert!(decode(&bytes[..cut.index(bytes.len())]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&bytes);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode(&with_magic);
        }

        #[test]
        fn a_valid_checksum_over_garbage_is_still_refused(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            // Worst case for the parser: the checksum is right but the header is nonsense.
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            bytes.extend_from_slice(&(body.len() as u32 / 2).to_le_bytes());
            bytes.extend_from_slice(&body);
            let sum = HashAlgo::Blake3.digest(&bytes);
            bytes.extend_from_slice(sum.as_bytes());
            prop_assert!(decode(&bytes).is_err(), "garbage under a valid checksum decoded");
        }
    }
}
