//! Tokenized samples kept on disk between tokenization and packing, so a build's memory
//! does not grow with its size. Records are compact: the tokens outside image runs, their
//! mask, and the runs (image tokens are re-expanded when read back). A spill can also
//! read records where they already lie in other files (token store entries a cluster
//! task wrote, `attach`): a build on a cluster then never copies them.

use crate::error::{Error, Result};
use crate::tokenize::{Encoded, ImageRun};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub struct Spill {
    sink: Sink,
    len: u64,
    /// How much of the file the writer has flushed: a read past it flushes first.
    flushed: u64,
    /// Files read in place: a record with `file` k > 0 lies in `attached[k - 1]`.
    attached: Vec<Attached>,
}

/// A file whose records the spill reads where they lie (never written or removed).
struct Attached {
    path: PathBuf,
    len: u64,
    reader: Option<File>,
}

enum Sink {
    Memory(Vec<u8>),
    File { writer: BufWriter<File>, path: PathBuf, reader: Option<File> },
}

/// Where a record lies: in the spill's own file (`file` 0) or an attached one.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub offset: u64,
    pub bytes: u32,
    pub file: u32,
}

/// A failed read or write of the spill file at `path`.
fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io { path: path.display().to_string(), message: format!("temporary token file: {e}") }
}

impl Spill {
    /// In memory when `dir` is None (tests, previews); else a file in `dir`, removed on drop.
    pub fn new(dir: Option<&Path>) -> Result<Self> {
        let sink = match dir {
            None => Sink::Memory(Vec::new()),
            Some(d) => {
                let path = d.join(format!("tokens-{}.spill", std::process::id()));
                let file = File::create(&path).map_err(io(&path))?;
                Sink::File { writer: BufWriter::with_capacity(1 << 20, file), path, reader: None }
            }
        };
        Ok(Spill { sink, len: 0, flushed: 0, attached: Vec::new() })
    }

    /// Reads records of the file `path` (`len` bytes) where they lie: returns the `file`
    /// its records name.
    pub fn attach(&mut self, path: &Path, len: u64) -> u32 {
        self.attached.push(Attached { path: path.to_path_buf(), len, reader: None });
        self.attached.len() as u32
    }

    /// The files records name, in order: the spill's own (empty in memory), then those
    /// attached.
    pub fn files(&self) -> Vec<String> {
        let own = match &self.sink {
            Sink::Memory(_) => String::new(),
            Sink::File { path, .. } => path.display().to_string(),
        };
        std::iter::once(own).chain(self.attached.iter().map(|a| a.path.display().to_string())).collect()
    }

    /// Writes out what the spill buffers, so another process reads its file whole.
    pub fn flush(&mut self) -> Result<()> {
        if let Sink::File { writer, path, .. } = &mut self.sink {
            writer.flush().map_err(io(path))?;
            self.flushed = self.len;
        }
        Ok(())
    }

    /// Appends one sample; image-run tokens are not stored.
    pub fn append(&mut self, enc: &Encoded) -> Result<Record> {
        let in_run = |t: usize| enc.images.iter().any(|r| t >= r.pos as usize && t < (r.pos + r.len) as usize);
        let keep: Vec<usize> = if enc.images.is_empty() {
            (0..enc.ids.len()).collect()
        } else {
            (0..enc.ids.len()).filter(|&t| !in_run(t)).collect()
        };
        let mut buf = Vec::with_capacity(8 + keep.len() * 5 + enc.images.len() * 8);
        buf.extend_from_slice(&(keep.len() as u32).to_le_bytes());
        buf.extend_from_slice(&(enc.images.len() as u32).to_le_bytes());
        for &t in &keep {
            buf.extend_from_slice(&enc.ids[t].to_le_bytes());
        }
        buf.extend(keep.iter().map(|&t| enc.mask[t]));
        for r in &enc.images {
            buf.extend_from_slice(&r.pos.to_le_bytes());
            buf.extend_from_slice(&r.len.to_le_bytes());
        }
        self.append_raw(&buf)
    }

    /// Appends one record as `raw` gives its bytes (what `raw` returned, or a token
    /// store entry holds).
    pub fn append_raw(&mut self, buf: &[u8]) -> Result<Record> {
        let bytes = u32::try_from(buf.len()).map_err(|_| Error::internal("a spill record over 4 GiB"))?;
        Ok(Record { offset: self.append_bytes(buf)?, bytes, file: 0 })
    }

    /// Appends bytes holding whole records (a token store entry's), returning where they
    /// start.
    pub fn append_bytes(&mut self, buf: &[u8]) -> Result<u64> {
        let offset = self.len;
        match &mut self.sink {
            Sink::Memory(v) => v.extend_from_slice(buf),
            Sink::File { writer, path, .. } => writer.write_all(buf).map_err(io(path))?,
        }
        self.len += buf.len() as u64;
        Ok(offset)
    }

