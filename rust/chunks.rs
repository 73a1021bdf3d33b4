//! Reading big JSON sources a slice at a time: a JSON Lines file, or a JSON file whose top
//! level is an array of objects (LLaVA-Instruct ships as one), handed out as JSON Lines
//! chunks of at most N records. Strings and escapes are tracked, so a bracket or comma
//! inside a string never splits a record.
//!
//! The splitter is also the first check of every record, so that what the JSON parser
//! downstream would accept silently, or choke on, is an error naming the line: text after
//! the array's closing `]` (or after a line's object), nesting deeper than `MAX_DEPTH`, a
//! record longer than `MAX_RECORD_BYTES` (memory stays bounded), bytes that are not UTF-8,
//! raw control characters in strings and `\u` escapes of unpaired UTF-16 surrogates (which
//! decode to no character; downstream they became NUL bytes in the tokens).

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;

/// Objects and arrays nested deeper than this are an error: nothing in instruction data
/// nests this deep, and recursive parsers downstream overflow their stack on hostile rows.
pub const MAX_DEPTH: usize = 128;
/// A line (JSON Lines) or record (array) longer than this is an error; it also bounds the
/// memory the splitter holds, and the bytes of one chunk.
pub const MAX_RECORD_BYTES: usize = 64 << 20;
const READ_SIZE: usize = 1 << 20;
const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub depth: usize,
    pub record_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { depth: MAX_DEPTH, record_bytes: MAX_RECORD_BYTES }
    }
}

/// Where the array reader is between records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    BeforeArray,
    AfterOpen,
    AfterRecord,
    AfterComma,
    AfterClose,
}

pub struct JsonChunks<R = File> {
    reader: R,
    array: bool,
    limits: Limits,
    top: Top,
    done: bool,
    eof: bool,
    bom_checked: bool,
    /// Bytes read and not yet dropped; `pos` is the first one not yet scanned.
    buf: Vec<u8>,
    pos: usize,
    /// Where each read lands before it joins `buf`.
    scratch: Vec<u8>,
    /// The file offset of `buf[0]`.
    base: u64,
    /// Newlines scanned so far (the current line is `newlines + 1`).
    newlines: u64,
    /// Records found so far (array: the current one is `records + 1`).
    records: u64,
}

impl JsonChunks<File> {
    /// Opens a regular file (a FIFO or a device would block or never end).
    pub fn open(path: &Path, array: bool) -> std::io::Result<Self> {
        if !std::fs::metadata(path)?.is_file() {
            return Err(std::io::Error::new(ErrorKind::InvalidInput, "not a regular file"));
        }
        Ok(JsonChunks::new(File::open(path)?, array))
    }

    /// A file read from byte `offset`, a point `position` gave after a chunk, with the
    /// `newlines` and (array) `records` before it: the chunks, and the lines and records
    /// named in errors, are those a reader from the start would give from there on.
    pub fn open_at(path: &Path, array: bool, offset: u64, newlines: u64, records: u64) -> std::io::Result<Self> {
        use std::io::Seek;
        let mut chunks = JsonChunks::open(path, array)?;
        if offset == 0 {
            return Ok(chunks);
        }
        chunks.reader.seek(std::io::SeekFrom::Start(offset))?;
        chunks.base = offset;
        chunks.newlines = newlines;
        chunks.records = records;
        chunks.bom_checked = true;
        if array {
            chunks.top = Top::AfterRecord; // a chunk ends after a record
        }
        Ok(chunks)
    }
}

