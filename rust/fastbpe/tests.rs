//! The fast engine against HF tokenizers on every shape it accepts. The shapes are the
//! bundled SmolLM2 BPE model behind each family's pre-tokenizer (tokenizer.json is JSON).

use super::*;
use crate::rng::mix64;
use proptest::prelude::*;
use serde_json::json;
use std::sync::OnceLock;

const SMOLLM2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/models/smollm2/tokenizer.json");

#[derive(Debug, Clone, Copy)]
pub enum Family {
    /// As shipped: Digits (individual) then ByteLevel with its GPT-2 regex.
    SmolLm2,
    Gpt2,
    /// Llama-3's Split, ByteLevel without regex, `ignore_merges`.
    Llama3,
    /// Qwen2's Split, NFC.
    Qwen2,
}

pub const FAMILIES: [Family; 4] = [Family::SmolLm2, Family::Gpt2, Family::Llama3, Family::Qwen2];

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// The tokenizer.json of a family.
pub fn family_json(f: Family) -> Value {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(SMOLLM2).unwrap()).unwrap();
    let (normalizer, pre, ignore_merges) = match f {
        Family::SmolLm2 => (v["normalizer"].clone(), v["pre_tokenizer"].clone(), false),
        Family::Gpt2 => (Value::Null, byte_level(true), false),
        Family::Llama3 => (Value::Null, json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]}), true),
        Family::Qwen2 => {
            (json!({"type": "NFC"}), json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}), false)
        }
    };
    v["normalizer"] = normalizer;
    v["pre_tokenizer"] = pre;
    v["model"]["ignore_merges"] = json!(ignore_merges);
    v
}

pub struct Pair {
    pub hf: Tokenizer,
    pub fast: FastBpe,
}

pub fn pair(f: Family) -> &'static Pair {
    static PAIRS: OnceLock<Vec<Pair>> = OnceLock::new();
    let all = PAIRS.get_or_init(|| {
        FAMILIES
            .iter()
            .map(|&f| {
                let v = family_json(f);
                let mut hf: Tokenizer = v.to_string().parse().unwrap();
                hf.set_encode_special_tokens(true); // special-token text is plain text here
                let fast = FastBpe::new(&hf).unwrap_or_else(|e| panic!("{f:?}: {e}"));
                Pair { hf, fast }
            })
            .collect()
    });
    &all[f as usize]
}

/// Compares one text; `None` when the fast engine does not serve it (NFC changes it).
pub fn check(f: Family, text: &str) -> Option<Result<(), String>> {
    let p = pair(f);
    if !p.fast.serves(text) {
        return None;
    }
    let want = p.hf.encode(text, false).unwrap().get_ids().to_vec();
    let got = p.fast.encode(text);
    Some(if got == want { Ok(()) } else { Err(format!("{f:?} {text:?}: fast {got:?} hf {want:?}")) })
}

/// Fragments for the generated strings: one char of every general category, combining
/// marks, emoji ZWJ sequences, CJK, RTL, whitespace and line breaks, digits, contractions
/// in both cases (and `ſ`, which `(?i)` folds to s), specials typed as text.
pub const FRAGMENTS: &[&str] = &[
    "A",
    "a",
    "ǅ",
    "ʰ",
    "א",
    "\u{301}",
    "\u{903}",
    "\u{20DD}",
    "5",
    "Ⅻ",
    "½",
    "_",
    "-",
    "(",
    ")",
    "«",
    "»",
    "!",
    "+",
    "$",
    "^",
    "©",
    "\u{2003}",
    "\u{2028}",
    "\u{2029}",
    "\u{7}",
    "\u{200B}",
    "\u{E000}",
    "\u{378}",
    "\u{FFFF}",
    "\u{10FFFD}",
    "e\u{301}",
    "\u{1100}\u{1161}",
    "n\u{303}\u{323}",
    "👩\u{200D}💻",
    "🏳\u{FE0F}\u{200D}🌈",
    "👍🏽",
    "🇯🇵",
    "日本語",
    "中文字",
    "한국어",
    "שלום",
    "مرحبا",
    "\u{200F}",
    "ا\u{64B}",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    " \n ",
    "\u{3000}",
    "\u{A0}",
    "\u{85}",
    "\u{B}",
    "\u{C}",
    "0",
    "12",
    "123",
    "1234",
    "12345",
    "1234567",
    "١٢٣",
    "०१",
    "³",
    "'s",
    "'S",
    "'t",
    "'T",
    "'re",
    "'RE",
    "'Re",
    "'ve",
    "'VE",
    "'m",
    "'M",
    "'ll",
    "'LL",
    "'lL",
    "'d",
    "'D",
    "'ſ",
    "'",
    "''",
    "don't",
    "DON'T",
    "I'M",
    "Hello",
    " world",
    "x=1;",
    "<|im_end|>",
    "<image>",
    "café",
    "ÀÉ",
    "naïve",
    "...",
    "—",
    "“quoted”",
    "http://a.b/c?d=1",
    "\u{0}",
    "\u{FEFF}",
    "\u{D7FF}",
    "\u{E0001}",
    "ﬁ",
    "ǈ",
    "ß",
    "İ",
    "K",
];

