//! The token store: one source's tokenized samples (its `compile::Store` and the spill
//! records it points at) saved to one file after the source is tokenized, and loaded in
//! place of reading and tokenizing it when a later build asks for the same key (Python
//! derives the key from everything that shapes the samples; `mmrecipe.store`).
//!
//! ```text
//!  entry file   header  magic "MMRSTORE" · format version u32 · body length u64 · sha256(body)
//!               body    key · seq_len, max_len · image, audio and video fingerprints ·
//!                       stats (rows, skipped, dropped too long or over max_images,
//!                       truncated, skipped examples) · meta (Python's, opaque) ·
//!                       samples (row, part, len, trained, first image and count, first
//!                       audio clip and count, first video clip and count, template,
//!                       record size) ·
//!                       image paths, path ends, grids ·
//!                       audio paths, path ends, infos (tokens, samples) ·
//!                       video paths, path ends, infos (tokens, grid, frames) ·
//!                       token records (the spill's bytes, in sample order)
//! ```
//!
//! A fingerprint is the size and modification time of every media file the samples use
//! (relative to the source's image, audio or video root): a file changed since the entry
//! was saved makes it a miss, so the source is tokenized again from the new file.
//!
//! An entry is written to a temporary file beside its name and renamed into place, so a
//! reader sees a whole entry or none, and two builds writing the same key race harmlessly
//! (same key, same bytes). On load any mismatch (magic, version, length, hash, key, a
//! table whose counts or indices disagree, a record that does not parse, a changed media
//! file) is a miss, never an error: the source is then tokenized.

use crate::audio::AudioInfo;
use crate::compile::{Compiler, SampleRec, SourceStats, Store};
use crate::error::{Error, Result};
use crate::spill::{self, Record, Spill};
use crate::video::VideoInfo;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"MMRSTORE";
/// Bumped whenever the body's layout or the meaning of what it holds changes.
pub const FORMAT_VERSION: u32 = 3;
const HEADER: usize = 8 + 4 + 8 + 32;
/// Bytes of one sample in the body.
const SAMPLE: u64 = 8 + 2 + 4 * 10;
/// Bytes of one audio info (tokens, samples) and one video info (tokens, grid, frames).
const AUDIO_INFO: u64 = 4 + 8;
const VIDEO_INFO: u64 = 4 + 12 + 4;
/// Spill reads and writes are coalesced into pieces of about this size.
const PIECE: u64 = 8 << 20;

/// What a load found: the entry's meta bytes, or why it could not be used.
pub type Loaded = std::result::Result<Vec<u8>, String>;