impl<R: Read> JsonChunks<R> {
    pub fn new(reader: R, array: bool) -> Self {
        JsonChunks {
            reader,
            array,
            limits: Limits::default(),
            top: if array { Top::BeforeArray } else { Top::AfterOpen },
            done: false,
            eof: false,
            bom_checked: false,
            buf: Vec::new(),
            pos: 0,
            scratch: Vec::new(),
            base: 0,
            newlines: 0,
            records: 0,
        }
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The next chunk of at most `max` records as JSON Lines (None at the end). A chunk
    /// also ends once it holds `record_bytes` bytes.
    pub fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<u8>>, String> {
        if self.done {
            return Ok(None);
        }
        if !self.bom_checked {
            // A UTF-8 byte-order mark at the start of the file is not data.
            self.bom_checked = true;
            while self.buf.len() < BOM.len() && !self.eof {
                self.fill(0)?;
            }
            if self.buf.starts_with(BOM) {
                self.pos = BOM.len();
            }
        }
        let result = self.collect(max.max(1));
        if result.is_err() {
            self.done = true; // an error ends the file: nothing after it is trusted
        }
        result
    }

    /// Where the next chunk starts: (file offset, newlines, records before it), for `open_at`.
    pub fn position(&self) -> (u64, u64, u64) {
        (self.base + self.pos as u64, self.newlines, self.records)
    }

    fn collect(&mut self, max: usize) -> Result<Option<Vec<u8>>, String> {
        let mut out = Vec::new();
        let mut records = 0;
        while records < max && out.len() < self.limits.record_bytes {
            let record = if self.array { self.next_array_record()? } else { self.next_line()? };
            let Some((start, end)) = record else {
                self.done = true;
                break;
            };
            let bytes = &self.buf[start..end];
            if self.array {
                // Newlines inside a record are whitespace (raw ones in strings are refused).
                out.extend(bytes.iter().map(|&c| if c == b'\n' || c == b'\r' { b' ' } else { c }));
            } else {
                out.extend_from_slice(bytes);
            }
            out.push(b'\n');
            records += 1;
        }
        Ok((records > 0).then_some(out))
    }

    /// "line 7" (JSON Lines) or "record 3 (line 7)" (array), counting from 1.
    fn at(&self, line: u64) -> String {
        if self.array {
            format!("record {} (line {line})", self.records + 1)
        } else {
            format!("line {line}")
        }
    }

    /// Reads more input, first dropping what lies before `keep` (and `pos`) when that is
    /// at least half the buffer (so moving the rest costs no more than reading it did).
    /// Returns the number of bytes dropped; sets `eof` when nothing more comes.
    fn fill(&mut self, keep: usize) -> Result<usize, String> {
        let drop = keep.min(self.pos);
        let dropped = if drop > 0 && drop * 2 >= self.buf.len() {
            self.buf.drain(..drop);
            self.pos -= drop;
            self.base += drop as u64;
            drop
        } else {
            0
        };
        if self.scratch.is_empty() {
            self.scratch = vec![0; READ_SIZE];
        }
        let n = loop {
            match self.reader.read(&mut self.scratch) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
        };
        self.buf.extend_from_slice(&self.scratch[..n]);
        self.eof = n == 0;
        Ok(dropped)
    }

    /// The next byte outside records, skipping JSON whitespace (counting lines); None at
    /// the end of the input.
    fn next_significant(&mut self) -> Result<Option<u8>, String> {
        loop {
            while self.pos < self.buf.len() {
                let b = self.buf[self.pos];
                match b {
                    b'\n' => self.newlines += 1,
                    b' ' | b'\t' | b'\r' => {}
                    _ => return Ok(Some(b)),
                }
                self.pos += 1;
            }
            if self.eof {
                return Ok(None);
            }
            self.fill(self.pos)?;
            if self.eof && self.pos >= self.buf.len() {
                return Ok(None);
            }
        }
    }

    /// JSON Lines: the byte range of the next non-blank line (without its newline).
    fn next_line(&mut self) -> Result<Option<(usize, usize)>, String> {
        let Some(first) = self.next_significant()? else { return Ok(None) };
        let line = self.newlines + 1;
        if first != b'{' {
            return Err(format!("{}: expected a JSON object, found {}", self.at(line), shown(first)));
        }
        let mut start = self.pos;
        let mut scan = Scan::default();
        let end = loop {
            let depth = self.limits.depth;
            let newline = self.buf[self.pos..].iter().position(|&b| b == b'\n');
            let stop = newline.map_or(self.buf.len(), |k| self.pos + k);
            for &b in &self.buf[self.pos..stop] {
                if let Err(why) = scan.line_byte(b, depth) {
                    return Err(format!("{}: {why}", self.at(line)));
                }
            }
            self.pos = stop;
            if newline.is_some() {
                self.pos += 1;
                self.newlines += 1;
                break stop;
            }
            if self.pos - start > self.limits.record_bytes {
                return Err(format!("{} is longer than {} bytes", self.at(line), self.limits.record_bytes));
            }
            if self.eof {
                break stop;
            }
            start -= self.fill(start)?;
        };
        self.finish(&scan, start, end, line)?;
        Ok(Some((start, end)))
    }

    /// Checks a finished record: closed, within the byte budget, UTF-8.
    fn finish(&self, scan: &Scan, start: usize, end: usize, line: u64) -> Result<(), String> {
        if end - start > self.limits.record_bytes {
            return Err(format!("{} is longer than {} bytes", self.at(line), self.limits.record_bytes));
        }
        if let Some(why) = scan.unfinished() {
            return Err(format!("{}: {why}", self.at(line)));
        }
        if let Err(e) = std::str::from_utf8(&self.buf[start..end]) {
            return Err(format!("{}: not UTF-8 text (byte {} of the record)", self.at(line), e.valid_up_to() + 1));
        }
        Ok(())
    }

    /// Array: the byte range of the next record (None after the closing `]` and the end
    /// of the input, which may hold nothing but whitespace).
    fn next_array_record(&mut self) -> Result<Option<(usize, usize)>, String> {
        loop {
            let Some(b) = self.next_significant()? else {
                return match self.top {
                    Top::AfterClose => Ok(None),
                    Top::BeforeArray => Err("the file is not a JSON array of records (it is empty)".to_string()),
                    _ => Err(format!("the top-level JSON array is not closed with ']' (after {} records)", self.records)),
                };
            };
            let line = self.newlines + 1;
            self.top = match (self.top, b) {
                (Top::BeforeArray, b'[') => Top::AfterOpen,
                (Top::BeforeArray, _) => {
                    return Err(format!("the file is not a JSON array of records (expected '[', found {})", shown(b)))
                }
                (Top::AfterOpen | Top::AfterComma, b'{') => return self.array_record(line).map(Some),
                (Top::AfterOpen, b']') => Top::AfterClose,
                (Top::AfterRecord, b',') => Top::AfterComma,
                (Top::AfterRecord, b']') => Top::AfterClose,
                (Top::AfterComma, b']') => return Err(format!("line {line}: a comma before the array's closing ']'")),
                (Top::AfterClose, _) => {
                    return Err(format!(
                        "line {line}: data after the closing ']' of the top-level array ({} found); a JSON file holds one array",
                        shown(b)
                    ))
                }
                (Top::AfterRecord, _) => {
                    return Err(format!("line {line}: expected ',' or ']' after record {}, found {}", self.records, shown(b)))
                }
                (Top::AfterOpen | Top::AfterComma, _) => {
                    return Err(format!("{}: expected a JSON object, found {}", self.at(line), shown(b)))
                }
            };
            self.pos += 1;
        }
    }

    /// Scans one record from its `{` to the matching `}`.
    fn array_record(&mut self, line: u64) -> Result<(usize, usize), String> {
        let mut start = self.pos;
        let mut scan = Scan::default();
        loop {
            let depth = self.limits.depth;
            let bytes = &self.buf[self.pos..];
            let mut used = 0;
            let mut closed = false;
            for &b in bytes {
                used += 1;
                if b == b'\n' {
                    self.newlines += 1;
                }
                if let Err(why) = scan.byte(b, depth) {
                    return Err(format!("{}: {why}", self.at(line)));
                }
                if scan.done() {
                    closed = true;
                    break;
                }
            }
            self.pos += used;
            if closed {
                self.finish(&scan, start, self.pos, line)?;
                self.records += 1;
                self.top = Top::AfterRecord;
                return Ok((start, self.pos));
            }
            if self.pos - start > self.limits.record_bytes {
                return Err(format!("{} is longer than {} bytes", self.at(line), self.limits.record_bytes));
            }
            if self.eof {
                return Err(format!(
                    "{}: the file ends inside the record ({})",
                    self.at(line),
                    scan.unfinished().unwrap_or_default()
                ));
            }
            start -= self.fill(start)?;
        }
    }
}

/// A byte for an error message: the character when printable ASCII.
fn shown(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("byte 0x{b:02X}")
    }
}