fn text_strategy() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(FRAGMENTS).prop_map(|s| s.to_string()),
        1 => any::<char>().prop_map(|c| c.to_string()),
        1 => "[ \t\n\r]{1,6}",
        1 => "[0-9]{1,12}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn fast_equals_hf_on_generated_text(text in text_strategy()) {
        for f in FAMILIES {
            if let Some(r) = check(f, &text) {
                prop_assert!(r.is_ok(), "{}", r.unwrap_err());
            }
        }
    }

    /// Words of bytes, long ones included (the heap path), through the model alone.
    #[test]
    fn bpe_equals_hf_model(word in prop::collection::vec(prop::sample::select(b" aeinrst.\n\xC3\xA9\xE6\x97\xA5-=0\x00\x04\x07".to_vec()), 1..200)) {
        use tokenizers::Model;
        let p = pair(Family::SmolLm2);
        let chars = byte_chars();
        let mapped: String = word.iter().map(|&b| chars[b as usize]).collect();
        let want: Vec<(u32, u32)> =
            p.hf.get_model().tokenize(&mapped).unwrap().iter().map(|t| (t.id, mapped[t.offsets.0..t.offsets.1].chars().count() as u32)).collect();
        let mut got = Vec::new();
        p.fast.encode_word(&word, &mut got);
        prop_assert_eq!(got, want);
    }
}

#[test]
fn every_family_is_recognised_and_exact_on_samples() {
    let samples = [
        "Hello world! It's 2024, and we'LL see   multiple   spaces.\n\n\tTabs\r\nand 1234567 digits.",
        "日本語のテキスト、中文，한국어 — مرحبا بالعالم 👩\u{200D}💻 🇯🇵",
        "def f(x):\n    return x**2  # comment\n\n\n",
        "   leading and trailing   ",
        "'s's'S 'ſ ''t",
    ];
    for f in FAMILIES {
        assert!(pair(f).fast.shape.contains("byte-level BPE"), "{f:?}");
        for s in samples {
            check(f, s).unwrap_or_else(|| panic!("{f:?} serves {s:?}")).unwrap();
        }
    }
}

/// `ignore_merges`: every vocabulary token as a word, through both models, and the
/// tokens merges alone would split exist (so the rule is exercised).
#[test]
fn ignore_merges_equals_hf_on_every_token() {
    use tokenizers::Model;
    let (with, without) = (pair(Family::Llama3), pair(Family::Gpt2));
    let byte_of: std::collections::HashMap<char, u8> = byte_chars().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
    let mut split_by_merges = 0;
    for token in with.hf.get_vocab(false).keys() {
        let Some(bytes) = token.chars().map(|c| byte_of.get(&c).copied()).collect::<Option<Vec<u8>>>() else { continue };
        let want: Vec<u32> = with.hf.get_model().tokenize(token).unwrap().iter().map(|t| t.id).collect();
        let mut got = Vec::new();
        with.fast.encode_word(&bytes, &mut got);
        assert_eq!(got.iter().map(|t| t.0).collect::<Vec<_>>(), want, "{token:?}");
        let mut merged = Vec::new();
        without.fast.encode_word(&bytes, &mut merged);
        split_by_merges += (merged.len() > 1) as usize;
    }
    assert!(split_by_merges > 0);
}

