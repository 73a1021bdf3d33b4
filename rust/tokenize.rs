//! Tokenization of a rendered conversation with response-only loss masks.
//!
//! The text is cut at the template's own special tokens and at image placeholders; the
//! pieces between cuts are tokenized with special-token matching off. HF tokenizers always
//! split at special tokens, so this yields exactly the ids of tokenizing the whole text,
//! except that special-token text typed inside a message stays plain text: data never
//! becomes a control token. A token is trained when its bytes overlap a response span
//! (transformers' `assistant_masks` rule); the special token right after a response (its
//! end-of-turn) is trained too when `train_on_eos` is set.

use crate::error::{Error, Result};
use crate::plan::TrainOn;
use crate::render::{Rendered, Role};
use aho_corasick::{AhoCorasick, MatchKind};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

static NEXT_TOKENIZER_ID: AtomicU64 = AtomicU64::new(1);
const WORD_CACHE_LIMIT: usize = 1 << 18;

/// (owner tokenizer id, word → [(token id, byte length)]).
type WordCache = (u64, HashMap<String, Box<[(u32, u32)]>>);

thread_local! {
    /// Per worker thread: pre-tokenized word → (token id, byte length) list, for the
    /// tokenizer with the given id. Lock-free, unlike the model's shared cache.
    static WORD_CACHE: RefCell<WordCache> = RefCell::new((0, HashMap::new()));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRun {
    /// Position of the first image token in the sample.
    pub pos: u32,
    /// Number of image tokens (start/end wrappers excluded).
    pub len: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// 1 where the token is trained.
    pub mask: Vec<u8>,
    /// Byte range of every token in the rendered text.
    pub offsets: Vec<(u32, u32)>,
    pub images: Vec<ImageRun>,
}

impl Encoded {
    pub fn trained(&self) -> usize {
        self.mask.iter().filter(|&&m| m != 0).count()
    }
}

/// How image placeholders expand.
#[derive(Debug, Clone)]
pub struct ImageTokens {
    pub placeholder: String,
    pub token: u32,
    pub start: Option<u32>,
    pub end: Option<u32>,
}

pub struct TextTokenizer {
    tokenizer: Tokenizer,
    /// Byte-level BPE without a normalizer or non-special added tokens: words are
    /// tokenized through the per-thread cache instead of building full `Encoding`s.
    fast: bool,
    id: u64,
    /// Patterns: the special tokens, then the image placeholder (when set).
    cutter: AhoCorasick,
    special_ids: Vec<u32>,
    image: Option<ImageTokens>,
}

#[derive(Debug, Clone, Copy)]
enum Cut {
    Special(u32),
    Image,
}

impl TextTokenizer {
    pub fn from_file(path: &str) -> Result<Tokenizer> {
        let mut tk = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("cannot load {path}: {e}")))?;
        tk.with_truncation(None).map_err(|e| Error::Tokenizer(e.to_string()))?;
        tk.with_padding(None);
        Ok(tk)
    }

    /// `image`: (placeholder, token, start, end) as text; each token must exist.
    pub fn new(mut tokenizer: Tokenizer, image: Option<(&str, &str, Option<&str>, Option<&str>)>) -> Result<Self> {
        tokenizer.set_encode_special_tokens(true);
        let mut specials: Vec<(String, u32)> = tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content.clone(), *id))
            .collect();
        specials.sort();
        let lookup = |name: &str, what: &str| {
            tokenizer.token_to_id(name).ok_or_else(|| {
                Error::Tokenizer(format!("the {what} '{name}' is not in the tokenizer's vocabulary (add it to tokenizer.json)"))
            })
        };
        let image = match image {
            Some((placeholder, token, start, end)) => Some(ImageTokens {
                placeholder: placeholder.to_string(),
                token: lookup(token, "image token")?,
                start: start.map(|s| lookup(s, "image start token")).transpose()?,
                end: end.map(|s| lookup(s, "image end token")).transpose()?,
            }),
            None => None,
        };
        if let Some(img) = &image {
            if img.placeholder.is_empty() {
                return Err(Error::plan("model.image.placeholder", "must not be empty"));
            }
            // The placeholder may itself be a special token (LLaVA's `<image>`): it is
            // always an image placeholder then, even when typed in the data.
            specials.retain(|(s, _)| *s != img.placeholder);
        }
        let mut patterns: Vec<&str> = specials.iter().map(|(s, _)| s.as_str()).collect();
        if let Some(img) = &image {
            patterns.push(&img.placeholder);
        }
        let cutter = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let special_ids = specials.iter().map(|(_, id)| *id).collect();
        let fast = byte_level_bpe(&tokenizer);
        let id = NEXT_TOKENIZER_ID.fetch_add(1, Ordering::Relaxed);
        Ok(TextTokenizer { tokenizer, fast, id, cutter, special_ids, image })
    }

    /// Turns the fast path off (tests compare both paths).
    pub fn set_fast(&mut self, on: bool) {
        self.fast = on && byte_level_bpe(&self.tokenizer);
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The id image placeholders expand to.
    pub fn image_token(&self) -> Option<u32> {
        self.image.as_ref().map(|i| i.token)
    }

    /// Whether image runs are wrapped in start / end tokens.
    pub fn image_wrappers(&self) -> (bool, bool) {
        self.image.as_ref().map(|i| (i.start.is_some(), i.end.is_some())).unwrap_or((false, false))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    fn cut_kind(&self, pattern: usize) -> Cut {
        if pattern < self.special_ids.len() {
            Cut::Special(self.special_ids[pattern])
        } else {
            Cut::Image
        }
    }

    fn encode_piece(&self, text: &str, base: usize, out: &mut Encoded, kinds: &mut Vec<u8>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        if self.fast {
            self.encode_words(text, base, out)?;
            kinds.resize(out.ids.len(), KIND_TEXT);
            return Ok(());
        }
        let enc = self.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        out.ids.extend_from_slice(enc.get_ids());
        out.offsets.extend(enc.get_offsets().iter().map(|&(s, e)| ((base + s) as u32, (base + e) as u32)));
        kinds.resize(out.ids.len(), KIND_TEXT);
        Ok(())
    }

    /// The fast path: pre-tokenize, then each word's tokens from the per-thread cache.
    /// Byte-level: every original byte is one character of the word, so a token's byte
    /// length is its character count.
    fn encode_words(&self, text: &str, base: usize, out: &mut Encoded) -> Result<()> {
        let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
        let mut pre = PreTokenizedString::from(text);
        if let Some(p) = self.tokenizer.get_pre_tokenizer() {
            p.pre_tokenize(&mut pre).map_err(err)?;
        }
        WORD_CACHE.with(|cell| {
            let mut cache = cell.borrow_mut();
            if cache.0 != self.id || cache.1.len() > WORD_CACHE_LIMIT {
                cache.1.clear();
                cache.0 = self.id;
            }
            for (word, (start, _), _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                if !cache.1.contains_key(word) {
                    let toks = self.tokenizer.get_model().tokenize(word).map_err(err)?;
                    let entry: Box<[(u32, u32)]> = toks.iter().map(|t| (t.id, t.value.chars().count() as u32)).collect();
                    cache.1.insert(word.to_string(), entry);
                }
                let mut pos = (base + start) as u32;
                for &(id, len) in cache.1[word].iter() {
                    out.ids.push(id);
                    out.offsets.push((pos, pos + len));
                    pos += len;
                }
            }
            Ok(())
        })
    }

    /// Tokenizes a rendered conversation. `roles[i]` is the role of the message whose span
    /// is `rendered.spans[i]`; `image_counts` gives the tokens of each image, in order.
    pub fn encode(
        &self,
        rendered: &Rendered,
        roles: &[Role],
        image_counts: &[u32],
        train_on: TrainOn,
        train_on_eos: bool,
    ) -> std::result::Result<Encoded, String> {
        let text = rendered.text.as_str();
        let inside_content = |s: usize, e: usize| rendered.spans.iter().flatten().any(|&(a, b)| s < b && e > a);
        let mut out = Encoded::default();
        let mut kinds: Vec<u8> = Vec::new();
        let mut pos = 0usize;
        let mut n_images = 0usize;
        for m in self.cutter.find_iter(text) {
            let cut = self.cut_kind(m.pattern().as_usize());
            if let Cut::Special(_) = cut {
                if inside_content(m.start(), m.end()) {
                    continue; // special-token text typed in the data: stays plain text
                }
            }
            self.encode_piece(&text[pos..m.start()], pos, &mut out, &mut kinds).map_err(|e| e.to_string())?;
            let span = (m.start() as u32, m.end() as u32);
            match cut {
                Cut::Special(id) => {
                    out.ids.push(id);
                    out.offsets.push(span);
                    kinds.push(KIND_SPECIAL);
                }
                Cut::Image => {
                    let img = self.image.as_ref().expect("image pattern only exists with an image config");
                    let Some(&count) = image_counts.get(n_images) else {
                        return Err(format!(
                            "the text has more '{}' placeholders than the sample has images ({})",
                            img.placeholder,
                            image_counts.len()
                        ));
                    };
                    n_images += 1;
                    let first = out.ids.len() as u32 + img.start.is_some() as u32;
                    let run = img.start.into_iter().chain(std::iter::repeat_n(img.token, count as usize)).chain(img.end);
                    for id in run {
                        out.ids.push(id);
                        out.offsets.push(span);
                        kinds.push(KIND_IMAGE);
                    }
                    out.images.push(ImageRun { pos: first, len: count });
                }
            }
            pos = m.end();
        }
        self.encode_piece(&text[pos..], pos, &mut out, &mut kinds).map_err(|e| e.to_string())?;
        if n_images != image_counts.len() {
            let ph = self.image.as_ref().map(|i| i.placeholder.as_str()).unwrap_or("<image>");
            return Err(format!(
                "the sample has {} images but its text has {} '{ph}' placeholders",
                image_counts.len(),
                n_images
            ));
        }
        out.mask = response_mask(rendered, roles, &out.offsets, &kinds, train_on, train_on_eos);
        Ok(out)
    }
}

/// Whether the fast word path gives exactly `Tokenizer::encode`'s ids: a BPE model
/// behind a byte-level pre-tokenizer, no normalizer, no non-special added tokens.
fn byte_level_bpe(tk: &Tokenizer) -> bool {
    let json = |v: serde_json::Result<serde_json::Value>| v.unwrap_or(serde_json::Value::Null);
    let normalizer = json(serde_json::to_value(tk.get_normalizer()));
    let no_normalizer = normalizer.is_null()
        || (normalizer["type"] == "Sequence" && normalizer["normalizers"].as_array().is_some_and(|a| a.is_empty()));
    let pre = json(serde_json::to_value(tk.get_pre_tokenizer())).to_string();
    let is_bpe = matches!(tk.get_model(), tokenizers::ModelWrapper::BPE(_));
    let only_special_added = tk.get_added_tokens_decoder().values().all(|t| t.special);
    no_normalizer && pre.contains("\"ByteLevel\"") && is_bpe && only_special_added
}

const KIND_TEXT: u8 = 0;
const KIND_SPECIAL: u8 = 1;
const KIND_IMAGE: u8 = 2;

fn response_mask(
    rendered: &Rendered,
    roles: &[Role],
    offsets: &[(u32, u32)],
    kinds: &[u8],
    train_on: TrainOn,
    train_on_eos: bool,
) -> Vec<u8> {
    if train_on == TrainOn::All {
        return kinds.iter().map(|&k| (k != KIND_IMAGE) as u8).collect();
    }
    let mut spans: Vec<(u32, u32)> = rendered
        .spans
        .iter()
        .zip(roles)
        .filter(|(_, r)| **r == Role::Assistant)
        .filter_map(|(s, _)| s.map(|(a, b)| (a as u32, b as u32)))
        .collect();
    if train_on == TrainOn::LastAssistant && spans.len() > 1 {
        let last = *spans.iter().max().unwrap();
        spans = vec![last];
    }
    spans.sort_unstable();
    let mut mask = vec![0u8; offsets.len()];
    let mut j = 0;
    for (t, (&(s, e), &kind)) in offsets.iter().zip(kinds).enumerate() {
        if kind == KIND_IMAGE {
            continue;
        }
        while j < spans.len() && spans[j].1 < s {
            j += 1;
        }
        let mut k = j;
        while k < spans.len() && spans[k].0 <= s.max(e.saturating_sub(1)) {
            let (a, b) = spans[k];
            let overlaps = s < b && e > a;
            let is_eos = train_on_eos && kind == KIND_SPECIAL && s == b;
            if overlaps || is_eos {
                mask[t] = 1;
                break;
            }
            k += 1;
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::{builtin, ChatRenderer, Message};
    use proptest::prelude::*;

    const TOKENIZER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/models/smollm2/tokenizer.json");

    fn pair() -> &'static (TextTokenizer, TextTokenizer) {
        static PAIR: std::sync::OnceLock<(TextTokenizer, TextTokenizer)> = std::sync::OnceLock::new();
        PAIR.get_or_init(load_pair)
    }

    fn load_pair() -> (TextTokenizer, TextTokenizer) {
        let fast =
            TextTokenizer::new(TextTokenizer::from_file(TOKENIZER).unwrap(), Some(("<image>", "<image>", None, None))).unwrap();
        let mut slow =
            TextTokenizer::new(TextTokenizer::from_file(TOKENIZER).unwrap(), Some(("<image>", "<image>", None, None))).unwrap();
        assert!(fast.fast, "the bundled tokenizer is byte-level BPE");
        slow.set_fast(false);
        (fast, slow)
    }

    fn renderer() -> &'static ChatRenderer {
        static R: std::sync::OnceLock<ChatRenderer> = std::sync::OnceLock::new();
        R.get_or_init(|| ChatRenderer::new(builtin("chatml").unwrap(), None, None).unwrap())
    }

    proptest! {
        #[test]
        fn fast_path_equals_full_encoding(parts in prop::collection::vec(prop::sample::select(vec![
            "Hello", " world", "  ", "\n", "\n\n", "日本語", "🙂", "café", "12345", "x=1;", "\t", "<|im_end|>", "<image>", "don't", "ÀÉ",
        ]), 0..30)) {
            let (fast, slow) = pair();
            let r = renderer();
            let msgs = vec![
                Message { role: Role::User, content: parts.concat() },
                Message { role: Role::Assistant, content: parts.iter().rev().copied().collect::<String>() },
            ];
            let rendered = r.render(&msgs).unwrap();
            let roles = [Role::User, Role::Assistant];
            let n = rendered.text.matches("<image>").count();
            let counts = vec![3u32; n];
            let a = fast.encode(&rendered, &roles, &counts, TrainOn::Assistant, true).unwrap();
            let b = slow.encode(&rendered, &roles, &counts, TrainOn::Assistant, true).unwrap();
            // Offsets may differ inside a multi-byte character (HF widens a partial
            // character to the whole one); spans are character-aligned, so masks do not.
            prop_assert_eq!(&a.ids, &b.ids);
            prop_assert_eq!(&a.mask, &b.mask);
            prop_assert_eq!(&a.images, &b.images);
            let image_tokens = a.ids.iter().filter(|&&i| i == 49152).count();
            prop_assert_eq!(image_tokens, 3 * n);
            prop_assert!(a.images.iter().all(|r| a.mask[r.pos as usize..(r.pos + r.len) as usize].iter().all(|&m| m == 0)));
        }
    }
}