/// The structure of one record, byte by byte: nesting (with the closer each level needs),
/// strings, escapes and surrogate pairs.
#[derive(Default)]
struct Scan {
    /// The closer each open level expects.
    stack: Vec<u8>,
    started: bool,
    in_string: bool,
    escape: bool,
    /// Hex digits of a `\u` escape still to come, and its value so far.
    hex_left: u8,
    hex: u32,
    /// The last escape was this high surrogate: a `\u` low surrogate must follow at once.
    high: Option<u32>,
}

impl Scan {
    /// The outermost object or array has closed.
    fn done(&self) -> bool {
        self.started && self.stack.is_empty() && !self.in_string
    }

    /// A JSON Lines byte: after the object closes, only whitespace may follow.
    #[inline]
    fn line_byte(&mut self, b: u8, max_depth: usize) -> Result<(), String> {
        if self.done() {
            return match b {
                b' ' | b'\t' | b'\r' => Ok(()),
                _ => Err(format!("data after the JSON object ({}); one object per line", shown(b))),
            };
        }
        self.byte(b, max_depth)
    }

    #[inline]
    fn byte(&mut self, b: u8, max_depth: usize) -> Result<(), String> {
        if self.in_string {
            return self.string_byte(b);
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                if self.stack.len() >= max_depth {
                    return Err(format!("objects and arrays nested deeper than {max_depth} levels"));
                }
                self.started = true;
                self.stack.push(if b == b'{' { b'}' } else { b']' });
            }
            b'}' | b']' => match self.stack.pop() {
                Some(want) if want == b => {}
                Some(want) => return Err(format!("'{}' where '{}' closes the open level", b as char, want as char)),
                None => return Err(format!("a '{}' that closes nothing", b as char)),
            },
            _ => {}
        }
        Ok(())
    }

    #[inline]
    fn string_byte(&mut self, b: u8) -> Result<(), String> {
        if self.hex_left > 0 {
            let digit =
                (b as char).to_digit(16).ok_or_else(|| format!("a malformed \\u escape ({} is not a hex digit)", shown(b)))?;
            self.hex = self.hex * 16 + digit;
            self.hex_left -= 1;
            if self.hex_left == 0 {
                self.surrogate(self.hex)?;
            }
            return Ok(());
        }
        if self.escape {
            self.escape = false;
            match b {
                b'u' => {
                    self.hex_left = 4;
                    self.hex = 0;
                    return Ok(());
                }
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                _ => return Err(format!("an invalid escape in a string ({} after '\\')", shown(b))),
            }
            return self.high.map_or(Ok(()), |high| Err(lone_surrogate(high)));
        } else if b == b'\\' {
            self.escape = true;
            return Ok(());
        } else if b < 0x20 {
            return Err(format!("a raw control character (byte 0x{b:02X}) in a string; JSON writes it as an escape"));
        }
        if let Some(high) = self.high {
            return Err(lone_surrogate(high));
        }
        if b == b'"' {
            self.in_string = false;
        }
        Ok(())
    }

    /// Pairs UTF-16 surrogate escapes: a high one must be followed at once by a low one.
    fn surrogate(&mut self, unit: u32) -> Result<(), String> {
        let low = (0xDC00..=0xDFFF).contains(&unit);
        match self.high.take() {
            Some(high) if !low => Err(lone_surrogate(high)),
            Some(_) => Ok(()),
            None if low => Err(lone_surrogate(unit)),
            None => {
                if (0xD800..=0xDBFF).contains(&unit) {
                    self.high = Some(unit);
                }
                Ok(())
            }
        }
    }

    /// Why the record is not complete, if it is not.
    fn unfinished(&self) -> Option<String> {
        if let Some(high) = self.high {
            Some(lone_surrogate(high))
        } else if self.in_string {
            Some("the record ends inside a string".to_string())
        } else if !self.stack.is_empty() {
            Some(format!("the record ends with {} unclosed levels", self.stack.len()))
        } else {
            None
        }
    }
}