#[test]
fn nfc_family_refuses_what_nfc_changes() {
    let p = pair(Family::Qwen2);
    assert!(p.fast.serves("café, 日本語"));
    assert!(!p.fast.serves("cafe\u{301}"), "a decomposed é is changed by NFC");
    assert!(pair(Family::Llama3).fast.serves("cafe\u{301}"));
}

#[test]
fn shapes_outside_the_list_are_refused_with_a_reason() {
    let base = family_json(Family::Llama3);
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("normalizer", Box::new(|v| v["normalizer"] = json!({"type": "Lowercase"}))),
        ("add_prefix_space", Box::new(|v| v["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = json!(true))),
        ("Split pattern", Box::new(|v| v["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!(r"\s+"))),
        ("Metaspace", Box::new(|v| v["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "▁"}))),
        ("dropout", Box::new(|v| v["model"]["dropout"] = json!(0.1))),
        ("not special", Box::new(|v| v["added_tokens"][0]["special"] = json!(false))),
        ("BPE", Box::new(|v| v["model"]["type"] = json!("WordPiece"))),
        ("no unk token", Box::new(|v| v["model"]["unk_token"] = Value::Null)),
        (
            "byte fallback",
            Box::new(|v| {
                v["model"]["byte_fallback"] = json!(true);
                let vocab = v["model"]["vocab"].as_object_mut().unwrap();
                vocab.insert("<0xC4>".into(), json!(60000));
                vocab.insert("<0x84>".into(), json!(60001));
            }),
        ),
    ];
    for (want, edit) in cases {
        let mut v = base.clone();
        edit(&mut v);
        match FastBpe::from_json(&v) {
            Ok(_) => panic!("{want}: accepted"),
            Err(e) => assert!(e.contains(want), "{want}: {e}"),
        }
    }
}

/// Oniguruma's `(?i:...)` folds exactly the chars `contraction` folds.
#[test]
fn contraction_case_folding_equals_oniguruma() {
    let re = onig::Regex::new(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)").unwrap();
    let mut matched = 0;
    for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
        for tail in ["", "e", "E", "l", "L"] {
            let s = format!("'{c}{tail}");
            let want = re.find(&s).filter(|m| m.0 == 0).map(|m| m.1 - 1);
            assert_eq!(pretok_contraction(&s), want, "{s:?}");
            matched += want.is_some() as usize;
        }
    }
    assert!(matched > 20);
}

fn pretok_contraction(s: &str) -> Option<usize> {
    pretok::contraction_for_tests(s)
}

/// The large differential: `cargo test --release --lib fastbpe -- --ignored --nocapture`
/// (FASTBPE_CASES strings per shape, 1,000,000 by default).
#[test]
#[ignore]
fn differential_million() {
    let n: u64 = std::env::var("FASTBPE_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    for f in FAMILIES {
        let (mut served, mut chars) = (0u64, 0usize);
        for i in 0..n {
            let text = generated(i ^ (f as u64) << 56);
            chars += text.chars().count();
            if let Some(r) = check(f, &text) {
                r.unwrap();
                served += 1;
            }
        }
        println!("{f:?}: {n} strings ({chars} chars), {served} served by the fast engine, all equal");
        assert!(served > n / 2);
    }
}

/// A string from a counter: fragments, random chars of any plane, ASCII runs.
pub fn generated(seed: u64) -> String {
    let mut s = String::new();
    let mut z = mix64(seed);
    let parts = z % 24;
    for k in 0..parts {
        z = mix64(z ^ k);
        match z % 8 {
            0..=4 => s.push_str(FRAGMENTS[(z >> 8) as usize % FRAGMENTS.len()]),
            5 => {
                let u = ((z >> 8) % 0x11_0000) as u32;
                s.push(char::from_u32(u).unwrap_or('\u{FFFD}'));
            }
            6 => {
                for j in 0..(z >> 8) % 6 + 1 {
                    s.push([' ', '\t', '\n', '\r'][((z >> (12 + 2 * j)) & 3) as usize]);
                }
            }
            _ => {
                for j in 0..(z >> 8) % 12 + 1 {
                    s.push((b'0' + ((z >> (12 + 4 * j)) % 10) as u8) as char);
                }
            }
        }
    }
    s
}
