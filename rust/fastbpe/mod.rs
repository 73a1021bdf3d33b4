//! The fast engine: an exact re-implementation of byte-level BPE `tokenizer.json` shapes
//! (GPT-2 / SmolLM2, Llama-3 and Qwen2 splits, ByteLevel, BPE merges) without a regex
//! engine or `Encoding`s on the hot path. Anything outside the shapes below is refused
//! with a reason, and the HF engine is used.
//!
//! Why not an existing crate: the `bpe` crate of GitHub's rust-gems (and tiktoken-style
//! encoders) merges by token rank and builds its own vocabulary; HF merges by merge rank,
//! which gives other ids wherever the two orders disagree, and its splits are not HF's.

mod bpe;
mod classes;
mod pretok;

pub use bpe::Bpe;
pub use pretok::{Pattern, Pretok, Stage};
use rustc_hash::FxHashMap;
use serde_json::Value;
use tokenizers::Tokenizer;
use unicode_normalization_alignments::{is_nfc_quick, IsNormalized};

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct FastBpe {
    pretok: Pretok,
    bpe: Bpe,
    /// The tokenizer normalizes to NFC: the engine serves only texts already in NFC.
    nfc: bool,
    /// What was recognised, for `recipe check`.
    pub shape: String,
}

/// GPT-2's byte → char map (printable bytes stay, the others move to U+0100 on).
pub fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

impl FastBpe {
    /// The fast engine for this tokenizer, or why it does not apply.
    pub fn new(tk: &Tokenizer) -> Result<FastBpe, String> {
        let json = serde_json::to_value(tk).map_err(|e| format!("the tokenizer does not serialize: {e}"))?;
        Self::from_json(&json)
    }

    pub fn from_json(json: &Value) -> Result<FastBpe, String> {
        let nfc = normalizer(&json["normalizer"])?;
        let (pretok, split_name) = pre_tokenizer(&json["pre_tokenizer"])?;
        if let Some(t) = json["added_tokens"].as_array().and_then(|a| a.iter().find(|t| t["special"] != true)) {
            return Err(format!("the added token {} is not special (only special tokens are cut out)", t["content"]));
        }
        let (bpe, size) = model(&json["model"])?;
        let shape =
            format!("byte-level BPE, {split_name} split, {}{size} tokens", if nfc { "NFC (checked per text), " } else { "" });
        Ok(FastBpe { pretok, bpe, nfc, shape })
    }

    /// Whether `text` can be encoded here: false where the NFC normalizer would change it
    /// (or the quick check cannot tell); the caller then uses the HF engine for that text.
    pub fn serves(&self, text: &str) -> bool {
        !self.nfc || is_nfc_quick(text.chars()) == IsNormalized::Yes
    }

    /// Calls `word(start, end)` for every pre-tokenized word of `text`.
    pub fn words(&self, text: &str, word: &mut dyn FnMut(usize, usize)) {
        self.pretok.split(text, word)
    }

    /// A word's tokens as (id, byte length).
    pub fn encode_word(&self, word: &[u8], out: &mut Vec<(u32, u32)>) {
        self.bpe.encode(word, out)
    }

    /// `text`'s ids (words and BPE, no cache).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut toks = Vec::new();
        self.words(text, &mut |s, e| self.bpe.encode(&text.as_bytes()[s..e], &mut toks));
        toks.into_iter().map(|t| t.0).collect()
    }
}

fn normalizer(v: &Value) -> Result<bool, String> {
    match v["type"].as_str() {
        None if v.is_null() => Ok(false),
        Some("NFC") => Ok(true),
        Some("Sequence") => match v["normalizers"].as_array().map(|a| a.as_slice()) {
            Some([]) => Ok(false),
            Some([one]) => normalizer(one),
            _ => Err("the normalizer is a sequence of several (the fast engine knows none, or NFC)".into()),
        },
        t => Err(format!("the normalizer is {} (the fast engine knows none, or NFC)", t.unwrap_or("unknown"))),
    }
}

