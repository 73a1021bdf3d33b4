//! Tokenization of a rendered conversation with response-only loss masks.
//!
//! The text is cut at the template's own special tokens and at image placeholders; the
//! pieces between cuts are tokenized with special-token matching off. HF tokenizers always
//! split at special tokens, so this yields exactly the ids of tokenizing the whole text,
//! except that special-token text typed inside a message stays plain text: data never
//! becomes a control token. A token is trained when its bytes overlap a response span
//! (transformers' `assistant_masks` rule); the special token right after a response (its
//! end-of-turn) is trained too when `train_on_eos` is set.
//!
//! Two engines give the same ids: HF `tokenizers`, and the fast engine (`fastbpe`) for the
//! byte-level BPE shapes it knows; `choose_engine` picks one and says why.

use crate::error::{Error, Result};
use crate::fastbpe::FastBpe;
use crate::plan::{TokenizerEngine, TrainOn};
use crate::render::{Rendered, Role};
use aho_corasick::{AhoCorasick, MatchKind};
use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

static NEXT_TOKENIZER_ID: AtomicU64 = AtomicU64::new(1);
const WORD_CACHE_LIMIT: usize = 1 << 18;

/// (owner tokenizer id, word → [(token id, byte length)]).
type WordCache = (u64, FxHashMap<String, Box<[(u32, u32)]>>);

thread_local! {
    /// Per worker thread: pre-tokenized word → (token id, byte length) list, for the
    /// tokenizer with the given id. Lock-free, unlike the model's shared cache.
    static WORD_CACHE: RefCell<WordCache> = RefCell::new((0, FxHashMap::default()));
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
    /// Audio token runs, as image runs are recorded (the clip's tokens, wrappers excluded).
    pub audios: Vec<ImageRun>,
    /// Video token runs, as image runs are recorded.
    pub videos: Vec<ImageRun>,
}

impl Encoded {
    pub fn trained(&self) -> usize {
        self.mask.iter().filter(|&&m| m != 0).count()
    }
}

/// (placeholder, token, start, end) as text.
pub type MediaSpec<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>);

/// The tokens of each image, audio clip and video clip of a sample, in order.
pub type MediaCounts<'a> = (&'a [u32], &'a [u32], &'a [u32]);

/// How image (or audio) placeholders expand.
#[derive(Debug, Clone)]
pub struct ImageTokens {
    pub placeholder: String,
    pub token: u32,
    pub start: Option<u32>,
    pub end: Option<u32>,
}

impl ImageTokens {
    /// The run of the next medium (`counts[*next]` tokens, in its wrappers) at `span` of
    /// the text, appended to `out`; an error when the text has more placeholders than the
    /// sample has `what`.
    fn expand(
        &self,
        counts: &[u32],
        next: &mut usize,
        what: &str,
        span: (u32, u32),
        out: &mut Encoded,
        kinds: &mut Vec<u8>,
    ) -> std::result::Result<ImageRun, String> {
        let Some(&count) = counts.get(*next) else {
            return Err(format!(
                "the text has more '{}' placeholders than the sample has {what} ({})",
                self.placeholder,
                counts.len()
            ));
        };
        *next += 1;
        let first = out.ids.len() as u32 + self.start.is_some() as u32;
        for id in self.start.into_iter().chain(std::iter::repeat_n(self.token, count as usize)).chain(self.end) {
            out.ids.push(id);
            out.offsets.push(span);
            kinds.push(KIND_IMAGE); // a media token: never trained
        }
        Ok(ImageRun { pos: first, len: count })
    }
}

/// The encoder of text pieces between cuts.
pub enum Engine {
    Hf,
    Fast(Box<FastBpe>),
}

impl Engine {
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Hf => "hf",
            Engine::Fast(_) => "fast",
        }
    }
}