/// The fingerprints of a store's image, audio and video files, in that order.
pub(crate) type Fingerprints = [[u8; 32]; 3];

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io { path: path.display().to_string(), message: format!("token store: {e}") }
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.len += bytes.len() as u64;
        self.inner.write_all(bytes)
    }
    fn u32(&mut self, v: u32) -> std::io::Result<()> {
        self.put(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> std::io::Result<()> {
        self.put(&v.to_le_bytes())
    }
    fn blob(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.u64(bytes.len() as u64)?;
        self.put(bytes)
    }
    /// A path table: the concatenated paths, then each path's end.
    fn paths(&mut self, paths: &str, ends: &[u64]) -> std::io::Result<()> {
        self.blob(paths.as_bytes())?;
        self.u64(ends.len() as u64)?;
        for &end in ends {
            self.u64(end)?;
        }
        Ok(())
    }
}

/// Saves `store` (its records read back from `spill`) as the entry `path` for `key`;
/// returns the entry's size in bytes.
pub(crate) fn save(
    store: &Store,
    spill: &mut Spill,
    key: &str,
    seq_len: u32,
    prints: &Fingerprints,
    meta: &[u8],
    path: &Path,
) -> Result<u64> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    // Unique among writers: other processes (pid), other builds of this one (counter).
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp: PathBuf = path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let result = write_entry(store, spill, key, seq_len, prints, meta, &tmp).and_then(|size| {
        std::fs::rename(&tmp, path).map_err(io(path))?;
        Ok(size)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_entry(
    store: &Store,
    spill: &mut Spill,
    key: &str,
    seq_len: u32,
    prints: &Fingerprints,
    meta: &[u8],
    tmp: &Path,
) -> Result<u64> {
    let file = File::create(tmp).map_err(io(tmp))?;
    let mut w = Hashing { inner: BufWriter::with_capacity(1 << 20, file), hash: Sha256::new(), len: 0 };
    w.inner.write_all(&[0u8; HEADER]).map_err(io(tmp))?;
    let e = io(tmp);
    let st = &store.stats;
    w.blob(key.as_bytes()).map_err(&e)?;
    w.u32(seq_len).map_err(&e)?;
    w.u32(store.max_len).map_err(&e)?;
    for print in prints {
        w.put(print).map_err(&e)?;
    }
    for v in [st.rows, st.skipped, st.dropped_overlong, st.dropped_images, st.truncated] {
        w.u64(v).map_err(&e)?;
    }
    w.u64(st.skipped_examples.len() as u64).map_err(&e)?;
    for ex in &st.skipped_examples {
        w.blob(ex.as_bytes()).map_err(&e)?;
    }
    w.blob(meta).map_err(&e)?;
    w.u64(store.samples.len() as u64).map_err(&e)?;
    let mut row = Vec::with_capacity(SAMPLE as usize);
    for s in &store.samples {
        row.clear();
        row.extend_from_slice(&s.row.to_le_bytes());
        row.extend_from_slice(&s.part.to_le_bytes());
        for v in [s.len, s.trained, s.img, s.n_img, s.aud, s.n_aud, s.vid, s.n_vid, s.template as u32, s.record.bytes] {
            row.extend_from_slice(&v.to_le_bytes());
        }
        w.put(&row).map_err(&e)?;
    }
    w.paths(&store.image_paths, &store.image_path_ends).map_err(&e)?;
    w.u64(store.image_grids.len() as u64).map_err(&e)?;
    for g in &store.image_grids {
        for &v in g {
            w.u32(v).map_err(&e)?;
        }
    }
    w.paths(&store.audio_paths, &store.audio_path_ends).map_err(&e)?;
    w.u64(store.audio_infos.len() as u64).map_err(&e)?;
    for a in &store.audio_infos {
        w.u32(a.tokens).map_err(&e)?;
        w.u64(a.samples).map_err(&e)?;
    }
    w.paths(&store.video_paths, &store.video_path_ends).map_err(&e)?;
    w.u64(store.video_infos.len() as u64).map_err(&e)?;
    for v in &store.video_infos {
        for x in [v.tokens, v.grid[0], v.grid[1], v.grid[2], v.frames] {
            w.u32(x).map_err(&e)?;
        }
    }
    let tokens: u64 = store.samples.iter().map(|s| s.record.bytes as u64).sum();
    w.u64(tokens).map_err(&e)?;
    // The records in sample order, read in pieces where they lie one after another.
    let mut i = 0;
    while i < store.samples.len() {
        let (file, start) = (store.samples[i].record.file, store.samples[i].record.offset);
        let (mut end, mut j) = (start, i);
        while j < store.samples.len() && store.samples[j].record.file == file && store.samples[j].record.offset == end && end - start < PIECE {
            end += store.samples[j].record.bytes as u64;
            j += 1;
        }
        let piece = u32::try_from(end - start).map_err(|_| Error::internal("a spill piece over 4 GiB"))?;
        w.put(&spill.raw_range(file, start, piece)?).map_err(&e)?;
        i = j;
    }
    let body_len = w.len;
    let digest = w.hash.finalize();
    let mut file = w.inner.into_inner().map_err(|err| e(err.into_error()))?;
    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&body_len.to_le_bytes());
    header.extend_from_slice(&digest);
    file.seek(SeekFrom::Start(0)).map_err(&e)?;
    file.write_all(&header).map_err(&e)?;
    file.flush().map_err(&e)?;
    Ok(HEADER as u64 + body_len)
}

/// A reader of the body that hashes it and never reads past its declared length.
struct Body<R> {
    inner: R,
    hash: Sha256,
    left: u64,
}

type Miss<T> = std::result::Result<T, String>;

impl<R: Read> Body<R> {
    fn take(&mut self, n: u64) -> Miss<Vec<u8>> {
        if n > self.left {
            return Err("the entry is shorter than its contents say".into());
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
        self.hash.update(&buf);
        self.left -= n;
        Ok(buf)
    }
    fn u32(&mut self) -> Miss<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Miss<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn blob(&mut self) -> Miss<Vec<u8>> {
        let n = self.u64()?;
        self.take(n)
    }
    /// A path table (`what`: image, audio or video), its ends checked to be in order
    /// and inside the concatenated paths, each at a character boundary.
    fn paths(&mut self, what: &str) -> Miss<(String, Vec<u64>)> {
        let paths = String::from_utf8(self.blob()?).map_err(|_| format!("{what} paths are not UTF-8"))?;
        let n = self.count(8)?;
        let ends: Vec<u64> = self.take(n * 8)?.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let len = paths.len() as u64;
        let inside = |&e: &u64| e <= len && paths.is_char_boundary(e as usize);
        if ends.windows(2).any(|w| w[0] > w[1]) || !ends.iter().all(inside) {
            return Err(format!("{what} path ends out of order"));
        }
        Ok((paths, ends))
    }
    /// A count of items of `each` bytes that fits in what is left.
    fn count(&mut self, each: u64) -> Miss<u64> {
        let n = self.u64()?;
        if n.saturating_mul(each) > self.left {
            return Err("a count runs past the end of the entry".into());
        }
        Ok(n)
    }
}

/// Loads the entry `path` into `store` (empty: the source not yet added), its records
/// appended to `spill`. A miss (`Err(reason)` inside) leaves `store` as it was; only a
/// failure of the spill itself is an error.
/// An entry read back: the source's store, the image fingerprint it was saved with, and
/// the meta bytes.
pub(crate) struct Entry {
    pub store: Store,
    pub prints: Fingerprints,
    pub meta: Vec<u8>,
}

/// How a loaded entry's token records reach the spill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Records {
    /// Copied into the spill, each checked to parse and the entry's sha256 checked.
    Copy,
    /// Read where they lie in the entry (the spill attaches its file): what the driver of
    /// a cluster build does with the entries its own tasks just wrote (renamed into place
    /// whole, so the size check stands for the digest), so that it never reads them; each
    /// record is checked to parse when it is read back.
    Attach,
}

/// Reads the entry `path` for `key`, its records appended to `spill` (or attached), the
/// store's stats starting from `stats` (name, weight). A miss (`Err(reason)` inside) uses
/// nothing; only a failure of the spill itself is an error.
pub(crate) fn load(stats: &SourceStats, spill: &mut Spill, key: &str, seq_len: u32, path: &Path, records: Records) -> Result<Miss<Entry>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return Ok(Err(format!("open: {e}"))),
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; HEADER];
    if reader.read_exact(&mut header).is_err() {
        return Ok(Err("shorter than its header".into()));
    }
    if &header[..8] != MAGIC {
        return Ok(Err("not a token store entry".into()));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Ok(Err(format!("format version {version}, this build reads {FORMAT_VERSION}")));
    }
    let body_len = u64::from_le_bytes(header[12..20].try_into().unwrap());
    if HEADER as u64 + body_len != size {
        return Ok(Err(format!("{size} bytes where the header says {}", HEADER as u64 + body_len)));
    }
    let mut body = Body { inner: reader, hash: Sha256::new(), left: body_len };
    let mut fresh = Store {
        stats: SourceStats { name: stats.name.clone(), weight: stats.weight, ..Default::default() },
        ..Default::default()
    };
    let mut prints = [[0u8; 32]; 3];
    if records == Records::Attach {
        let meta = match read_meta(&mut body, &mut fresh, &mut prints, key, seq_len) {
            Ok(m) => m,
            Err(reason) => return Ok(Err(reason)),
        };
        let total = match records_total(&mut body, &fresh) {
            Ok(t) => t,
            Err(reason) => return Ok(Err(reason)),
        };
        let file = spill.attach(path, size);
        let mut offset = size - total; // the records end the entry
        for s in &mut fresh.samples {
            s.record = Record { offset, bytes: s.record.bytes, file };
            offset += s.record.bytes as u64;
        }
        return Ok(Ok(Entry { store: fresh, prints, meta }));
    }
    match read_body(&mut body, &mut fresh, &mut prints, spill, key, seq_len)? {
        Ok(meta) => {
            if body.left != 0 {
                return Ok(Err("bytes after the end of the entry".into()));
            }
            if body.hash.finalize()[..] != header[20..] {
                return Ok(Err("the content does not match its sha256".into()));
            }
            Ok(Ok(Entry { store: fresh, prints, meta }))
        }
        Err(reason) => Ok(Err(reason)),
    }
}

