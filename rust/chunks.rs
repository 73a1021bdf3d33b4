//! Reading big JSON sources a slice at a time: a JSON Lines file, or a JSON file whose top
//! level is an array of objects (LLaVA-Instruct ships as one), handed out as JSON Lines
//! chunks of at most N records. Strings and escapes are tracked, so a bracket or comma
//! inside a string never splits a record.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

pub struct JsonChunks {
    reader: BufReader<File>,
    array: bool,
    started: bool,
    done: bool,
    /// Unconsumed bytes carried over from the last read.
    pending: Vec<u8>,
    line: u64,
}

impl JsonChunks {
    pub fn open(path: &Path, array: bool) -> std::io::Result<Self> {
        Ok(JsonChunks {
            reader: BufReader::with_capacity(1 << 20, File::open(path)?),
            array,
            started: !array,
            done: false,
            pending: Vec::new(),
            line: 0,
        })
    }

    fn fill(&mut self) -> std::io::Result<bool> {
        let mut buf = vec![0u8; 1 << 20];
        let n = self.reader.read(&mut buf)?;
        self.pending.extend_from_slice(&buf[..n]);
        Ok(n > 0)
    }

    /// The next chunk of at most `max` records as JSON Lines (None at the end).
    pub fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<u8>>, String> {
        if self.done {
            return Ok(None);
        }
        let io = |e: std::io::Error| e.to_string();
        let mut out = Vec::new();
        let mut records = 0;
        if !self.array {
            // JSON Lines: whole lines, blank ones skipped.
            while records < max {
                if let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.pending.drain(..=nl).collect();
                    self.line += 1;
                    if line.iter().any(|b| !b.is_ascii_whitespace()) {
                        out.extend_from_slice(&line);
                        records += 1;
                    }
                } else if !self.fill().map_err(io)? {
                    if self.pending.iter().any(|b| !b.is_ascii_whitespace()) {
                        out.append(&mut self.pending);
                        out.push(b'\n');
                        records += 1;
                    }
                    self.done = true;
                    break;
                }
            }
            return Ok((records > 0).then_some(out));
        }
        let mut pos = 0;
        let (mut depth, mut in_string, mut escape) = (0usize, false, false);
        let mut start: Option<usize> = None;
        loop {
            if pos >= self.pending.len() {
                // Keep the unfinished record; drop what is consumed.
                let keep = start.unwrap_or(pos);
                self.pending.drain(..keep);
                pos -= keep;
                if let Some(s) = start.as_mut() {
                    *s = 0;
                }
                if !self.fill().map_err(io)? {
                    if start.is_some() || !self.started {
                        return Err("the file ends inside the top-level JSON array".to_string());
                    }
                    return Err("the top-level JSON array is not closed with ']'".to_string());
                }
                continue;
            }
            let b = self.pending[pos];
            pos += 1;
            if !self.started {
                match b {
                    b'[' => self.started = true,
                    b' ' | b'\n' | b'\r' | b'\t' => {}
                    0xEF | 0xBB | 0xBF => {} // a UTF-8 byte-order mark
                    _ => return Err("the file is not a JSON array of records (expected '[')".to_string()),
                }
                continue;
            }
            if let Some(s) = start {
                if in_string {
                    if escape {
                        escape = false;
                    } else if b == b'\\' {
                        escape = true;
                    } else if b == b'"' {
                        in_string = false;
                    }
                } else {
                    match b {
                        b'"' => in_string = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                let record = &self.pending[s..pos];
                                // Newlines inside a record are whitespace outside strings.
                                out.extend(record.iter().map(|&c| if c == b'\n' || c == b'\r' { b' ' } else { c }));
                                out.push(b'\n');
                                records += 1;
                                start = None;
                                if records == max {
                                    self.pending.drain(..pos);
                                    return Ok(Some(out));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                continue;
            }
            match b {
                b'{' => {
                    start = Some(pos - 1);
                    depth = 1;
                }
                b']' => {
                    self.done = true;
                    self.pending.clear();
                    return Ok((records > 0).then_some(out));
                }
                b',' | b' ' | b'\n' | b'\r' | b'\t' => {}
                other => return Err(format!("expected a JSON object in the top-level array, found '{}'", other as char)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(text: &str, array: bool, max: usize) -> Result<Vec<String>, String> {
        let path = std::env::temp_dir().join(format!("mmrecipe-chunks-{}-{}.json", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        let mut c = JsonChunks::open(&path, array).unwrap();
        let mut out = Vec::new();
        while let Some(chunk) = c.next_chunk(max)? {
            out.push(String::from_utf8(chunk).unwrap());
        }
        std::fs::remove_file(&path).unwrap();
        Ok(out)
    }

    #[test]
    fn array_records_become_lines() {
        let text = "\u{feff}[ {\"a\": \"x],{\\\"y\"}, {\"b\": [1, {\"c\": 2}]},\n {\"d\": \"line\\nbreak\"} ]";
        let got = chunks(text, true, 2).unwrap();
        assert_eq!(got, vec!["{\"a\": \"x],{\\\"y\"}\n{\"b\": [1, {\"c\": 2}]}\n", "{\"d\": \"line\\nbreak\"}\n"]);
        assert!(chunks("[]", true, 5).unwrap().is_empty());
    }

    #[test]
    fn lines_are_grouped_and_blank_ones_skipped() {
        let got = chunks("{\"a\":1}\n\n{\"a\":2}\n{\"a\":3}", false, 2).unwrap();
        assert_eq!(got, vec!["{\"a\":1}\n{\"a\":2}\n", "{\"a\":3}\n"]);
    }

    #[test]
    fn broken_arrays_are_errors() {
        assert!(chunks("{\"a\": 1}", true, 5).is_err());
        assert!(chunks("[{\"a\": 1}", true, 5).is_err());
        assert!(chunks("[1, 2]", true, 5).is_err());
    }
}