/// The engine for `tk` as requested, and why: `Auto` takes the fast engine when the
/// tokenizer's shape is one it knows; `Fast` on any other shape is an error naming it.
pub fn choose_engine(tk: &Tokenizer, requested: TokenizerEngine) -> Result<(Engine, String)> {
    if requested == TokenizerEngine::Hf {
        return Ok((Engine::Hf, "requested (tokenizer_engine = \"hf\")".to_string()));
    }
    match FastBpe::new(tk) {
        Ok(f) => {
            let why = format!("{} ({})", f.shape, if requested == TokenizerEngine::Fast { "requested" } else { "auto" });
            Ok((Engine::Fast(Box::new(f)), why))
        }
        Err(why) if requested == TokenizerEngine::Auto => Ok((Engine::Hf, format!("auto: {why}"))),
        Err(why) => Err(Error::plan(
            "model.tokenizer_engine",
            format!("\"fast\" cannot encode this tokenizer exactly: {why}; use \"auto\" or \"hf\""),
        )),
    }
}

pub struct TextTokenizer {
    tokenizer: Tokenizer,
    engine: Engine,
    engine_reason: String,
    /// Byte-level BPE without a normalizer or non-special added tokens: the HF engine
    /// tokenizes words through the per-thread cache instead of building full `Encoding`s.
    hf_words: bool,
    /// Test hook: the fast engine gives a wrong id (to exercise the build's shadow check).
    fault: bool,
    id: u64,
    /// Patterns: the special tokens, then the media placeholders set (`media_cuts`).
    cutter: AhoCorasick,
    special_ids: Vec<u32>,
    /// What each media placeholder pattern is, in pattern order after the specials.
    media_cuts: Vec<Cut>,
    image: Option<ImageTokens>,
    audio: Option<ImageTokens>,
    video: Option<ImageTokens>,
}

#[derive(Debug, Clone, Copy)]
enum Cut {
    Special(u32),
    Image,
    Audio,
    Video,
}