/// The body into `store`, its records appended to `spill`. The outer error is the
/// spill's; the inner one a miss.
fn read_body<R: Read>(
    b: &mut Body<R>,
    store: &mut Store,
    prints: &mut Fingerprints,
    spill: &mut Spill,
    key: &str,
    seq_len: u32,
) -> Result<Miss<Vec<u8>>> {
    let meta = match read_meta(b, store, prints, key, seq_len) {
        Ok(m) => m,
        Err(reason) => return Ok(Err(reason)),
    };
    // The records: copied to the spill in pieces, each checked to parse as its sample.
    if let Err(reason) = records_total(b, store) {
        return Ok(Err(reason));
    }
    let mut i = 0;
    while i < store.samples.len() {
        let mut j = i;
        let mut piece = 0u64;
        while j < store.samples.len() && (j == i || piece + (store.samples[j].record.bytes as u64) <= PIECE) {
            piece += store.samples[j].record.bytes as u64;
            j += 1;
        }
        let bytes = match b.take(piece) {
            Ok(v) => v,
            Err(r) => return Ok(Err(r)),
        };
        let mut at = 0usize;
        for s in &store.samples[i..j] {
            let n = s.record.bytes as usize;
            if !spill::check_record(&bytes[at..at + n], s.len) {
                return Ok(Err("a token record does not parse".into()));
            }
            at += n;
        }
        let base = spill.append_bytes(&bytes)?;
        let mut offset = base;
        for s in &mut store.samples[i..j] {
            s.record = Record { offset, ..s.record };
            offset += s.record.bytes as u64;
        }
        i = j;
    }
    Ok(Ok(meta))
}

/// The size of the token records that end the entry, checked to be what is left of it
/// and what the samples' records add up to.
fn records_total<R: Read>(b: &mut Body<R>, store: &Store) -> Miss<u64> {
    let total = match b.u64()? {
        t if t == b.left => t,
        _ => return Err("the token records do not end the entry".into()),
    };
    let expected: u64 = store.samples.iter().map(|s| s.record.bytes as u64).sum();
    if expected != total {
        return Err("the token records do not add up to the samples' sizes".into());
    }
    Ok(total)
}