fn pre_tokenizer(v: &Value) -> Result<(Pretok, &'static str), String> {
    let list: Vec<&Value> = match v["type"].as_str() {
        Some("Sequence") => v["pretokenizers"].as_array().map(|a| a.iter().collect()).unwrap_or_default(),
        Some(_) => vec![v],
        None => return Err("there is no pre-tokenizer (the fast engine needs ByteLevel)".into()),
    };
    let Some((last, rest)) = list.split_last() else {
        return Err("the pre-tokenizer sequence is empty (the fast engine needs ByteLevel)".into());
    };
    if last["type"] != "ByteLevel" {
        return Err(format!("the last pre-tokenizer is {} (the fast engine needs ByteLevel last)", last["type"]));
    }
    if last["add_prefix_space"] != false {
        return Err("ByteLevel has add_prefix_space (not in the fast engine)".into());
    }
    let mut stages = Vec::new();
    let mut name = "no";
    for p in rest {
        match p["type"].as_str() {
            Some("Digits") => stages.push(Stage::Digits { individual: p["individual_digits"] == true }),
            Some("Split") => {
                let pattern = match p["pattern"]["Regex"].as_str() {
                    Some(GPT2) => Pattern::Gpt2,
                    Some(LLAMA3) => Pattern::Llama3,
                    Some(QWEN2) => Pattern::Qwen2,
                    _ => return Err(format!("the Split pattern {} is not one the fast engine scans", p["pattern"])),
                };
                if p["behavior"] != "Isolated" || p["invert"] != false {
                    return Err("a Split is not Isolated without invert (not in the fast engine)".into());
                }
                name = match pattern {
                    Pattern::Gpt2 => "GPT-2",
                    Pattern::Llama3 => "Llama-3",
                    Pattern::Qwen2 => "Qwen2",
                };
                stages.push(Stage::Split(pattern));
            }
            t => return Err(format!("the pre-tokenizer {} is not in the fast engine", t.unwrap_or("unknown"))),
        }
    }
    if last["use_regex"] != false {
        stages.push(Stage::Split(Pattern::Gpt2));
        name = "GPT-2";
    }
    if stages.iter().any(|s| matches!(s, Stage::Digits { individual: true })) {
        name = match name {
            "GPT-2" => "GPT-2 (digits isolated)",
            "Llama-3" => "Llama-3 (digits isolated)",
            "Qwen2" => "Qwen2 (digits isolated)",
            other => other,
        };
    }
    Ok((Pretok { stages }, name))
}

fn model(m: &Value) -> Result<(Bpe, usize), String> {
    if m["type"] != "BPE" {
        return Err(format!("the model is {} (the fast engine needs BPE)", m["type"]));
    }
    if !m["dropout"].is_null() {
        return Err("BPE dropout is set (random, not in the fast engine)".into());
    }
    for k in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if !(m[k].is_null() || m[k] == "") {
            return Err(format!("BPE {k} is set (not in the fast engine)"));
        }
    }
    let vocab: FxHashMap<&str, u32> = m["vocab"]
        .as_object()
        .ok_or("the BPE vocab is not a map")?
        .iter()
        .map(|(k, v)| Ok((k.as_str(), v.as_u64().and_then(|v| u32::try_from(v).ok()).ok_or("a vocab id is not a u32")?)))
        .collect::<Result<_, String>>()?;
    // A byte whose char is not a token becomes unk, as in HF, unless byte fallback would
    // apply (its `<0xXX>` tokens exist), which the fast engine leaves to HF.
    let chars = byte_chars();
    let mut byte_id = [bpe::MISSING; 256];
    let mut missing = 0;
    for (b, c) in chars.iter().enumerate() {
        let mut buf = [0u8; 4];
        let s = &*c.encode_utf8(&mut buf);
        match vocab.get(s) {
            Some(&id) => byte_id[b] = id,
            None => {
                missing += 1;
                if m["byte_fallback"] == true && s.bytes().all(|x| vocab.contains_key(format!("<0x{x:02X}>").as_str())) {
                    return Err(format!("byte 0x{b:02X} ({c}) takes BPE byte fallback (not in the fast engine)"));
                }
            }
        }
    }
    let unk = match m["unk_token"].as_str().map(|t| vocab.get(t)) {
        Some(Some(&id)) => Some((id, m["fuse_unk"] == true)),
        _ if missing > 0 => {
            return Err(format!(
                "{missing} bytes' chars are not in the vocabulary and there is no unk token (not in the fast engine)"
            ))
        }
        _ => None,
    };
    let char_byte: FxHashMap<char, u8> = chars.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
    let to_bytes = |tok: &str| tok.chars().map(|c| char_byte.get(&c).copied()).collect::<Option<Vec<u8>>>();
    let mut merges: FxHashMap<u64, (u32, u32)> = FxHashMap::default();
    for (rank, mg) in m["merges"].as_array().ok_or("the BPE merges are not a list")?.iter().enumerate() {
        let (a, b) = match mg {
            Value::String(s) => s.split_once(' ').ok_or_else(|| format!("merge {s:?} has no space"))?,
            Value::Array(p) if p.len() == 2 => (p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")),
            _ => return Err(format!("merge {mg} is not a pair")),
        };
        let id = |t: &str| vocab.get(t).copied().ok_or_else(|| format!("merge part {t:?} is not in the vocabulary"));
        let new = id(&format!("{a}{b}"))?;
        // As HF builds its map: a repeated pair keeps its last rank.
        merges.insert(Bpe::pair_key(id(a)?, id(b)?), (rank as u32, new));
    }
    let whole = match m["ignore_merges"].as_bool().unwrap_or(false) {
        true => Some(vocab.iter().filter_map(|(t, &id)| Some((to_bytes(t)?.into_boxed_slice(), id))).collect()),
        false => None,
    };
    Ok((Bpe::new(byte_id, unk, merges, whole), vocab.len()))
}

#[cfg(test)]
pub(crate) mod tests;