impl TextTokenizer {
    pub fn from_file(path: &str) -> Result<Tokenizer> {
        let mut tk = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("cannot load {path}: {e}")))?;
        tk.with_truncation(None).map_err(|e| Error::Tokenizer(e.to_string()))?;
        tk.with_padding(None);
        Ok(tk)
    }

    /// `image`: (placeholder, token, start, end) as text; each token must exist.
    pub fn new(tokenizer: Tokenizer, image: Option<MediaSpec<'_>>, engine: TokenizerEngine) -> Result<Self> {
        Self::with_media(tokenizer, image, None, None, engine)
    }

    /// As `new`, with `<audio>` and `<video>` placeholders too (`audio` and `video`, as
    /// `image`).
    pub fn with_media(
        mut tokenizer: Tokenizer,
        image: Option<MediaSpec<'_>>,
        audio: Option<MediaSpec<'_>>,
        video: Option<MediaSpec<'_>>,
        engine: TokenizerEngine,
    ) -> Result<Self> {
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
        let audio = match audio {
            Some((placeholder, token, start, end)) => Some(ImageTokens {
                placeholder: placeholder.to_string(),
                token: lookup(token, "audio token")?,
                start: start.map(|s| lookup(s, "audio start token")).transpose()?,
                end: end.map(|s| lookup(s, "audio end token")).transpose()?,
            }),
            None => None,
        };
        let video = match video {
            Some((placeholder, token, start, end)) => Some(ImageTokens {
                placeholder: placeholder.to_string(),
                token: lookup(token, "video token")?,
                start: start.map(|s| lookup(s, "video start token")).transpose()?,
                end: end.map(|s| lookup(s, "video end token")).transpose()?,
            }),
            None => None,
        };
        if let Some(vid) = &video {
            if vid.placeholder.is_empty() {
                return Err(Error::plan("model.video.placeholder", "must not be empty"));
            }
            let taken = [&image, &audio].into_iter().flatten().any(|m| m.placeholder == vid.placeholder);
            if taken {
                return Err(Error::plan("model.video.placeholder", "must differ from the image and audio placeholders"));
            }
            specials.retain(|(s, _)| *s != vid.placeholder);
        }
        if let Some(aud) = &audio {
            if aud.placeholder.is_empty() {
                return Err(Error::plan("model.audio.placeholder", "must not be empty"));
            }
            if image.as_ref().is_some_and(|i| i.placeholder == aud.placeholder) {
                return Err(Error::plan("model.audio.placeholder", "must differ from the image placeholder"));
            }
            specials.retain(|(s, _)| *s != aud.placeholder);
        }
        if let Some(img) = &image {
            if img.placeholder.is_empty() {
                return Err(Error::plan("model.image.placeholder", "must not be empty"));
            }
            // The placeholder may itself be a special token (LLaVA's `<image>`): it is
            // always an image placeholder then, even when typed in the data.
            specials.retain(|(s, _)| *s != img.placeholder);
        }
        let mut patterns: Vec<&str> = specials.iter().map(|(s, _)| s.as_str()).collect();
        let mut media_cuts = Vec::new();
        for (spec, cut) in [(&image, Cut::Image), (&audio, Cut::Audio), (&video, Cut::Video)] {
            if let Some(m) = spec {
                patterns.push(&m.placeholder);
                media_cuts.push(cut);
            }
        }
        let cutter = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let special_ids = specials.iter().map(|(_, id)| *id).collect();
        let hf_words = byte_level_bpe(&tokenizer);
        let (engine, engine_reason) = choose_engine(&tokenizer, engine)?;
        let id = NEXT_TOKENIZER_ID.fetch_add(1, Ordering::Relaxed);
        Ok(TextTokenizer {
            tokenizer,
            engine,
            engine_reason,
            hf_words,
            fault: false,
            id,
            cutter,
            special_ids,
            media_cuts,
            image,
            audio,
            video,
        })
    }

    /// Turns HF's word path off: every piece through the full `Tokenizer::encode` (tests
    /// compare both paths).
    pub fn set_hf_words(&mut self, on: bool) {
        self.hf_words = on && byte_level_bpe(&self.tokenizer);
    }

    /// The engine in use ("hf" or "fast") and why it was chosen.
    pub fn engine(&self) -> (&'static str, &str) {
        (self.engine.name(), &self.engine_reason)
    }

    /// Test hook: makes the fast engine wrong, so that the shadow check has something to find.
    pub fn inject_fast_engine_fault(&mut self) {
        self.fault = true;
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The id image placeholders expand to.
    pub fn image_token(&self) -> Option<u32> {
        self.image.as_ref().map(|i| i.token)
    }

    /// The id audio placeholders expand to.
    pub fn audio_token(&self) -> Option<u32> {
        self.audio.as_ref().map(|i| i.token)
    }

    /// Whether audio runs are wrapped in start / end tokens.
    pub fn audio_wrappers(&self) -> (bool, bool) {
        self.audio.as_ref().map(|i| (i.start.is_some(), i.end.is_some())).unwrap_or((false, false))
    }

    /// The id video placeholders expand to.
    pub fn video_token(&self) -> Option<u32> {
        self.video.as_ref().map(|i| i.token)
    }

    /// Whether video runs are wrapped in start / end tokens.
    pub fn video_wrappers(&self) -> (bool, bool) {
        self.video.as_ref().map(|i| (i.start.is_some(), i.end.is_some())).unwrap_or((false, false))
    }

    /// Whether image runs are wrapped in start / end tokens.
    pub fn image_wrappers(&self) -> (bool, bool) {
        self.image.as_ref().map(|i| (i.start.is_some(), i.end.is_some())).unwrap_or((false, false))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    fn cut_kind(&self, pattern: usize) -> Cut {
        match pattern.checked_sub(self.special_ids.len()) {
            None => Cut::Special(self.special_ids[pattern]),
            Some(k) => self.media_cuts[k],
        }
    }

    /// `reference`: HF's full `Tokenizer::encode`, whatever the engine (the shadow check).
    fn encode_piece(&self, text: &str, base: usize, out: &mut Encoded, kinds: &mut Vec<u8>, reference: bool) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        if let (Engine::Fast(f), false) = (&self.engine, reference) {
            if f.serves(text) {
                self.encode_words_fast(f, text, base, out);
                kinds.resize(out.ids.len(), KIND_TEXT);
                return Ok(());
            }
        }
        if self.hf_words && !reference {
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
        self.with_word_cache(|cache| {
            for (word, (start, _), _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                if !cache.contains_key(word) {
                    let toks = self.tokenizer.get_model().tokenize(word).map_err(err)?;
                    // Offsets, not values: an unk token's value is the unk token's text.
                    let entry: Box<[(u32, u32)]> =
                        toks.iter().map(|t| (t.id, word[t.offsets.0..t.offsets.1].chars().count() as u32)).collect();
                    cache.insert(word.to_string(), entry);
                }
                push_word(out, base + start, &cache[word]);
            }
            Ok(())
        })
    }

    /// This thread's word cache, emptied first when it belongs to another tokenizer or
    /// has grown past its limit.
    fn with_word_cache<R>(&self, f: impl FnOnce(&mut FxHashMap<String, Box<[(u32, u32)]>>) -> R) -> R {
        WORD_CACHE.with(|cell| {
            let mut cache = cell.borrow_mut();
            if cache.0 != self.id || cache.1.len() > WORD_CACHE_LIMIT {
                cache.1.clear();
                cache.0 = self.id;
            }
            f(&mut cache.1)
        })
    }

    /// The fast engine's word path: its pre-tokenizer, then each word's tokens from the
    /// per-thread cache (or its BPE). Token lengths are original bytes.
    fn encode_words_fast(&self, f: &FastBpe, text: &str, base: usize, out: &mut Encoded) {
        let first = out.ids.len();
        self.with_word_cache(|cache| {
            let mut scratch: Vec<(u32, u32)> = Vec::new();
            f.words(text, &mut |s, e| {
                let word = &text[s..e];
                let toks: &[(u32, u32)] = match cache.get(word) {
                    Some(t) => t,
                    None => {
                        scratch.clear();
                        f.encode_word(word.as_bytes(), &mut scratch);
                        cache.insert(word.to_string(), scratch.as_slice().into());
                        &scratch
                    }
                };
                push_word(out, base + s, toks);
            });
        });
        if self.fault && out.ids.len() > first {
            out.ids[first] ^= 1;
        }
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
        self.encode_with(rendered, roles, (image_counts, &[], &[]), train_on, train_on_eos, false)
    }

    /// As `encode`, with the tokens of each audio and video clip, in order.
    pub fn encode_media(
        &self,
        rendered: &Rendered,
        roles: &[Role],
        counts: MediaCounts<'_>,
        train_on: TrainOn,
        train_on_eos: bool,
    ) -> std::result::Result<Encoded, String> {
        self.encode_with(rendered, roles, counts, train_on, train_on_eos, false)
    }

    /// As `encode`, every piece through HF's full `Tokenizer::encode` (the shadow check's
    /// reference, whatever the engine).
    pub fn encode_reference(
        &self,
        rendered: &Rendered,
        roles: &[Role],
        counts: MediaCounts<'_>,
    ) -> std::result::Result<Encoded, String> {
        self.encode_with(rendered, roles, counts, TrainOn::All, false, true)
    }

    fn encode_with(
        &self,
        rendered: &Rendered,
        roles: &[Role],
        (image_counts, audio_counts, video_counts): MediaCounts<'_>,
        train_on: TrainOn,
        train_on_eos: bool,
        reference: bool,
    ) -> std::result::Result<Encoded, String> {
        let text = rendered.text.as_str();
        let inside_content = |s: usize, e: usize| rendered.spans.iter().flatten().any(|&(a, b)| s < b && e > a);
        let mut out = Encoded::default();
        let mut kinds: Vec<u8> = Vec::new();
        let mut pos = 0usize;
        let mut n_images = 0usize;
        let mut n_audios = 0usize;
        let mut n_videos = 0usize;
        for m in self.cutter.find_iter(text) {
            let cut = self.cut_kind(m.pattern().as_usize());
            if let Cut::Special(_) = cut {
                if inside_content(m.start(), m.end()) {
                    continue; // special-token text typed in the data: stays plain text
                }
            }
            self.encode_piece(&text[pos..m.start()], pos, &mut out, &mut kinds, reference).map_err(|e| e.to_string())?;
            let span = (m.start() as u32, m.end() as u32);
            match cut {
                Cut::Special(id) => {
                    out.ids.push(id);
                    out.offsets.push(span);
                    kinds.push(KIND_SPECIAL);
                }
                Cut::Image => {
                    let img = self.image.as_ref().expect("image pattern only exists with an image config");
                    let run = img.expand(image_counts, &mut n_images, "images", span, &mut out, &mut kinds)?;
                    out.images.push(run);
                }
                Cut::Audio => {
                    let aud = self.audio.as_ref().expect("audio pattern only exists with an audio config");
                    let run = aud.expand(audio_counts, &mut n_audios, "audio clips", span, &mut out, &mut kinds)?;
                    out.audios.push(run);
                }
                Cut::Video => {
                    let vid = self.video.as_ref().expect("video pattern only exists with a video config");
                    let run = vid.expand(video_counts, &mut n_videos, "video clips", span, &mut out, &mut kinds)?;
                    out.videos.push(run);
                }
            }
            pos = m.end();
        }
        self.encode_piece(&text[pos..], pos, &mut out, &mut kinds, reference).map_err(|e| e.to_string())?;
        if n_images != image_counts.len() {
            let ph = self.image.as_ref().map(|i| i.placeholder.as_str()).unwrap_or("<image>");
            return Err(format!(
                "the sample has {} images but its text has {} '{ph}' placeholders",
                image_counts.len(),
                n_images
            ));
        }
        if n_audios != audio_counts.len() {
            let ph = self.audio.as_ref().map(|i| i.placeholder.as_str()).unwrap_or("<audio>");
            return Err(format!(
                "the sample has {} audio clips but its text has {} '{ph}' placeholders",
                audio_counts.len(),
                n_audios
            ));
        }
        if n_videos != video_counts.len() {
            let ph = self.video.as_ref().map(|i| i.placeholder.as_str()).unwrap_or("<video>");
            return Err(format!(
                "the sample has {} video clips but its text has {} '{ph}' placeholders",
                video_counts.len(),
                n_videos
            ));
        }
        out.mask = response_mask(rendered, roles, &out.offsets, &kinds, train_on, train_on_eos);
        Ok(out)
    }
}

/// Appends a word's tokens, `(id, byte length)` each, starting at byte `start` of the text.
fn push_word(out: &mut Encoded, start: usize, toks: &[(u32, u32)]) {
    let mut pos = start as u32;
    for &(id, len) in toks {
        out.ids.push(id);
        out.offsets.push((pos, pos + len));
        pos += len;
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

    /// (fast engine, HF word path, HF full encode) over one tokenizer.json.
    type Trio = (TextTokenizer, TextTokenizer, TextTokenizer);

    fn trio(tk: &dyn Fn() -> Tokenizer) -> Trio {
        let image = Some(("<image>", "<image>", None, None));
        let fast = TextTokenizer::new(tk(), image, TokenizerEngine::Fast).unwrap();
        let words = TextTokenizer::new(tk(), image, TokenizerEngine::Hf).unwrap();
        let mut full = TextTokenizer::new(tk(), image, TokenizerEngine::Hf).unwrap();
        full.set_hf_words(false);
        assert_eq!(fast.engine().0, "fast");
        assert_eq!(words.engine().0, "hf");
        (fast, words, full)
    }

    /// The bundled SmolLM2 tokenizer, then the same BPE behind each family's pre-tokenizer.
    fn trios() -> &'static Vec<Trio> {
        static T: std::sync::OnceLock<Vec<Trio>> = std::sync::OnceLock::new();
        T.get_or_init(|| {
            let mut v = vec![trio(&|| TextTokenizer::from_file(TOKENIZER).unwrap())];
            for f in crate::fastbpe::tests::FAMILIES {
                let json = crate::fastbpe::tests::family_json(f).to_string();
                v.push(trio(&|| json.parse().unwrap()));
            }
            v
        })
    }

    #[test]
    fn auto_takes_the_fast_engine_and_says_why() {
        let tk = TextTokenizer::new(TextTokenizer::from_file(TOKENIZER).unwrap(), None, TokenizerEngine::Auto).unwrap();
        let (name, why) = tk.engine();
        assert_eq!(name, "fast");
        assert!(why.contains("GPT-2") && why.contains("auto"), "{why}");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(TOKENIZER).unwrap()).unwrap();
        json["normalizer"] = serde_json::json!({"type": "Lowercase"});
        let other = || json.to_string().parse::<Tokenizer>().unwrap();
        let tk = TextTokenizer::new(other(), None, TokenizerEngine::Auto).unwrap();
        assert_eq!(tk.engine().0, "hf");
        assert!(tk.engine().1.contains("Lowercase"), "{}", tk.engine().1);
        let err = TextTokenizer::new(other(), None, TokenizerEngine::Fast).err().unwrap().to_string();
        assert!(err.contains("model.tokenizer_engine") && err.contains("Lowercase"), "{err}");
    }

    fn renderer() -> &'static ChatRenderer {
        static R: std::sync::OnceLock<ChatRenderer> = std::sync::OnceLock::new();
        R.get_or_init(|| ChatRenderer::new(builtin("chatml").unwrap(), None, None).unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
        /// Whole rendered conversations: the fast engine and HF's word path give HF's full
        /// encoding, on every tokenizer shape.
        #[test]
        fn engines_equal_full_encoding(parts in prop::collection::vec(prop::sample::select(
            crate::fastbpe::tests::FRAGMENTS.iter().copied().chain(["<|im_end|>", "<image>", "<|im_start|>"]).collect::<Vec<_>>()
        ), 0..30)) {
            let r = renderer();
            let msgs = vec![
                Message { role: Role::User, content: parts.concat() },
                Message { role: Role::Assistant, content: parts.iter().rev().copied().collect::<String>() },
            ];
            let rendered = r.render(&msgs).unwrap();
            let roles = [Role::User, Role::Assistant];
            let n = rendered.text.matches("<image>").count();
            let counts = vec![3u32; n];
            for (fast, words, full) in trios() {
                let want = full.encode(&rendered, &roles, &counts, TrainOn::Assistant, true).unwrap();
                for tk in [fast, words] {
                    let a = tk.encode(&rendered, &roles, &counts, TrainOn::Assistant, true).unwrap();
                    // Offsets may differ inside a multi-byte character (HF widens a partial
                    // character to the whole one); spans are character-aligned, so masks do not.
                    prop_assert_eq!(&a.ids, &want.ids);
                    prop_assert_eq!(&a.mask, &want.mask);
                    prop_assert_eq!(&a.images, &want.images);
                }
                let reference = fast.encode_reference(&rendered, &roles, (&counts, &[], &[])).unwrap();
                prop_assert_eq!(&reference.ids, &want.ids);
                let image_tokens = want.ids.iter().filter(|&&i| i == 49152).count();
                prop_assert_eq!(image_tokens, 3 * n);
                prop_assert!(want.images.iter().all(|r| want.mask[r.pos as usize..(r.pos + r.len) as usize].iter().all(|&m| m == 0)));
            }
        }
    }
}