fn read_meta<R: Read>(b: &mut Body<R>, store: &mut Store, prints: &mut Fingerprints, key: &str, seq_len: u32) -> Miss<Vec<u8>> {
    if b.blob()? != key.as_bytes() {
        return Err("the entry holds another key".into());
    }
    let (stored_len, max_len) = (b.u32()?, b.u32()?);
    // The samples are the same for any seq_len every tokenized sample fits in.
    if stored_len != seq_len && max_len > stored_len.min(seq_len) {
        return Err(format!("saved with seq_len {stored_len}, a sample of {max_len} tokens is over {}", stored_len.min(seq_len)));
    }
    store.max_len = max_len;
    for print in prints.iter_mut() {
        print.copy_from_slice(&b.take(32)?);
    }
    let st: &mut SourceStats = &mut store.stats;
    st.rows = b.u64()?;
    st.skipped = b.u64()?;
    st.dropped_overlong = b.u64()?;
    st.dropped_images = b.u64()?;
    st.truncated = b.u64()?;
    let n = b.count(8)?;
    st.skipped_examples = (0..n)
        .map(|_| b.blob().and_then(|v| String::from_utf8(v).map_err(|_| "a skipped example is not UTF-8".to_string())))
        .collect::<Miss<_>>()?;
    let meta = b.blob()?;
    // Tables are read whole and parsed from memory.
    let n = b.count(SAMPLE)?;
    let table = b.take(n * SAMPLE)?;
    let u32_at = |t: &[u8], i: usize| u32::from_le_bytes(t[i..i + 4].try_into().unwrap());
    let u64_at = |t: &[u8], i: usize| u64::from_le_bytes(t[i..i + 8].try_into().unwrap());
    let samples: Vec<SampleRec> = table
        .chunks_exact(SAMPLE as usize)
        .map(|r| SampleRec {
            row: u64_at(r, 0),
            part: u16::from_le_bytes([r[8], r[9]]),
            len: u32_at(r, 10),
            trained: u32_at(r, 14),
            img: u32_at(r, 18),
            n_img: u32_at(r, 22),
            aud: u32_at(r, 26),
            n_aud: u32_at(r, 30),
            vid: u32_at(r, 34),
            n_vid: u32_at(r, 38),
            template: u32_at(r, 42) as i32,
            record: Record { offset: 0, bytes: u32_at(r, 46), file: 0 },
        })
        .collect();
    (store.image_paths, store.image_path_ends) = b.paths("image")?;
    let n = b.count(12)?;
    store.image_grids = b.take(n * 12)?.chunks_exact(12).map(|c| [u32_at(c, 0), u32_at(c, 4), u32_at(c, 8)]).collect();
    (store.audio_paths, store.audio_path_ends) = b.paths("audio")?;
    let n = b.count(AUDIO_INFO)?;
    store.audio_infos = b
        .take(n * AUDIO_INFO)?
        .chunks_exact(AUDIO_INFO as usize)
        .map(|c| AudioInfo { tokens: u32_at(c, 0), samples: u64_at(c, 4) })
        .collect();
    (store.video_paths, store.video_path_ends) = b.paths("video")?;
    let n = b.count(VIDEO_INFO)?;
    store.video_infos = b
        .take(n * VIDEO_INFO)?
        .chunks_exact(VIDEO_INFO as usize)
        .map(|c| VideoInfo { tokens: u32_at(c, 0), grid: [u32_at(c, 4), u32_at(c, 8), u32_at(c, 12)], frames: u32_at(c, 16) })
        .collect();
    // Every index the layout follows stays in bounds.
    if store.image_grids.len() != store.image_path_ends.len() {
        return Err("image grids and paths differ in number".into());
    }
    if store.audio_infos.len() != store.audio_path_ends.len() {
        return Err("audio infos and paths differ in number".into());
    }
    if store.video_infos.len() != store.video_path_ends.len() {
        return Err("video infos and paths differ in number".into());
    }
    let (images, audios, videos) =
        (store.image_grids.len() as u64, store.audio_infos.len() as u64, store.video_infos.len() as u64);
    if samples.iter().any(|s| s.img as u64 + s.n_img as u64 > images) {
        return Err("a sample's images lie past the image table".into());
    }
    if samples.iter().any(|s| s.aud as u64 + s.n_aud as u64 > audios) {
        return Err("a sample's audio clips lie past the audio table".into());
    }
    if samples.iter().any(|s| s.vid as u64 + s.n_vid as u64 > videos) {
        return Err("a sample's video clips lie past the video table".into());
    }
    store.samples = samples;
    Ok(meta)
}

impl Compiler {
    /// Saves source `source`'s samples (after its last batch) as the token store entry
    /// `path` for `key`, with `meta` (what the caller needs back on a hit); returns the
    /// entry's size in bytes.
    pub fn save_source(&mut self, source: usize, key: &str, meta: &[u8], path: &Path) -> Result<u64> {
        let pool = self.pool.get()?;
        let store = self.stores.get(source).ok_or_else(|| Error::internal(format!("no source with index {source}")))?;
        let prints = self.fingerprints(&pool, source, store);
        save(store, &mut self.spill, key, self.plan.seq_len, &prints, meta, path)
    }

    /// The longest sample of source `source` tokenized so far, before the overlong policy.
    pub fn source_max_len(&self, source: usize) -> Result<u32> {
        self.stores.get(source).map(|s| s.max_len).ok_or_else(|| Error::internal(format!("no source with index {source}")))
    }