    /// The bytes `offset..offset + bytes` (whole records, e.g. a run of one source's).
    pub fn raw_range(&mut self, file: u32, offset: u64, bytes: u32) -> Result<Vec<u8>> {
        self.raw(Record { offset, bytes, file })
    }

    /// The stored bytes of a record (for a token store entry).
    pub fn raw(&mut self, rec: Record) -> Result<Vec<u8>> {
        let mut owned = Vec::new();
        let bytes = self.bytes(rec, &mut owned)?;
        Ok(bytes.to_vec())
    }

    /// The bytes of `rec`: a slice of the memory sink, or read from the file into `owned`
    /// (the writer flushed first whenever the record lies past what it has flushed, so a
    /// read after later appends sees them).
    fn bytes<'a>(&'a mut self, rec: Record, owned: &'a mut Vec<u8>) -> Result<&'a [u8]> {
        let end = rec.offset + rec.bytes as u64;
        if rec.file > 0 {
            let Some(at) = self.attached.get_mut(rec.file as usize - 1) else {
                return Err(Error::internal(format!("spill record in file {} of {}", rec.file, self.attached.len())));
            };
            let path = &at.path;
            if end > at.len {
                return Err(Error::Io { path: path.display().to_string(), message: format!("token record {}..{end} past its end {}", rec.offset, at.len) });
            }
            read_at(&mut at.reader, path, rec, owned)?;
            return Ok(owned);
        }
        if end > self.len {
            return Err(Error::internal(format!("spill record {}..{end} past the end {}", rec.offset, self.len)));
        }
        match &mut self.sink {
            Sink::Memory(v) => Ok(&v[rec.offset as usize..end as usize]),
            Sink::File { writer, path, reader } => {
                if end > self.flushed {
                    writer.flush().map_err(io(path))?;
                    self.flushed = self.len;
                }
                read_at(reader, path, rec, owned)?;
                Ok(owned)
            }
        }
    }

    /// Reads back the record of a sample of `len` tokens, appending the full token ids and
    /// mask to `ids` / `mask` (image runs filled with `image_token`), and returns the runs.
    /// A record that does not parse as such a sample (a damaged file) is an error.
    pub fn read(&mut self, rec: Record, len: u32, image_token: u32, ids: &mut Vec<u32>, mask: &mut Vec<u8>) -> Result<Vec<ImageRun>> {
        let mut owned = Vec::new();
        let file = rec.file;
        let bytes = self.bytes(rec, &mut owned)?;
        if !check_record(bytes, len) {
            let path = self.files().swap_remove(file as usize);
            return Err(Error::Io { path, message: format!("the token record at byte {} does not parse", rec.offset) });
        }
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let (n, k) = (word(0) as usize, word(4) as usize);
        let text_ids = 8;
        let text_mask = text_ids + 4 * n;
        let runs_at = text_mask + n;
        let runs: Vec<ImageRun> =
            (0..k).map(|j| ImageRun { pos: word(runs_at + 8 * j), len: word(runs_at + 8 * j + 4) }).collect();
        let base = ids.len();
        let mut t = 0;
        for run in runs.iter() {
            while ids.len() - base < run.pos as usize {
                ids.push(word(text_ids + 4 * t));
                mask.push(bytes[text_mask + t]);
                t += 1;
            }
            ids.extend(std::iter::repeat_n(image_token, run.len as usize));
            mask.extend(std::iter::repeat_n(0u8, run.len as usize));
        }
        while t < n {
            ids.push(word(text_ids + 4 * t));
            mask.push(bytes[text_mask + t]);
            t += 1;
        }
        Ok(runs)
    }
}

/// Reads the bytes of `rec` from the file at `path` into `owned`, opening it (once) into
/// `reader`.
fn read_at(reader: &mut Option<File>, path: &Path, rec: Record, owned: &mut Vec<u8>) -> Result<()> {
    if reader.is_none() {
        *reader = Some(File::open(path).map_err(io(path))?);
    }
    let r = reader.as_mut().unwrap();
    r.seek(SeekFrom::Start(rec.offset)).map_err(io(path))?;
    owned.resize(rec.bytes as usize, 0);
    r.read_exact(owned).map_err(io(path))
}

/// Whether `bytes` is one well-formed record of a sample of `len` tokens: its text
/// tokens, their mask and its image runs, in order and inside the sample (so `read`
/// cannot go out of bounds on it).
pub fn check_record(bytes: &[u8], len: u32) -> bool {
    if bytes.len() < 8 {
        return false;
    }
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap()) as u64;
    let (n, k) = (word(0), word(4));
    if bytes.len() as u64 != 8 + 5 * n + 8 * k {
        return false;
    }
    let runs_at = (8 + 5 * n) as usize;
    let (mut end, mut image) = (0u64, 0u64);
    for j in 0..k as usize {
        let (pos, run) = (word(runs_at + 8 * j), word(runs_at + 8 * j + 4));
        if pos < end || pos - image > n {
            return false;
        }
        end = pos + run;
        image += run;
    }
    n + image == len as u64
}

