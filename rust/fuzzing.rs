//! Fuzz harnesses for what parses untrusted input: the JSON chunk splitter, instruction
//! templates, image headers and the image token rule. Each takes arbitrary bytes and
//! panics only when an invariant breaks; the cargo-fuzz targets in `fuzz/` call them, and
//! the tests below run them on the seed corpus and deterministic mutants of it.

use crate::chunks::{JsonChunks, Limits};
use crate::instruct::{self, Piece, Template};
use crate::media;
use crate::plan::ImagePlan;
use serde_json::{Map, Value};
use std::io::Read;

type Record = Map<String, Value>;

/// A reader handing out at most `step` bytes per read: records straddle every boundary.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn split(data: &[u8], array: bool, max: usize, step: usize, limits: Limits) -> Result<Vec<Vec<u8>>, String> {
    let mut chunks = JsonChunks::new(Trickle { data, step }, array).with_limits(limits);
    let mut lines = Vec::new();
    while let Some(chunk) = chunks.next_chunk(max)? {
        assert!(chunk.ends_with(b"\n"), "a chunk ends with a newline");
        let before = lines.len();
        lines.extend(chunk[..chunk.len() - 1].split(|&b| b == b'\n').map(<[u8]>::to_vec));
        assert!(lines.len() - before <= max, "at most {max} records per chunk");
    }
    assert_eq!(chunks.next_chunk(max), Ok(None), "the end stays the end");
    Ok(lines)
}

/// What a strict JSON parser makes of the file: the records, or None when it refuses it.
fn reference(data: &[u8], array: bool) -> Option<Vec<Record>> {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    if array {
        return serde_json::from_slice(data).ok();
    }
    let blank = |l: &&[u8]| l.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r'));
    data.split(|&b| b == b'\n').filter(|l| !blank(l)).map(|l| serde_json::from_slice(l).ok()).collect()
}

/// The JSON chunk splitter. Byte 0 picks the format, the chunk size and the read size.
/// Whatever a strict parser accepts comes back record for record; whatever the splitter
/// accepts, if each record parses, the strict parser accepts whole (so no trailing data,
/// missing comma or stray bracket slips through); a tiny byte budget changes nothing but
/// may refuse long records.
pub fn json_chunks(data: &[u8]) {
    let Some((&knobs, text)) = data.split_first() else { return };
    let array = knobs & 1 == 1;
    let max = 1 + (knobs >> 1 & 3) as usize;
    let step = [1, 3, 64, 1 << 20][(knobs >> 3 & 3) as usize];
    let got = split(text, array, max, step, Limits::default());
    let want = reference(text, array);
    let parsed: Option<Vec<Record>> = match &got {
        Ok(lines) => lines.iter().map(|l| serde_json::from_slice(l).ok()).collect(),
        Err(why) => {
            assert!(want.is_none(), "the splitter refused what serde_json reads: {why}");
            None
        }
    };
    if let Some(records) = &parsed {
        assert_eq!(want.as_ref(), Some(records), "the records of an accepted file are the file's");
    }
    if let Some(want) = &want {
        assert_eq!(parsed.as_ref(), Some(want));
    }
    let tight = Limits { depth: 4, record_bytes: 24 };
    match (split(text, array, max, step, tight), &got) {
        (Ok(lines), Ok(all)) => assert_eq!(&lines, all, "tighter limits change nothing they accept"),
        (Ok(_), Err(why)) => panic!("tighter limits accepted what the default refused: {why}"),
        (Err(_), _) => {}
    }
}

/// Instruction templates: a parsed template written back (braces doubled, fields in
/// braces) parses to itself, and filling puts each value where its field was.
pub fn instruct_template(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else { return };
    let Ok(t) = Template::parse(src) else { return };
    let mut written = String::new();
    let mut expected = String::new();
    for p in &t.pieces {
        match p {
            Piece::Text(s) => {
                assert!(!s.is_empty());
                written.push_str(&s.replace('{', "{{").replace('}', "}}"));
                expected.push_str(s);
            }
            Piece::Field(f) => {
                assert!(!f.is_empty() && f.chars().all(|c| c.is_alphanumeric() || c == '_'), "field {f:?}");
                written.push_str(&format!("{{{f}}}"));
                expected.push_str(&format!("<{f}>"));
            }
        }
    }
    assert_eq!(Template::parse(&written).as_ref(), Ok(&t), "{written:?}");
    let values: Vec<String> = t.fields().map(|f| format!("<{f}>")).collect();
    let filled = t.fill(|f| values.iter().find(|v| v[1..v.len() - 1] == *f).map(String::as_str)).unwrap();
    assert_eq!(filled, expected);
    assert_eq!(t.fill(|_| None).is_ok(), t.fields().next().is_none());
    let n = 1 + data.len() % 7;
    assert!(instruct::choose(data.len() as u64, 7, 3, 1, n) < n);
}