fn lone_surrogate(unit: u32) -> String {
    format!(
        "a lone UTF-16 surrogate escape '\\u{unit:04x}' in a string: it is not a character (write the pair, or the character itself)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// A reader that hands out at most `step` bytes per read, so that records straddle
    /// buffer boundaries at every possible point.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn split(text: &[u8], array: bool, max: usize, step: usize, limits: Limits) -> Result<Vec<String>, String> {
        let reader = Trickle { data: text.to_vec(), pos: 0, step };
        let mut c = JsonChunks::new(reader, array).with_limits(limits);
        let mut out = Vec::new();
        while let Some(chunk) = c.next_chunk(max)? {
            assert!(chunk.iter().filter(|&&b| b == b'\n').count() <= max);
            out.push(String::from_utf8(chunk).unwrap());
        }
        Ok(out)
    }

    fn chunks(text: &str, array: bool, max: usize) -> Result<Vec<String>, String> {
        split(text.as_bytes(), array, max, 1 << 20, Limits::default())
    }

    fn error(text: &str, array: bool) -> String {
        chunks(text, array, 1000).expect_err(text)
    }

    #[test]
    fn array_records_become_lines() {
        let text = "\u{feff}[ {\"a\": \"x],{\\\"y\"}, {\"b\": [1, {\"c\": 2}]},\n {\"d\": \"line\\nbreak\"} ]";
        let got = chunks(text, true, 2).unwrap();
        assert_eq!(got, vec!["{\"a\": \"x],{\\\"y\"}\n{\"b\": [1, {\"c\": 2}]}\n", "{\"d\": \"line\\nbreak\"}\n"]);
        assert!(chunks("[]", true, 5).unwrap().is_empty());
        assert_eq!(chunks("[{\"a\":\n1}]\n\n", true, 5).unwrap(), vec!["{\"a\": 1}\n"]);
    }

    #[test]
    fn lines_are_grouped_and_blank_ones_skipped() {
        let got = chunks("{\"a\":1}\n\n{\"a\":2}\r\n{\"a\":3}", false, 2).unwrap();
        assert_eq!(got, vec!["{\"a\":1}\n{\"a\":2}\r\n", "{\"a\":3}\n"]);
        assert_eq!(chunks("\u{feff}{\"a\":1}\n", false, 2).unwrap(), vec!["{\"a\":1}\n"]);
        assert!(chunks("\n \n", false, 2).unwrap().is_empty());
    }

    /// Opened again at the position after any chunk (blank lines, CRLF, a BOM, a line
    /// longer than the read size), a file gives the chunks a reader from the start gives
    /// from there, and an error further on names the same line.
    #[test]
    fn a_file_read_from_a_chunk_position_continues_it() {
        let dir = std::env::temp_dir().join(format!("mmrecipe-chunks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let long = "x".repeat(3 * READ_SIZE);
        let good =
            format!("\u{feff}{{\"a\":1}}\n\n{{\"a\":2}}\r\n{{\"s\":\"{long}\"}}\n \n{{\"a\":4}}\n{{\"a\":5}}\n{{\"a\":6}}");
        let array =
            format!("\u{feff}[{{\"a\":1}},\n\n{{\"a\":\n2}} ,{{\"s\":\"{long}\"}},\r\n{{\"a\":4}},{{\"a\":5}}\n,{{\"a\":6}}]");
        let cases = [
            (false, good.clone()),
            (false, format!("{good}\n\n{{\"a\": [1}}\n{{\"a\":8}}\n")),
            (true, array.clone()),
            (true, format!("{array}\n, {{\"a\":7}}]")),
        ];
        for (k, (is_array, text)) in cases.iter().enumerate() {
            let is_array = *is_array;
            let path = dir.join(format!("{k}.json"));
            std::fs::write(&path, text).unwrap();
            let mut whole = JsonChunks::open(&path, is_array).unwrap();
            let mut starts = vec![whole.position()];
            let mut want = Vec::new();
            loop {
                match whole.next_chunk(2) {
                    Ok(Some(chunk)) => want.push(Ok(chunk)),
                    Ok(None) => break,
                    Err(e) => {
                        want.push(Err(e));
                        break;
                    }
                }
                starts.push(whole.position());
            }
            assert!(want.len() >= 3, "{k}: several chunks");
            assert_eq!(want.last().unwrap().is_err(), k % 2 == 1, "{k}");
            if k == 1 {
                let e = want.last().unwrap().clone().unwrap_err();
                assert!(e.starts_with("line 10: "), "{e}");
            }
            if k == 3 {
                let e = want.last().unwrap().clone().unwrap_err();
                assert!(e.contains("line 7: data after the closing ']'"), "{e}");
            }
            for (i, &(offset, newlines, records)) in starts.iter().enumerate().skip(1) {
                let mut again = JsonChunks::open_at(&path, is_array, offset, newlines, records).unwrap();
                let mut got = Vec::new();
                loop {
                    match again.next_chunk(2) {
                        Ok(Some(chunk)) => got.push(Ok(chunk)),
                        Ok(None) => break,
                        Err(e) => {
                            got.push(Err(e));
                            break;
                        }
                    }
                }
                assert_eq!(got, want[i..], "{k}: from chunk {i}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn broken_arrays_are_errors() {
        assert!(error("{\"a\": 1}", true).contains("expected '['"));
        assert!(error("[{\"a\": 1}", true).contains("not closed with ']'"));
        assert!(error("[{\"a\": 1", true).contains("record 1 (line 1): the file ends inside the record"));
        assert!(error("[1, 2]", true).contains("record 1 (line 1): expected a JSON object, found '1'"));
        assert!(error("[{\"a\": 1},\n]", true).contains("line 2: a comma before the array's closing ']'"));
        assert!(error("[{\"a\": 1} {\"a\": 2}]", true).contains("expected ',' or ']' after record 1"));
        assert!(error("[{\"a\": 1},, {\"a\": 2}]", true).contains("record 2 (line 1): expected a JSON object, found ','"));
        assert!(error("", true).contains("empty"));
    }

    #[test]
    fn data_after_the_array_is_an_error() {
        let e = error("[{\"a\": 1}]\n\n{\"b\": 2}", true);
        assert!(e.contains("line 3: data after the closing ']'") && e.contains("'{'"), "{e}");
        assert!(error("[]]", true).contains("data after the closing ']'"));
        assert!(chunks("[{\"a\": 1}]  \r\n\t", true, 5).is_ok());
    }

    #[test]
    fn data_after_a_lines_object_is_an_error() {
        let e = error("{\"a\":1}\n{\"a\":2} {\"a\":3}\n", false);
        assert!(e.contains("line 2: data after the JSON object ('{')"), "{e}");
        assert!(error("{\"a\":1}\n[1]\n", false).contains("line 2: expected a JSON object, found '['"));
        assert!(error("{\"a\":1}\n\n{\"a\": [1}\n", false).contains("line 3: '}' where ']' closes"));
        assert!(error("{\"a\":1}}\n", false).contains("line 1: data after the JSON object"));
        assert!(error("{\"a\":\"x\n\"}", false).contains("line 1: the record ends inside a string"));
    }

    #[test]
    fn deep_nesting_is_an_error_naming_the_line() {
        let deep = format!("{{\"a\":1}}\n{}{}\n", "[".repeat(10_000), "]".repeat(10_000));
        let e = error(&deep, false);
        assert!(e.contains("line 2: expected a JSON object"), "{e}");
        let deep = format!("{{\"a\":1}}\n\n{{\"a\":{}{}}}\n", "[".repeat(10_000), "]".repeat(10_000));
        let e = error(&deep, false);
        assert_eq!(e, "line 3: objects and arrays nested deeper than 128 levels");
        // 128 levels (the object and 127 arrays) pass; 129 do not.
        let at = |n: usize| format!("{{\"a\":{}{}}}", "[".repeat(n - 1), "]".repeat(n - 1));
        assert!(chunks(&at(128), false, 1).is_ok());
        assert!(error(&at(129), false).contains("deeper than 128"));
        assert!(chunks(&format!("[{}]", at(128)), true, 1).is_ok());
        assert!(
            error(&format!("[{}, {}]", at(2), at(129)), true).starts_with("record 2 (line 1): objects and arrays nested deeper")
        );
    }

    #[test]
    fn long_records_are_errors() {
        let limits = Limits { depth: MAX_DEPTH, record_bytes: 100 };
        let long = format!("{{\"a\": \"{}\"}}", "x".repeat(200));
        let text = format!("{{\"a\":1}}\n{long}\n");
        let e = split(text.as_bytes(), false, 10, 7, limits).unwrap_err();
        assert_eq!(e, "line 2 is longer than 100 bytes");
        let text = format!("[{{\"a\":1}},\n{long}]");
        let e = split(text.as_bytes(), true, 10, 7, limits).unwrap_err();
        assert_eq!(e, "record 2 (line 2) is longer than 100 bytes");
        let ok = format!("{{\"a\": \"{}\"}}", "x".repeat(90));
        assert!(split(format!("{ok}\n{ok}").as_bytes(), false, 10, 3, limits).is_ok());
    }

    #[test]
    fn lone_surrogates_are_errors() {
        for (text, unit) in [
            (r#"{"a": "\ud800"}"#, "d800"),
            (r#"{"a": "x\uDBFFy"}"#, "dbff"),
            (r#"{"a": "\udc00"}"#, "dc00"),
            (r#"{"a": "\ud800\u0041"}"#, "d800"),
            (r#"{"a": "\ud800\n"}"#, "d800"),
            (r#"{"a": "\ud800\ud800\udc00"}"#, "d800"),
            (r#"{"\ud83d": 1}"#, "d83d"),
        ] {
            let e = error(&format!("{{\"ok\": 1}}\n{text}\n"), false);
            assert!(e.starts_with("line 2: a lone UTF-16 surrogate escape") && e.contains(unit), "{text}: {e}");
            let e = error(&format!("[{{\"ok\": 1}}, {text}]"), true);
            assert!(e.starts_with("record 2 (line 1): a lone UTF-16 surrogate"), "{text}: {e}");
        }
        let pair = r#"{"a": "\ud83d\ude00 \uD83D\uDE00 \u00e9 \\ud800"}"#;
        assert_eq!(chunks(pair, false, 1).unwrap(), vec![format!("{pair}\n")]);
    }

    #[test]
    fn bad_text_is_an_error() {
        let e = split(b"{\"a\": 1}\n{\"a\": \"\xff\"}\n", false, 5, 100, Limits::default()).unwrap_err();
        assert_eq!(e, "line 2: not UTF-8 text (byte 8 of the record)");
        assert!(error("{\"a\": \"tab\there\"}", false).contains("raw control character (byte 0x09)"));
        assert!(error(r#"{"a": "\x"}"#, false).contains("invalid escape"));
        assert!(error(r#"{"a": "\u12g4"}"#, false).contains("malformed \\u escape"));
    }

    #[test]
    fn an_error_ends_the_reading() {
        let mut c = JsonChunks::new(&b"{\"a\":1}\n[2]\n{\"a\":3}\n"[..], false);
        assert!(c.next_chunk(1).unwrap().is_some());
        assert!(c.next_chunk(1).is_err());
        assert_eq!(c.next_chunk(1), Ok(None));
    }

    #[test]
    fn only_regular_files_are_opened() {
        let e = JsonChunks::open(Path::new("/dev/zero"), false).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(JsonChunks::open(&std::env::temp_dir(), true).is_err());
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[ -~\u{e9}\u{1F600}\\n\\t\"\\\\\\[\\]{},]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec(("[a-z\\]\\[{}\",]{0,6}", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn object() -> impl Strategy<Value = Value> {
        prop::collection::vec(("[a-z\\[\\]{}\",:]{0,6}", json_value()), 0..5)
            .prop_map(|kv| Value::Object(kv.into_iter().collect()))
    }

    proptest! {
        /// Every record comes back, in order and equal, in chunks of at most `max`,
        /// whatever the read sizes, layout and blank lines.
        #[test]
        fn records_round_trip(
            records in prop::collection::vec(object(), 0..12),
            array in any::<bool>(),
            pretty in any::<bool>(),
            max in 1usize..5,
            step in 1usize..40,
        ) {
            let show = |v: &Value| if pretty && array { serde_json::to_string_pretty(v).unwrap() } else { v.to_string() };
            let text = if array {
                format!("[\n{}\n]\n", records.iter().map(show).collect::<Vec<_>>().join(",\n  "))
            } else {
                records.iter().map(|r| format!("{}\n\n", show(r))).collect()
            };
            let got = split(text.as_bytes(), array, max, step, Limits::default()).unwrap();
            let back: Vec<Value> = got.iter().flat_map(|c| c.lines()).map(|l| serde_json::from_str(l).unwrap()).collect();
            prop_assert_eq!(back, records);
        }

        /// A lone surrogate put into any string of any record is found, at that record.
        #[test]
        fn lone_surrogates_are_found(
            records in prop::collection::vec(object(), 1..6),
            which in any::<prop::sample::Index>(),
            unit in prop_oneof![0xD800u32..0xDC00, 0xDC00u32..0xE000],
            step in 1usize..40,
        ) {
            let k = which.index(records.len());
            let mut lines: Vec<String> = records.iter().map(|r| r.to_string()).collect();
            lines[k] = format!("{{\"bad\": \"x\\u{unit:04x}y\", \"rest\": {}}}", lines[k]);
            let text = lines.join("\n");
            let e = split(text.as_bytes(), false, 3, step, Limits::default()).unwrap_err();
            prop_assert_eq!(e, format!("line {}: {}", k + 1, lone_surrogate(unit)));
        }

        /// Any non-whitespace after the closing bracket is refused.
        #[test]
        fn trailing_data_is_refused(
            records in prop::collection::vec(object(), 0..4),
            tail in "[ \n]{0,3}[^ \n\r\t]{1,5}",
            step in 1usize..40,
        ) {
            let text = format!("{}{tail}", Value::Array(records));
            let e = split(text.as_bytes(), true, 2, step, Limits::default()).unwrap_err();
            prop_assert!(e.contains("data after the closing ']'"), "{}", e);
        }
    }
}