impl Drop for Spill {
    fn drop(&mut self) {
        if let Sink::File { path, .. } = &self.sink {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Encoded {
        Encoded {
            ids: vec![1, 2, 9, 9, 9, 3, 9, 9, 4],
            mask: vec![0, 0, 0, 0, 0, 1, 0, 0, 1],
            offsets: vec![(0, 0); 9],
            images: vec![ImageRun { pos: 2, len: 3 }, ImageRun { pos: 6, len: 2 }],
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_in_memory_and_on_disk() {
        let dir = std::env::temp_dir().join(format!("mmrecipe-spill-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for d in [None, Some(dir.as_path())] {
            let mut spill = Spill::new(d).unwrap();
            let plain = Encoded { ids: vec![5, 6], mask: vec![1, 0], offsets: vec![(0, 0); 2], images: vec![], ..Default::default() };
            let r1 = spill.append(&sample()).unwrap();
            let r2 = spill.append(&plain).unwrap();
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            let runs = spill.read(r2, 2, 9, &mut ids, &mut mask).unwrap();
            assert!(runs.is_empty());
            let runs = spill.read(r1, 9, 9, &mut ids, &mut mask).unwrap();
            let s = sample();
            assert_eq!(ids, [vec![5, 6], s.ids.clone()].concat());
            assert_eq!(mask, [vec![1, 0], s.mask.clone()].concat());
            assert_eq!(runs, s.images);
            assert!(r1.bytes < (s.ids.len() * 5 + 8) as u32, "image tokens are not stored");
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the spill file is removed");
        std::fs::remove_dir(&dir).unwrap();
    }

    /// Reads, then more appends, then reads of the new records: each sees its bytes (the
    /// writer is flushed whenever a read reaches past what it flushed, not only on the
    /// first read).
    #[test]
    fn reads_after_later_appends_see_them() {
        let dir = std::env::temp_dir().join(format!("mmrecipe-spill-append-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for d in [None, Some(dir.as_path())] {
            let mut spill = Spill::new(d).unwrap();
            let first = spill.append(&sample()).unwrap();
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            spill.read(first, 9, 9, &mut ids, &mut mask).unwrap();
            let raw = spill.raw(first).unwrap();
            let later = Encoded { ids: vec![7, 8, 9], mask: vec![0, 1, 1], offsets: vec![(0, 0); 3], images: vec![], ..Default::default() };
            let second = spill.append(&later).unwrap();
            let copy = spill.append_raw(&raw).unwrap();
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            spill.read(second, 3, 9, &mut ids, &mut mask).unwrap();
            assert_eq!((ids, mask), (later.ids.clone(), later.mask.clone()));
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            let runs = spill.read(copy, 9, 9, &mut ids, &mut mask).unwrap();
            assert_eq!((ids, mask, runs), (sample().ids, sample().mask, sample().images));
            assert!(spill.raw(Record { bytes: copy.bytes + 1, ..copy }).is_err(), "past the end");
            assert!(check_record(&raw, 9) && !check_record(&raw, 8) && !check_record(&raw[..raw.len() - 1], 9));
        }
        std::fs::remove_dir(&dir).unwrap();
    }

    /// Records read where they lie in an attached file give what was written; one that
    /// does not parse as its sample, or lies past the file's end, is an error naming it.
    #[test]
    fn attached_files_are_read_in_place_and_checked() {
        let dir = std::env::temp_dir().join(format!("mmrecipe-spill-attach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut own = Spill::new(None).unwrap();
        let rec = own.append(&sample()).unwrap();
        let raw = own.raw(rec).unwrap();
        let file = dir.join("entry.tok");
        let mut bytes = b"header".to_vec();
        bytes.extend_from_slice(&raw);
        let mut bad = raw.clone();
        bad[0] += 1; // one more text token than the record holds
        bytes.extend_from_slice(&bad);
        std::fs::write(&file, &bytes).unwrap();
        let mut spill = Spill::new(Some(&dir)).unwrap();
        let k = spill.attach(&file, bytes.len() as u64);
        assert_eq!(spill.files()[k as usize], file.display().to_string());
        let good = Record { offset: 6, bytes: rec.bytes, file: k };
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        let runs = spill.read(good, 9, 9, &mut ids, &mut mask).unwrap();
        assert_eq!((ids, mask, runs), (sample().ids, sample().mask, sample().images));
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        let err = spill.read(Record { offset: 6 + rec.bytes as u64, ..good }, 9, 9, &mut ids, &mut mask).unwrap_err();
        assert!(err.to_string().contains("entry.tok") && err.to_string().contains("does not parse"), "{err}");
        let err = spill.read(Record { offset: 7 + rec.bytes as u64, ..good }, 9, 9, &mut ids, &mut mask).unwrap_err();
        assert!(err.to_string().contains("past its end"), "{err}");
        assert!(spill.read(good, 8, 9, &mut ids, &mut mask).is_err(), "a record of another length");
        drop(spill);
        std::fs::remove_file(&file).unwrap();
        std::fs::remove_dir(&dir).unwrap();
    }
}