    /// Loads the entry `path` as source `source`'s samples when it is whole and holds
    /// `key`: its meta, or why it was not used (the source is then tokenized as usual).
    pub fn load_source(&mut self, source: usize, key: &str, path: &Path, records: Records) -> Result<Loaded> {
        if self.layout.is_some() {
            return Err(Error::internal("a source loaded after finish()"));
        }
        let store = self.stores.get(source).ok_or_else(|| Error::internal(format!("no source with index {source}")))?;
        if !store.samples.is_empty() || store.stats.rows > 0 {
            return Err(Error::internal("a token store entry loaded into a source that has samples"));
        }
        let entry = match load(&store.stats, &mut self.spill, key, self.plan.seq_len, path, records)? {
            Ok(entry) => entry,
            Err(why) => return Ok(Err(why)),
        };
        let pool = self.pool.get()?;
        if let Some(why) = self.changed_media(&pool, source, &entry) {
            return Ok(Err(why));
        }
        self.stores[source] = entry.store;
        Ok(Ok(entry.meta))
    }

    /// Loads the entry `path` of one work unit of source `source` (its rows the next
    /// after those loaded so far) and appends its samples to the source's: the source
    /// is then what tokenizing both units' batches into it gives. Its meta, or why it was
    /// not used (the source is then left as it was).
    pub fn load_unit(&mut self, source: usize, key: &str, path: &Path, records: Records) -> Result<Loaded> {
        if self.layout.is_some() {
            return Err(Error::internal("a work unit loaded after finish()"));
        }
        let store = self.stores.get(source).ok_or_else(|| Error::internal(format!("no source with index {source}")))?;
        let entry = match load(&store.stats, &mut self.spill, key, self.plan.seq_len, path, records)? {
            Ok(entry) => entry,
            Err(why) => return Ok(Err(why)),
        };
        let pool = self.pool.get()?;
        if let Some(why) = self.changed_media(&pool, source, &entry) {
            return Ok(Err(why));
        }
        self.stores[source].append(entry.store);
        Ok(Ok(entry.meta))
    }
}

impl Compiler {
    /// The fingerprints of the image, audio and video files `store` (of source `source`)
    /// uses, each relative to the source's root for that medium.
    fn fingerprints(&self, pool: &rayon::ThreadPool, source: usize, store: &Store) -> Fingerprints {
        let src = &self.plan.sources[source];
        [
            media_fingerprint(pool, src.image_root.as_deref(), store.image_path_ends.len(), |k| store.image_path(k)),
            media_fingerprint(pool, src.audio_root.as_deref(), store.audio_path_ends.len(), |k| store.audio_path(k)),
            media_fingerprint(pool, src.video_root.as_deref(), store.video_path_ends.len(), |k| store.video_path(k)),
        ]
    }

    /// Why `entry` cannot be used because a media file it was made from changed, if so.
    fn changed_media(&self, pool: &rayon::ThreadPool, source: usize, entry: &Entry) -> Option<String> {
        let now = self.fingerprints(pool, source, &entry.store);
        ["an image file", "an audio file", "a video file"]
            .iter()
            .zip(now.iter().zip(&entry.prints))
            .find(|(_, (a, b))| a != b)
            .map(|(what, _)| format!("{what} changed (size or modification time)"))
    }
}