fn plans() -> [ImagePlan; 2] {
    let fixed = r#"{"placeholder":"<image>","token":"<image>","count":576}"#;
    let dynamic = r#"{"placeholder":"<image>","token":"<image>"}"#;
    [serde_json::from_str(fixed).unwrap(), serde_json::from_str(dynamic).unwrap()]
}

/// Image headers, from a file holding the bytes: never a panic or an unbounded read, the
/// file reader agrees with the in-memory one, and a count stays within the budget.
pub fn image_header(data: &[u8]) {
    thread_local! {
        static PATH: std::path::PathBuf = std::env::temp_dir().join(format!(
            "mmrecipe-fuzz-image-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
    }
    PATH.with(|path| {
        std::fs::write(path, data).unwrap();
        let from_file = media::image_size(path);
        let from_memory = media::header_size(std::io::Cursor::new(data));
        if from_file.as_ref().is_err_and(|e| e.contains("no image header found")) {
            return; // the file reader's byte budget, which the in-memory one lacks
        }
        assert_eq!(from_file.is_ok(), from_memory.is_ok(), "{from_file:?} / {from_memory:?}");
        if let (Ok(a), Ok(b)) = (&from_file, &from_memory) {
            assert_eq!(a, b);
        }
        for plan in plans() {
            if let Ok(n) = media::image_tokens(&plan, path) {
                assert!(n as u64 <= media::MAX_IMAGE_TOKENS && n > 0);
            }
        }
    });
}

/// The token rule over arbitrary sizes and settings: no panic or overflow, and the budget
/// holds exactly: a count is given when within `MAX_IMAGE_TOKENS`, an error otherwise.
pub fn image_rule(data: &[u8]) {
    let mut words = data.chunks(8).map(|c| c.iter().fold(0u64, |w, &b| w << 8 | b as u64));
    let mut next = || words.next().unwrap_or(0);
    let (width, height) = (next() % (1 << 40), next() % (1 << 40));
    let mut plan = plans()[1].clone();
    plan.patch = (next() % 64) as u32;
    plan.merge = (next() % 8) as u32;
    plan.min_pixels = next() >> (next() % 64);
    plan.max_pixels = next() >> (next() % 64);
    let tokens = media::dynamic_tokens(&plan, width, height);
    assert_eq!(media::dynamic_count(&plan, width, height) as u64, tokens.min(u32::MAX as u64));
    match media::tokens_for(&plan, width, height) {
        Ok(n) => assert_eq!(n as u64, tokens),
        Err(why) => assert!(tokens > media::MAX_IMAGE_TOKENS && why.contains(&format!("gives {tokens} tokens")), "{why}"),
    }
    let _ = media::check_plan(&plan);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Deterministic mutants of the seed files: bit flips, byte runs, splices and cuts,
    /// driven by a fixed xorshift.
    fn mutants(seeds: &[Vec<u8>], n: usize) -> Vec<Vec<u8>> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move |below: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below.max(1) as u64) as usize
        };
        (0..n)
            .map(|_| {
                let mut m = seeds[rand(seeds.len())].clone();
                for _ in 0..1 + rand(4) {
                    let at = rand(m.len() + 1);
                    match rand(5) {
                        0 if !m.is_empty() => {
                            let k = rand(m.len());
                            m[k] ^= 1 << rand(8);
                        }
                        1 => m
                            .splice(at..at, {
                                const BYTES: &[u8] = b"{}[]\",:\\u0d8 \n";
                                std::iter::repeat_n(BYTES[rand(BYTES.len())], 1 + rand(8))
                            })
                            .for_each(drop),
                        2 => {
                            let other = &seeds[rand(seeds.len())];
                            let from = rand(other.len() + 1);
                            m.splice(at..at, other[from..].iter().copied().take(rand(64))).for_each(drop);
                        }
                        3 => m.truncate(at),
                        _ => m.insert(at, rand(256) as u8),
                    }
                }
                m
            })
            .collect()
    }

    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
        assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
        seeds
    }

    fn smoke(target: &str, harness: fn(&[u8]), n: usize) {
        let seeds = corpus(target);
        for input in seeds.iter().chain(&mutants(&seeds, n)) {
            harness(input);
        }
    }

    #[test]
    fn json_chunks_smoke() {
        smoke("json_chunks", json_chunks, 3000);
    }

    #[test]
    fn instruct_template_smoke() {
        smoke("instruct_template", instruct_template, 3000);
    }

    #[test]
    fn image_header_smoke() {
        smoke("image_header", image_header, 2000);
    }

    #[test]
    fn image_rule_smoke() {
        smoke("image_rule", image_rule, 3000);
    }
}