/// A fingerprint of the `n` media files a store's samples use (`path(k)` relative to
/// `root`): each one's path, size and modification time. Under a grid rule an image's
/// size shapes its samples, and a clip's length always does; a missing file would make
/// its sample unusable. Stat only, in parallel.
fn media_fingerprint<'a>(
    pool: &rayon::ThreadPool,
    root: Option<&str>,
    n: usize,
    path: impl Fn(usize) -> &'a [u8] + Sync,
) -> [u8; 32] {
    let root = root.map(Path::new).unwrap_or(Path::new(""));
    let stamps: Vec<(u64, i128)> = pool.install(|| {
        (0..n)
            .into_par_iter()
            .map(|k| {
                let rel = String::from_utf8_lossy(path(k));
                match std::fs::metadata(root.join(rel.as_ref())) {
                    Ok(m) => {
                        let mtime = m
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map(|d| d.as_nanos() as i128)
                            .unwrap_or(-1);
                        (m.len(), mtime)
                    }
                    Err(_) => (u64::MAX, -2),
                }
            })
            .collect()
    });
    let mut hash = Sha256::new();
    for (k, (len, mtime)) in stamps.iter().enumerate() {
        let path = path(k);
        hash.update((path.len() as u64).to_le_bytes());
        hash.update(path);
        hash.update(len.to_le_bytes());
        hash.update(mtime.to_le_bytes());
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::columns::{Batch, StrCol};
    use crate::compile::tests::{batch, cols, convs, plan, TOKENIZER};
    use crate::compile::SKIPPED_EXAMPLES;
    use crate::plan::{OnError, Plan};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mmrecipe-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The packed release of a compiler (everything `emit` gives).
    fn release(comp: &mut Compiler) -> (String, Vec<u32>, Vec<u8>, Vec<u64>, Vec<i32>, Vec<i64>) {
        let summary = serde_json::to_string(&comp.finish().unwrap()).unwrap();
        let p = comp.emit(0, usize::MAX).unwrap();
        (summary, p.input_ids, p.loss_mask, p.segment_row, p.segment_template, p.row_offsets)
    }

    #[test]
    fn a_loaded_source_builds_the_same_release() {
        let d = dir("same");
        let c = cols(&convs(50));
        let spill_dir = d.join("spill");
        std::fs::create_dir_all(&spill_dir).unwrap();
        for spill in [None, Some(spill_dir.as_path())] {
            let mut clean = Compiler::new(plan(""), TOKENIZER, 2, spill).unwrap();
            clean.add_batch(0, &batch(&c)).unwrap();
            clean.add_batch(1, &batch(&c)).unwrap();
            let size = clean.save_source(1, "k1", b"meta", &d.join("b.tok")).unwrap();
            assert_eq!(size, std::fs::metadata(d.join("b.tok")).unwrap().len());
            let want = release(&mut clean);
            // Source 1 from the store, source 0 tokenized after it: records interleave.
            let mut again = Compiler::new(plan(""), TOKENIZER, 2, spill).unwrap();
            assert_eq!(again.load_source(1, "k1", &d.join("b.tok"), Records::Copy).unwrap(), Ok(b"meta".to_vec()));
            again.add_batch(0, &batch(&c)).unwrap();
            assert_eq!(release(&mut again), want);
            // Another key, or a smaller seq_len a sample is over: a miss.
            let mut other = Compiler::new(plan(""), TOKENIZER, 2, spill).unwrap();
            assert!(other.load_source(1, "k2", &d.join("b.tok"), Records::Copy).unwrap().is_err());
            other.plan.seq_len = 8;
            assert!(other.load_source(1, "k1", &d.join("b.tok"), Records::Copy).unwrap().unwrap_err().contains("seq_len"));
            // A larger one all samples fit in either way: a hit, same samples.
            other.plan.seq_len = 4096;
            assert!(other.load_source(1, "k1", &d.join("b.tok"), Records::Copy).unwrap().is_ok());
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Units A then B of a source, each tokenized by a compiler of its own and loaded
    /// one after the other, build the release that adding A's and B's batches to one
    /// source builds: samples, image tables, counts, skipped examples, max_len.
    #[test]
    fn units_loaded_in_turn_equal_their_batches_added_to_one_source() {
        let d = dir("units");
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/demo/data/images");
        let mut plan = plan(r#", "image": {"placeholder": "<image>", "token": "<image>", "count": 4}, "overlong": "truncate""#);
        plan.seq_len = 40;
        for s in &mut plan.sources {
            s.image_root = Some(root.to_string());
            s.on_error = OnError::Skip;
        }
        // Rows with 0, 1 or 2 images, some without an answer (skipped), some too long.
        let long = "word ".repeat(60);
        let unit = |first: u64, n: usize| {
            let convs: Vec<Vec<(u8, String)>> = (0..n)
                .map(|i| match (first as usize + i) % 5 {
                    0 => vec![(1, "only a question".to_string())],
                    1 => vec![(1, "q".to_string()), (2, long.clone())],
                    _ => vec![(1, "hello there".to_string()), (2, format!("answer {}", first as usize + i))],
                })
                .collect();
            convs
        };
        let owned = |first: u64, n: usize| {
            let convs = unit(first, n);
            let refs: Vec<Vec<(u8, &str)>> = convs.iter().map(|c| c.iter().map(|(r, t)| (*r, t.as_str())).collect()).collect();
            let mut c = cols(&refs);
            c.rows = (first..first + n as u64).collect();
            let counts: Vec<i64> = (0..n).map(|i| ((first as usize + i) % 3) as i64).collect();
            let mut offsets = vec![0i64];
            for k in &counts {
                offsets.push(offsets.last().unwrap() + k);
            }
            let total = *offsets.last().unwrap() as usize;
            let names = ["astronaut.jpg", "coffee.jpg"];
            let mut path_offsets = vec![0i64];
            let mut data = Vec::new();
            for k in 0..total {
                data.extend_from_slice(names[k % 2].as_bytes());
                path_offsets.push(data.len() as i64);
            }
            (c, offsets, path_offsets, data)
        };
        let parts = [owned(0, 12), owned(12, 9), owned(21, 14)];
        let batches: Vec<Batch> = parts
            .iter()
            .map(|(c, offsets, po, data)| Batch { image_offsets: offsets, images: StrCol { offsets: po, data }, ..batch(c) })
            .collect();
        let plain = cols(&convs(5)); // source 0, tokenized as usual
        let mut whole = Compiler::new(plan.clone(), TOKENIZER, 2, None).unwrap();
        whole.add_batch(0, &batch(&plain)).unwrap();
        for b in &batches {
            whole.add_batch(1, b).unwrap();
        }
        let st = &whole.stores[1].stats;
        assert!(st.skipped > SKIPPED_EXAMPLES as u64 && st.truncated > 0 && !whole.stores[1].image_grids.is_empty(), "{st:?}");
        let first_skipped = st.skipped_examples.clone();
        let max_len = whole.stores[1].max_len;
        let want = release(&mut whole);
        // One unit per batch, and units of several batches.
        for cut in [vec![1, 1, 1], vec![2, 1], vec![1, 2]] {
            let mut paths = Vec::new();
            let mut at = 0;
            for (u, n) in cut.iter().enumerate() {
                let mut own = Compiler::new(plan.clone(), TOKENIZER, 1, None).unwrap();
                for b in &batches[at..at + n] {
                    own.add_batch(1, b).unwrap();
                }
                at += n;
                let path = d.join(format!("u{u}.tok"));
                own.save_source(1, &format!("k/{u}"), format!("m{u}").as_bytes(), &path).unwrap();
                paths.push(path);
            }
            let mut again = Compiler::new(plan.clone(), TOKENIZER, 2, None).unwrap();
            again.add_batch(0, &batch(&plain)).unwrap();
            for (u, path) in paths.iter().enumerate() {
                assert_eq!(again.load_unit(1, &format!("k/{u}"), path, Records::Copy).unwrap(), Ok(format!("m{u}").into_bytes()));
            }
            assert_eq!(again.stores[1].stats.skipped_examples, first_skipped, "{cut:?}");
            assert_eq!(again.stores[1].max_len, max_len, "{cut:?}");
            // A damaged unit is a miss that leaves the source as it was.
            let before = again.stores[1].samples.len();
            assert!(again.load_unit(1, "k/0", &d.join("absent.tok"), Records::Copy).unwrap().is_err());
            assert!(again.load_unit(1, "another key", &paths[0], Records::Copy).unwrap().is_err());
            assert_eq!(again.stores[1].samples.len(), before);
            assert_eq!(release(&mut again), want, "{cut:?}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn any_damage_is_a_miss_and_leaves_the_source_empty() {
        let d = dir("damage");
        let c = cols(&convs(20));
        let mut comp = Compiler::new(plan(""), TOKENIZER, 1, None).unwrap();
        comp.add_batch(0, &batch(&c)).unwrap();
        let path = d.join("a.tok");
        comp.save_source(0, "k", b"", &path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut damaged: Vec<Vec<u8>> =
            vec![good[..good.len() - 1].to_vec(), good[..10].to_vec(), vec![], [good.clone(), vec![0]].concat()];
        for at in [0, 9, 13, 30, HEADER + 3, good.len() / 2, good.len() - 1] {
            let mut v = good.clone();
            v[at] ^= 0x40;
            damaged.push(v);
        }
        for (k, bytes) in damaged.iter().enumerate() {
            std::fs::write(&path, bytes).unwrap();
            let mut fresh = Compiler::new(plan(""), TOKENIZER, 1, None).unwrap();
            let got = fresh.load_source(0, "k", &path, Records::Copy).unwrap();
            assert!(got.is_err(), "damage {k} went unnoticed");
            assert!(fresh.stores[0].samples.is_empty() && fresh.stores[0].stats.rows == 0);
        }
        let mut fresh = Compiler::new(plan(""), TOKENIZER, 1, None).unwrap();
        assert!(fresh.load_source(0, "k", &d.join("absent.tok"), Records::Copy).unwrap().is_err());
        std::fs::write(&path, &good).unwrap();
        assert!(fresh.load_source(0, "k", &path, Records::Copy).unwrap().is_ok());
        assert!(fresh.load_source(0, "k", &path, Records::Copy).is_err(), "only into an empty source");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A changed image (its size or modification time) makes the entry a miss.
    #[test]
    fn a_changed_image_is_a_miss() {
        let d = dir("images");
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/demo/data/images/astronaut.jpg");
        std::fs::copy(src, d.join("a.jpg")).unwrap();
        let mut plan = plan(r#", "image": {"placeholder": "<image>", "token": "<image>", "count": 4}"#);
        plan.seq_len = 128;
        plan.sources[0].image_root = Some(d.display().to_string());
        let n = 3;
        let c = cols(&convs(n));
        let image_offsets: Vec<i64> = (0..=n as i64).collect();
        let path_offsets: Vec<i64> = (0..=n as i64).map(|k| k * 5).collect();
        let path_data = b"a.jpg".repeat(n);
        let with_images =
            Batch { image_offsets: &image_offsets, images: StrCol { offsets: &path_offsets, data: &path_data }, ..batch(&c) };
        let mut comp = Compiler::new(plan.clone(), TOKENIZER, 1, None).unwrap();
        comp.add_batch(0, &with_images).unwrap();
        let entry = d.join("e.tok");
        comp.save_source(0, "k", b"", &entry).unwrap();
        let mut again = Compiler::new(plan.clone(), TOKENIZER, 1, None).unwrap();
        assert!(again.load_source(0, "k", &entry, Records::Copy).unwrap().is_ok());
        let mut bytes = std::fs::read(d.join("a.jpg")).unwrap();
        bytes.extend_from_slice(b"trailing");
        std::fs::write(d.join("a.jpg"), bytes).unwrap();
        let mut again = Compiler::new(plan, TOKENIZER, 1, None).unwrap();
        assert!(again.load_source(0, "k", &entry, Records::Copy).unwrap().unwrap_err().contains("image"));
        assert!(again.stores[0].samples.is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Source 0 of `plan` tokenized, with audio and video tables as a source with clips
    /// has them (sample k: k % 3 audio clips, (k + 1) % 3 video clips, alternating files).
    fn with_clips(plan: &Plan, n: usize) -> Compiler {
        let c = cols(&convs(n));
        let mut comp = Compiler::new(plan.clone(), TOKENIZER, 1, None).unwrap();
        comp.add_batch(0, &batch(&c)).unwrap();
        let st = &mut comp.stores[0];
        for k in 0..st.samples.len() {
            let (aud, vid) = (st.audio_path_ends.len() as u32, st.video_path_ends.len() as u32);
            let (n_aud, n_vid) = ((k % 3) as u32, ((k + 1) % 3) as u32);
            st.samples[k] = SampleRec { aud, n_aud, vid, n_vid, ..st.samples[k] };
            for j in 0..n_aud {
                st.push_audio(["a.wav", "b.flac"][(k + j as usize) % 2], AudioInfo { tokens: 10 + k as u32, samples: 16_000 * k as u64 + j as u64 });
            }
            for j in 0..n_vid {
                let info = VideoInfo { tokens: 20 + k as u32, grid: [2, 4 + j, 6 + k as u32], frames: 4 + k as u32 };
                st.push_video(["v.mp4", "ü.mp4"][(k + j as usize) % 2], info);
            }
        }
        comp
    }

    type Tables =
        (Vec<(u64, u16, u32, u32, u32, u32, u32, u32, i32)>, String, Vec<u64>, Vec<AudioInfo>, String, Vec<u64>, Vec<VideoInfo>);

    fn tables(st: &Store) -> Tables {
        let samples =
            st.samples.iter().map(|s| (s.row, s.part, s.len, s.trained, s.aud, s.n_aud, s.vid, s.n_vid, s.template)).collect();
        let (a, v) = (st.audio_paths.clone(), st.video_paths.clone());
        (samples, a, st.audio_path_ends.clone(), st.audio_infos.clone(), v, st.video_path_ends.clone(), st.video_infos.clone())
    }

    /// Audio and video tables come back as saved; an entry whose tables disagree (a
    /// count, an end, an index past a table) is a miss, as is a changed clip.
    #[test]
    fn audio_and_video_tables_round_trip_and_are_checked() {
        let d = dir("media");
        for name in ["a.wav", "b.flac", "v.mp4", "ü.mp4"] {
            std::fs::write(d.join(name), name.as_bytes()).unwrap(); // only stat'ed
        }
        let mut plan = plan("");
        plan.sources[0].audio_root = Some(d.display().to_string());
        plan.sources[0].video_root = Some(d.display().to_string());
        let entry = d.join("e.tok");
        let mut comp = with_clips(&plan, 9);
        let want = tables(&comp.stores[0]);
        assert!(want.3.len() >= 9 && want.6.len() >= 9, "{want:?}");
        comp.save_source(0, "k", b"m", &entry).unwrap();
        let mut again = Compiler::new(plan.clone(), TOKENIZER, 1, None).unwrap();
        assert_eq!(again.load_source(0, "k", &entry, Records::Copy).unwrap(), Ok(b"m".to_vec()));
        assert_eq!(tables(&again.stores[0]), want);
        // Saved with tables that disagree: whole and hashed, yet a miss.
        type Tamper = fn(&mut Store);
        let tampered: [(Tamper, &str); 7] = [
            (|st| st.audio_infos.truncate(st.audio_infos.len() - 1), "audio infos and paths differ"),
            (|st| st.video_infos.truncate(st.video_infos.len() - 1), "video infos and paths differ"),
            (|st| st.audio_path_ends.swap(0, 1), "audio path ends"),
            (|st| *st.video_path_ends.last_mut().unwrap() += 1, "video path ends"),
            (|st| st.samples.last_mut().unwrap().n_aud += 3, "past the audio table"),
            (|st| st.samples[1].vid = 1000, "past the video table"),
            (|st| st.samples[0].aud = u32::MAX, "past the audio table"),
        ];
        for (tamper, why) in tampered {
            let mut comp = with_clips(&plan, 9);
            tamper(&mut comp.stores[0]);
            comp.save_source(0, "k", b"", &entry).unwrap();
            let mut fresh = Compiler::new(plan.clone(), TOKENIZER, 1, None).unwrap();
            let got = fresh.load_source(0, "k", &entry, Records::Copy).unwrap();
            assert!(got.as_ref().is_err_and(|e| e.contains(why)), "{why}: {got:?}");
            assert!(fresh.stores[0].samples.is_empty() && fresh.stores[0].audio_infos.is_empty());
        }
        // A clip that changed size: a miss naming its medium, for a source and a unit.
        for (name, why) in [("b.flac", "an audio file changed"), ("ü.mp4", "a video file changed")] {
            with_clips(&plan, 9).save_source(0, "k", b"", &entry).unwrap();
            let mut fresh = Compiler::new(plan.clone(), TOKENIZER, 1, None).unwrap();
            assert!(fresh.load_source(0, "k", &entry, Records::Copy).unwrap().is_ok());
            std::fs::write(d.join(name), b"a longer clip than before").unwrap();
            let mut fresh = Compiler::new(plan.clone(), TOKENIZER, 1, None).unwrap();
            assert!(fresh.load_source(0, "k", &entry, Records::Copy).unwrap().unwrap_err().contains(why), "{name}");
            assert!(fresh.load_unit(0, "k", &entry, Records::Copy).unwrap().unwrap_err().contains(why), "{name}");
            assert!(fresh.stores[0].samples.is_empty());
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn writes_leave_no_temporary_file() {
        let d = dir("tmp");
        let c = cols(&convs(5));
        let mut comp = Compiler::new(plan(""), TOKENIZER, 1, None).unwrap();
        comp.add_batch(0, &batch(&c)).unwrap();
        comp.save_source(0, "k", b"", &d.join("a.tok")).unwrap();
        assert!(comp.save_source(0, "k", b"", &d.join("missing").join("a.tok")).is_err());
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.tok")]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
