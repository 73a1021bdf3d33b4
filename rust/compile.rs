//! The per-sample pipeline: each batch of a source (columns, `columns::Batch`) becomes
//! tokenized, masked samples kept in that source's store until `finish` mixes and packs
//! them (`layout`). Samples are processed in parallel and appended in row order, so the
//! output is the same for any thread count.

use crate::columns::Batch;
use crate::error::{Error, Result};
use crate::instruct::{self, Template};
use crate::layout::Layout;
use crate::audio::{self, AudioInfo};
use crate::media::{self, ImageInfo};
use crate::overlong;
use crate::plan::{OnError, Overlong, Plan, TrainOn};
use crate::pool::ForkSafePool;
use crate::render::{ChatRenderer, Message, Role};
use crate::rng;
use crate::spill::{Record, Spill};
use crate::tokenize::{Encoded, MediaCounts, TextTokenizer};
use crate::video::{self, VideoInfo};
use rayon::prelude::*;
use tokenizers::AddedToken;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One previewed sample: (rendered text, tokens, template id), or why it is unusable.
pub type Preview = std::result::Result<(String, Encoded, i32), String>;

/// Why one row is unusable: (field, message); the source's `on_error` decides whether
/// it fails the build (`Error::Data`) or is skipped.
type RowResult<T> = std::result::Result<T, (&'static str, String)>;

/// What the build keeps of one usable sample.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub(crate) struct SampleRec {
    pub row: u64,
    pub part: u16,
    pub record: Record,
    pub len: u32,
    pub trained: u32,
    /// First of its images in the store's image paths and grids.
    pub img: u32,
    pub n_img: u32,
    /// First of its audio clips in the store's audio paths and infos.
    pub aud: u32,
    pub n_aud: u32,
    /// First of its video clips in the store's video paths and infos.
    pub vid: u32,
    pub n_vid: u32,
    pub template: i32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStats {
    pub name: String,
    pub rows: u64,
    pub skipped: u64,
    pub dropped_overlong: u64,
    /// Samples with more images than `max_images` (no sequence could hold them).
    pub dropped_images: u64,
    pub truncated: u64,
    pub usable: u64,
    pub selected: u64,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub images: u64,
    pub weight: f64,
    /// The first few skipped rows, with why.
    pub skipped_examples: Vec<String>,
}

/// The usable samples of one source, in the order they were added.
#[derive(Default)]
pub(crate) struct Store {
    pub samples: Vec<SampleRec>,
    /// Image paths of every sample, concatenated; path k ends at `image_path_ends[k]`.
    pub image_paths: String,
    pub image_path_ends: Vec<u64>,
    /// The (t, h, w) grid of every image, as `media::ImageInfo::grid`.
    pub image_grids: Vec<[u32; 3]>,
    /// Audio paths of every sample, as image paths; and each clip's tokens and length.
    pub audio_paths: String,
    pub audio_path_ends: Vec<u64>,
    pub audio_infos: Vec<AudioInfo>,
    /// Video paths of every sample, as image paths; and each clip's tokens, grid, frames.
    pub video_paths: String,
    pub video_path_ends: Vec<u64>,
    pub video_infos: Vec<VideoInfo>,
    pub stats: SourceStats,
    /// The longest sample tokenized (before the overlong policy): when it fits seq_len,
    /// no sample was dropped, truncated or split, so the store is the same for any
    /// seq_len at least this long (the token store reuses it across such changes).
    pub max_len: u32,
}

impl Store {
    /// The bytes of image path `k` (empty where its ends disagree, which a loaded entry
    /// is checked against: fingerprinting a store never panics).
    pub fn image_path(&self, k: usize) -> &[u8] {
        let start = if k == 0 { 0 } else { self.image_path_ends[k - 1] as usize };
        self.image_paths.as_bytes().get(start..self.image_path_ends[k] as usize).unwrap_or_default()
    }

    /// The bytes of audio path `k`.
    pub fn audio_path(&self, k: usize) -> &[u8] {
        let start = if k == 0 { 0 } else { self.audio_path_ends[k - 1] as usize };
        self.audio_paths.as_bytes().get(start..self.audio_path_ends[k] as usize).unwrap_or_default()
    }

    /// The bytes of video path `k`.
    pub fn video_path(&self, k: usize) -> &[u8] {
        let start = if k == 0 { 0 } else { self.video_path_ends[k - 1] as usize };
        self.video_paths.as_bytes().get(start..self.video_path_ends[k] as usize).unwrap_or_default()
    }

    /// A sample whose `counts` images, audio clips and videos are the next this store
    /// keeps (its media fields; the rest default, to be filled in).
    pub fn next_media(&self, counts: [usize; 3]) -> SampleRec {
        SampleRec {
            img: self.image_path_ends.len() as u32,
            n_img: counts[0] as u32,
            aud: self.audio_path_ends.len() as u32,
            n_aud: counts[1] as u32,
            vid: self.video_path_ends.len() as u32,
            n_vid: counts[2] as u32,
            ..Default::default()
        }
    }

    /// Appends an audio clip's path and info (the next index after those kept).
    pub fn push_audio(&mut self, path: &str, info: AudioInfo) {
        self.audio_paths.push_str(path);
        self.audio_path_ends.push(self.audio_paths.len() as u64);
        self.audio_infos.push(info);
    }

    /// Appends a video clip's path and info.
    pub fn push_video(&mut self, path: &str, info: VideoInfo) {
        self.video_paths.push_str(path);
        self.video_path_ends.push(self.video_paths.len() as u64);
        self.video_infos.push(info);
    }

    /// Appends an image's path (its grid goes to `image_grids`).
    pub fn push_image_path(&mut self, path: &str) {
        self.image_paths.push_str(path);
        self.image_path_ends.push(self.image_paths.len() as u64);
    }
}

impl Store {
    /// Appends `later`, the samples of the rows that follow this store's (a later work
    /// unit of the same source): what adding both units' batches to one store gives. Its
    /// samples' image, audio and video indices move past this store's, the counts add up,
    /// the skipped examples stay the first few, `max_len` the longest.
    pub(crate) fn append(&mut self, later: Store) {
        let (images, audios) = (self.image_path_ends.len() as u32, self.audio_path_ends.len() as u32);
        let videos = self.video_path_ends.len() as u32;
        let (image_bytes, audio_bytes) = (self.image_paths.len() as u64, self.audio_paths.len() as u64);
        let video_bytes = self.video_paths.len() as u64;
        self.samples.extend(
            later.samples.into_iter().map(|s| SampleRec { img: s.img + images, aud: s.aud + audios, vid: s.vid + videos, ..s }),
        );
        self.video_paths.push_str(&later.video_paths);
        self.video_path_ends.extend(later.video_path_ends.iter().map(|e| e + video_bytes));
        self.video_infos.extend(later.video_infos);
        self.image_paths.push_str(&later.image_paths);
        self.image_path_ends.extend(later.image_path_ends.iter().map(|e| e + image_bytes));
        self.image_grids.extend(later.image_grids);
        self.audio_paths.push_str(&later.audio_paths);
        self.audio_path_ends.extend(later.audio_path_ends.iter().map(|e| e + audio_bytes));
        self.audio_infos.extend(later.audio_infos);
        let (st, more) = (&mut self.stats, later.stats);
        st.rows += more.rows;
        st.skipped += more.skipped;
        st.dropped_overlong += more.dropped_overlong;
        st.dropped_images += more.dropped_images;
        st.truncated += more.truncated;
        let room = SKIPPED_EXAMPLES.saturating_sub(st.skipped_examples.len());
        st.skipped_examples.extend(more.skipped_examples.into_iter().take(room));
        self.max_len = self.max_len.max(later.max_len);
    }
}

/// How many skipped rows a source's stats show, with why (the first ones).
pub(crate) const SKIPPED_EXAMPLES: usize = 5;

/// One processed sample before it joins its source's store.
struct Done {
    enc: Encoded,
    template: i32,
    image_paths: Vec<usize>,
    image_grids: Vec<[u32; 3]>,
    /// The sample's audio clips: (index in the batch's audio paths, info) each.
    audios: Vec<(usize, AudioInfo)>,
    /// The sample's video clips: (index in the batch's video paths, info) each.
    videos: Vec<(usize, VideoInfo)>,
    truncated: bool,
    /// Which piece of a conversation split at turn boundaries (0 otherwise).
    part: u16,
}

enum Outcome {
    Keep(Vec<Done>),
    Overlong,
    /// The shadow check found the fast engine's ids differ from HF's: stops the build
    /// whatever `on_error` says.
    EngineMismatch(String),
}

/// One sample in this many is also encoded by HF when the fast engine is in use.
pub const SHADOW_ONE_IN: u64 = 1000;

/// Compiles the samples of a recipe into packed, masked token sequences.
///
/// ```text
///  add_batch(source, columns)     per sample, in parallel, kept in row order
///    turns ─▶ instruction template ─▶ messages ─▶ chat template ─▶ text
///          ─▶ tokenize + loss mask + image runs ─▶ overlong policy ─▶ store[source]
///  finish()                       mixture counts, interleave, pack   (layout.rs)
///  emit(lo, hi)                   packed rows lo..hi as flat arrays  (layout.rs)
/// ```
pub struct Compiler {
    pub(crate) plan: Plan,
    pub(crate) spill: Spill,
    pub(crate) layout: Option<Layout>,
    renderer: ChatRenderer,
    pub(crate) tokenizer: TextTokenizer,
    templates: Vec<Vec<Template>>,
    pub(crate) source_keys: Vec<u64>,
    pub(crate) stores: Vec<Store>,
    pub(crate) pool: ForkSafePool,
}

/// The instruction templates of every source, parsed, each placeholder checked to name
/// `question` or a field of its source.
fn parse_templates(plan: &Plan) -> Result<Vec<Vec<Template>>> {
    let mut templates = Vec::new();
    for (s, src) in plan.sources.iter().enumerate() {
        let mut parsed = Vec::new();
        for (t, text) in src.templates.iter().enumerate() {
            let tpl = Template::parse(text).map_err(|m| Error::plan(format!("source[{s}].instructions[{t}]"), m))?;
            for f in tpl.fields() {
                if f != "question" && !src.fields.iter().any(|x| x == f) {
                    return Err(Error::plan(
                        format!("source[{s}].instructions[{t}]"),
                        format!("placeholder {{{f}}} has no field; map it under source[{s}].fields"),
                    ));
                }
            }
            parsed.push(tpl);
        }
        templates.push(parsed);
    }
    Ok(templates)
}

impl Compiler {
    /// `threads`: 0 for one per core (the output is the same for any value);
    /// `spill_dir`: where tokenized samples wait for packing (None: in memory).
    pub fn new(plan: Plan, tokenizer_path: &str, threads: usize, spill_dir: Option<&Path>) -> Result<Self> {
        if plan.seq_len < 2 {
            return Err(Error::plan("output.seq_len", "must be at least 2"));
        }
        let renderer = ChatRenderer::new(&plan.chat_template, plan.bos_token.as_deref(), plan.eos_token.as_deref())?;
        let mut tk = TextTokenizer::from_file(tokenizer_path)?;
        if !plan.added_tokens.is_empty() {
            // As HF's `add_special_tokens`: ids after the vocabulary's, in order.
            let added: Vec<AddedToken> = plan.added_tokens.iter().map(|t| AddedToken::from(t.clone(), true)).collect();
            tk.add_special_tokens(added).map_err(|e| Error::plan("model.added_tokens", e.to_string()))?;
        }
        let image = plan.image.as_ref().map(|i| (i.placeholder.as_str(), i.token.as_str(), i.start.as_deref(), i.end.as_deref()));
        let aud = plan.audio.as_ref().map(|a| (a.placeholder.as_str(), a.token.as_str(), a.start.as_deref(), a.end.as_deref()));
        if let Some(a) = &plan.audio {
            audio::check_plan(a)?;
        }
        let vid = plan.video.as_ref().map(|v| (v.placeholder.as_str(), v.token.as_str(), v.start.as_deref(), v.end.as_deref()));
        if let Some(v) = &plan.video {
            video::check_plan(v)?;
        }
        let mut tokenizer = TextTokenizer::with_media(tk, image, aud, vid, plan.tokenizer_engine)?;
        // Test hook for the shadow check (tests/test_tokenizer_engine.py); never set otherwise.
        if std::env::var_os("MMRECIPE_TEST_FAST_ENGINE_FAULT").is_some() {
            tokenizer.inject_fast_engine_fault();
        }
        let templates = parse_templates(&plan)?;
        let source_keys = plan.sources.iter().map(|s| rng::name_hash(&s.name)).collect();
        let stores = plan
            .sources
            .iter()
            .map(|s| Store {
                stats: SourceStats { name: s.name.clone(), weight: s.weight, ..Default::default() },
                ..Default::default()
            })
            .collect();
        Ok(Compiler {
            plan,
            spill: Spill::new(spill_dir)?,
            layout: None,
            renderer,
            tokenizer,
            templates,
            source_keys,
            stores,
            pool: ForkSafePool::new(threads)?,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Renders and tokenizes conversations on the build's thread pool (previews and tests;
    /// not the build path).
    pub fn encode_many(&mut self, chats: &[(Vec<Message>, Vec<u32>)]) -> Result<Vec<Result<(String, Encoded)>>> {
        let pool = self.pool.get()?;
        Ok(pool.install(|| chats.par_iter().map(|(m, counts)| self.encode_messages(m, counts)).collect()))
    }

    /// Renders and tokenizes one conversation (previews and tests; not the build path).
    pub fn encode_messages(&self, messages: &[Message], image_counts: &[u32]) -> Result<(String, Encoded)> {
        let rendered = self.renderer.render(messages)?;
        let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
        let enc = self
            .tokenizer
            .encode(&rendered, &roles, image_counts, self.plan.train_on, self.plan.train_on_eos)
            .map_err(Error::Template)?;
        Ok((rendered.text, enc))
    }

    /// The batch's source exists and its columns are well formed.
    fn check_batch(&self, source: usize, batch: &Batch) -> Result<()> {
        let src = self.plan.sources.get(source).ok_or_else(|| Error::internal(format!("no source with index {source}")))?;
        batch.validate(src.fields.len())
    }

    /// Adds one batch of a source. Returns the number of usable samples it added.
    pub fn add_batch(&mut self, source: usize, batch: &Batch) -> Result<usize> {
        self.check_batch(source, batch)?;
        if self.layout.is_some() {
            return Err(Error::internal("samples added after finish()"));
        }
        let pool = self.pool.get()?;
        let n = batch.rows.len();
        let results: Vec<(RowResult<Outcome>, u32)> =
            pool.install(|| (0..n).into_par_iter().map(|i| self.process(source, batch, i)).collect());
        self.store_results(source, batch, results)
    }

    /// Appends the outcome of each row of a batch to its source's store, in row order.
    fn store_results(&mut self, source: usize, batch: &Batch, results: Vec<(RowResult<Outcome>, u32)>) -> Result<usize> {
        let src = &self.plan.sources[source];
        let store = &mut self.stores[source];
        let before = store.samples.len();
        for (i, (result, len)) in results.into_iter().enumerate() {
            store.stats.rows += 1;
            store.max_len = store.max_len.max(len);
            match result {
                Ok(Outcome::Overlong) => store.stats.dropped_overlong += 1,
                Ok(Outcome::EngineMismatch(message)) => {
                    let row = batch.rows[i];
                    return Err(Error::Tokenizer(format!("source '{}', row {row}: {message}", src.name)));
                }
                Ok(Outcome::Keep(done)) => {
                    for d in done {
                        if self.plan.max_images.is_some_and(|m| d.enc.images.len() as u32 > m) {
                            store.stats.dropped_images += 1;
                            continue;
                        }
                        append(store, &mut self.spill, batch, i, d)?;
                    }
                }
                Err((field, message)) => {
                    let row = batch.rows[i];
                    if src.on_error == OnError::Fail {
                        return Err(Error::Data { source: src.name.clone(), row, field: field.to_string(), message });
                    }
                    store.stats.skipped += 1;
                    if store.stats.skipped_examples.len() < SKIPPED_EXAMPLES {
                        store.stats.skipped_examples.push(format!("row {row}, field '{field}': {message}"));
                    }
                }
            }
        }
        Ok(store.samples.len() - before)
    }

    /// Sample `i` of a batch, through the whole pipeline and the overlong policy; and
    /// its length in tokens before that policy (0 when it failed before tokenizing).
    fn process(&self, source: usize, batch: &Batch, i: usize) -> (RowResult<Outcome>, u32) {
        let mut len = 0;
        let outcome = self.process_row(source, batch, i, &mut len);
        (outcome, len)
    }

    fn process_row(&self, source: usize, batch: &Batch, i: usize, len: &mut u32) -> RowResult<Outcome> {
        let plan = &self.plan;
        let (messages, template, infos, audios, videos) = self.sample_messages(source, batch, i)?;
        let image_counts: Vec<u32> = infos.iter().map(|i| i.tokens).collect();
        let image_grids: Vec<[u32; 3]> = infos.iter().map(|i| i.grid).collect();
        let audio_counts: Vec<u32> = audios.iter().map(|(_, a)| a.tokens).collect();
        let video_counts: Vec<u32> = videos.iter().map(|(_, v)| v.tokens).collect();
        let counts = (image_counts.as_slice(), audio_counts.as_slice(), video_counts.as_slice());
        let (i0, i1) = (batch.image_offsets[i] as usize, batch.image_offsets[i + 1] as usize);
        let image_paths: Vec<usize> = (i0..i1).collect();
        let enc = self.encode(&messages, counts)?;
        *len = enc.ids.len().min(u32::MAX as usize) as u32;
        if let Some(mismatch) = self.shadow_check(source, batch.rows[i], &messages, counts, &enc)? {
            return Ok(Outcome::EngineMismatch(mismatch));
        }
        if enc.ids.len() <= plan.seq_len as usize {
            return self.keep(vec![Done { enc, template, image_paths, image_grids, audios, videos, truncated: false, part: 0 }]);
        }
        match plan.overlong {
            Overlong::Drop => Ok(Outcome::Overlong),
            Overlong::Truncate => {
                let mut enc = enc;
                let tk = &self.tokenizer;
                let wraps = [tk.image_wrappers(), tk.audio_wrappers(), tk.video_wrappers()];
                if !overlong::truncate_media(&mut enc, plan.seq_len as usize, wraps) {
                    return Ok(Outcome::Overlong);
                }
                let (mut image_paths, mut image_grids, mut audios, mut videos) = (image_paths, image_grids, audios, videos);
                image_paths.truncate(enc.images.len());
                image_grids.truncate(enc.images.len());
                audios.truncate(enc.audios.len());
                videos.truncate(enc.videos.len());
                self.keep(vec![Done { enc, template, image_paths, image_grids, audios, videos, truncated: true, part: 0 }])
            }
            Overlong::SplitTurns => {
                let parts = self.split_turns(&messages, counts)?;
                if parts.is_empty() {
                    return Ok(Outcome::Overlong);
                }
                let done = parts
                    .into_iter()
                    .enumerate()
                    .map(|(k, enc)| Done {
                        enc,
                        template,
                        image_paths: image_paths.clone(),
                        image_grids: image_grids.clone(),
                        audios: audios.clone(),
                        videos: videos.clone(),
                        truncated: true,
                        part: k as u16,
                    })
                    .collect();
                self.keep(done)
            }
        }
    }

    /// Rendered text, tokens and template of samples of a batch, exactly as a build makes
    /// them (before overlong handling); for `recipe preview`.
    pub fn preview(&mut self, source: usize, batch: &Batch) -> Result<Vec<Preview>> {
        self.check_batch(source, batch)?;
        let pool = self.pool.get()?;
        let n = batch.rows.len();
        Ok(pool.install(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let (messages, template, infos, audios, videos) =
                        self.sample_messages(source, batch, i).map_err(|(f, m)| format!("{f}: {m}"))?;
                    let counts: Vec<u32> = infos.iter().map(|i| i.tokens).collect();
                    let audio_counts: Vec<u32> = audios.iter().map(|(_, a)| a.tokens).collect();
                    let video_counts: Vec<u32> = videos.iter().map(|(_, v)| v.tokens).collect();
                    let rendered = self.renderer.render(&messages).map_err(|e| e.to_string())?;
                    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
                    let (train_on, eos) = (self.plan.train_on, self.plan.train_on_eos);
                    let enc = self.tokenizer.encode_media(&rendered, &roles, (&counts, &audio_counts, &video_counts), train_on, eos)?;
                    Ok((rendered.text, enc, template))
                })
                .collect()
        }))
    }

    /// The messages of sample `i` with its instruction template applied and image
    /// placeholders in place, the template id, the tokens and grid of each image, and
    /// each audio and video clip (its index in the batch and its tokens).
    #[allow(clippy::type_complexity)]
    fn sample_messages(
        &self,
        source: usize,
        batch: &Batch,
        i: usize,
    ) -> RowResult<(Vec<Message>, i32, Vec<ImageInfo>, Vec<(usize, AudioInfo)>, Vec<(usize, VideoInfo)>)> {
        let (mut messages, template) = self.instructed_turns(source, batch, i)?;
        if self.plan.train_on != TrainOn::All && !messages.iter().any(|m| m.role == Role::Assistant) {
            return Err(("messages", "the sample has no assistant turn to train on".to_string()));
        }
        let infos = self.sample_images(source, batch, i, &mut messages)?;
        let audios = self.sample_audios(source, batch, i, &mut messages)?;
        let videos = self.sample_videos(source, batch, i, &mut messages)?;
        Ok((messages, template, infos, audios, videos))
    }

    /// The tokens of each video clip of sample `i` (its container's metadata read), with
    /// the video placeholders put into `messages` where the text has none.
    fn sample_videos(&self, source: usize, batch: &Batch, i: usize, messages: &mut [Message]) -> RowResult<Vec<(usize, VideoInfo)>> {
        let Some((offsets, paths)) = &batch.video else { return Ok(Vec::new()) };
        let (v0, v1) = (offsets[i] as usize, offsets[i + 1] as usize);
        if v1 == v0 {
            return Ok(Vec::new());
        }
        let Some(plan) = &self.plan.video else {
            return Err(("video", "the sample has video but the recipe sets no [model] video".to_string()));
        };
        let root = self.plan.sources[source].video_root.as_deref().map(Path::new).unwrap_or(Path::new(""));
        let mut out = Vec::with_capacity(v1 - v0);
        for k in v0..v1 {
            let rel = paths.get(k).map_err(|m| ("video", m))?;
            out.push((k, video::video_info(plan, &root.join(rel)).map_err(|m| ("video", m))?));
        }
        media::place_images(messages, &plan.placeholder, v1 - v0).map_err(|m| ("video", m.replace("images", "video")))?;
        Ok(out)
    }

    /// The tokens of each audio clip of sample `i` (its header read), with the audio
    /// placeholders put into `messages` where the text has none.
    fn sample_audios(&self, source: usize, batch: &Batch, i: usize, messages: &mut [Message]) -> RowResult<Vec<(usize, AudioInfo)>> {
        let Some((offsets, paths)) = &batch.audio else { return Ok(Vec::new()) };
        let (a0, a1) = (offsets[i] as usize, offsets[i + 1] as usize);
        if a1 == a0 {
            return Ok(Vec::new());
        }
        let Some(plan) = &self.plan.audio else {
            return Err(("audio", "the sample has audio but the recipe sets no [model] audio".to_string()));
        };
        let root = self.plan.sources[source].audio_root.as_deref().map(Path::new).unwrap_or(Path::new(""));
        let mut out = Vec::with_capacity(a1 - a0);
        for k in a0..a1 {
            let rel = paths.get(k).map_err(|m| ("audio", m))?;
            out.push((k, audio::audio_info(plan, &root.join(rel)).map_err(|m| ("audio", m))?));
        }
        media::place_images(messages, &plan.placeholder, a1 - a0).map_err(|m| ("audio", m.replace("images", "audio")))?;
        Ok(out)
    }

    /// The turns of sample `i` as messages, each user turn through the instruction
    /// template chosen for it; and the template id of the first (-1: none).
    fn instructed_turns(&self, source: usize, batch: &Batch, i: usize) -> RowResult<(Vec<Message>, i32)> {
        let plan = &self.plan;
        let src = &plan.sources[source];
        let row = batch.rows[i];
        let (t0, t1) = (batch.turn_offsets[i] as usize, batch.turn_offsets[i + 1] as usize);
        let mut messages = Vec::with_capacity(t1 - t0);
        let mut template = -1i32;
        let mut user_turn = 0u64;
        for t in t0..t1 {
            let role = Role::from_code(batch.roles[t]).ok_or(("role", format!("unknown role code {}", batch.roles[t])))?;
            let text = batch.contents.get(t).map_err(|m| ("content", m))?;
            let content = if role == Role::User && !self.templates[source].is_empty() {
                let pool = &self.templates[source];
                let k = instruct::choose(plan.epoch_seed(), self.source_keys[source], row, user_turn, pool.len());
                if template < 0 {
                    template = k as i32;
                }
                let lookup = |f: &str| {
                    if f == "question" {
                        Some(text)
                    } else {
                        let j = src.fields.iter().position(|x| x == f)?;
                        batch.fields[j].get(i).ok()
                    }
                };
                pool[k].fill(lookup).map_err(|m| ("instructions", m))?
            } else {
                text.to_string()
            };
            if role == Role::User {
                user_turn += 1;
            }
            messages.push(Message { role, content });
        }
        Ok((messages, template))
    }

    /// The tokens and grid of each image of sample `i` (its header read), with the image
    /// placeholders put into `messages` where the text has none.
    fn sample_images(&self, source: usize, batch: &Batch, i: usize, messages: &mut [Message]) -> RowResult<Vec<ImageInfo>> {
        let (i0, i1) = (batch.image_offsets[i] as usize, batch.image_offsets[i + 1] as usize);
        let mut infos = Vec::with_capacity(i1 - i0);
        if i1 > i0 {
            let Some(img) = &self.plan.image else {
                return Err(("image", "the sample has images but the recipe sets no [model.image]".to_string()));
            };
            let root = self.plan.sources[source].image_root.as_deref().map(Path::new).unwrap_or(Path::new(""));
            for k in i0..i1 {
                let rel = batch.images.get(k).map_err(|m| ("image", m))?;
                let path: PathBuf = root.join(rel);
                let bytes = batch.image_data.map(|d| d.bytes(k)).filter(|b| !b.is_empty());
                infos.push(media::image_info_in(img, &path, bytes).map_err(|m| ("image", m))?);
            }
            media::place_images(messages, &img.placeholder, i1 - i0).map_err(|m| ("image", m))?;
        }
        Ok(infos)
    }

    fn encode(&self, messages: &[Message], counts: MediaCounts<'_>) -> RowResult<Encoded> {
        let rendered = self.renderer.render(messages).map_err(|e| ("messages", e.to_string()))?;
        let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
        self.tokenizer
            .encode_media(&rendered, &roles, counts, self.plan.train_on, self.plan.train_on_eos)
            .map_err(|m| ("messages", m))
    }

    /// With the fast engine, a deterministic 1 in SHADOW_ONE_IN of the samples (by seed,
    /// source and row) is encoded again by HF's full `Tokenizer::encode`; the message
    /// when the ids differ.
    fn shadow_check(
        &self,
        source: usize,
        row: u64,
        messages: &[Message],
        counts: MediaCounts<'_>,
        enc: &Encoded,
    ) -> RowResult<Option<String>> {
        if self.tokenizer.engine().0 != "fast" {
            return Ok(None);
        }
        let word = rng::keyed(self.plan.seed, self.source_keys[source], row, rng::PURPOSE_SHADOW);
        if rng::below(word, SHADOW_ONE_IN) != 0 {
            return Ok(None);
        }
        let rendered = self.renderer.render(messages).map_err(|e| ("messages", e.to_string()))?;
        let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
        let hf = self.tokenizer.encode_reference(&rendered, &roles, counts).map_err(|m| ("messages", m))?;
        if hf.ids == enc.ids {
            return Ok(None);
        }
        Ok(Some(format!(
            "the fast tokenizer engine and HF tokenizers disagree (shadow check) on the text {:?}\nfast ids: {:?}\nhf ids:   {:?}\n\
             Build with HF tokenizers: set tokenizer_engine = \"hf\" in [model], or pass --tokenizer-engine hf; \
             and please report this.",
            rendered.text, enc.ids, hf.ids
        )))
    }

    fn keep(&self, done: Vec<Done>) -> RowResult<Outcome> {
        if self.plan.train_on != TrainOn::All && done.iter().any(|d| d.enc.trained() == 0) {
            return Err(("messages", "no token of the sample is trained (empty responses and no end-of-turn token)".to_string()));
        }
        Ok(Outcome::Keep(done))
    }

    /// `overlong = "split_turns"`, with each part keeping the sample's images.
    fn split_turns(&self, messages: &[Message], counts: MediaCounts<'_>) -> RowResult<Vec<Encoded>> {
        let (image_counts, audio_counts, video_counts) = counts;
        overlong::split_turns(messages, self.plan.seq_len as usize, |chunk| {
            let mut chunk = chunk.to_vec();
            if let Some(img) = self.plan.image.as_ref().filter(|_| !image_counts.is_empty()) {
                media::place_images(&mut chunk, &img.placeholder, image_counts.len()).map_err(|m| ("image", m))?;
            }
            if let Some(aud) = self.plan.audio.as_ref().filter(|_| !audio_counts.is_empty()) {
                media::place_images(&mut chunk, &aud.placeholder, audio_counts.len()).map_err(|m| ("audio", m))?;
            }
            if let Some(vid) = self.plan.video.as_ref().filter(|_| !video_counts.is_empty()) {
                media::place_images(&mut chunk, &vid.placeholder, video_counts.len()).map_err(|m| ("video", m))?;
            }
            self.encode(&chunk, counts)
        })
    }
}

fn append(store: &mut Store, spill: &mut Spill, batch: &Batch, i: usize, done: Done) -> Result<()> {
    let Done { enc, template, image_paths, image_grids, audios, videos, truncated, part } = done;
    let rec = SampleRec {
        row: batch.rows[i],
        part,
        record: spill.append(&enc)?,
        len: enc.ids.len() as u32,
        trained: enc.trained() as u32,
        template,
        ..store.next_media([enc.images.len(), enc.audios.len(), enc.videos.len()])
    };
    if let Some((_, paths)) = &batch.video {
        for (k, info) in videos {
            store.push_video(paths.get(k).unwrap_or_default(), info);
        }
    }
    if let Some((_, paths)) = &batch.audio {
        for (k, info) in audios {
            store.push_audio(paths.get(k).unwrap_or_default(), info);
        }
    }
    for k in image_paths {
        // Validated as UTF-8 when the image was read.
        store.push_image_path(batch.images.get(k).unwrap_or_default());
    }
    store.image_grids.extend(image_grids);
    store.stats.truncated += truncated as u64;
    store.samples.push(rec);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::columns::StrCol;

    pub(crate) const TOKENIZER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/models/smollm2/tokenizer.json");

    pub(crate) fn plan(extra: &str) -> Plan {
        let template = crate::render::builtin("chatml").unwrap();
        let json = format!(
            r#"{{"seed": 3, "chat_template": {}, "eos_token": "<|im_end|>", "seq_len": 64, "mixture": "natural",
                "sources": [{{"name": "a"}}, {{"name": "b", "templates": ["Q: {{question}}", "{{question}}?"]}}] {extra}}}"#,
            serde_json::to_string(template).unwrap()
        );
        serde_json::from_str(&json).unwrap()
    }

    /// Owned columns for a batch of conversations given as (role, text) lists.
    pub(crate) struct Cols {
        pub(crate) rows: Vec<u64>,
        turn_offsets: Vec<i64>,
        roles: Vec<u8>,
        offsets: Vec<i64>,
        data: Vec<u8>,
        image_offsets: Vec<i64>,
        no_paths: Vec<i64>,
    }

    pub(crate) fn cols(convs: &[Vec<(u8, &str)>]) -> Cols {
        let mut c = Cols {
            rows: (0..convs.len() as u64).collect(),
            turn_offsets: vec![0],
            roles: vec![],
            offsets: vec![0],
            data: vec![],
            image_offsets: vec![0; convs.len() + 1],
            no_paths: vec![0],
        };
        for conv in convs {
            for (r, t) in conv {
                c.roles.push(*r);
                c.data.extend_from_slice(t.as_bytes());
                c.offsets.push(c.data.len() as i64);
            }
            c.turn_offsets.push(c.roles.len() as i64);
        }
        c
    }

    pub(crate) fn batch(c: &Cols) -> Batch<'_> {
        Batch {
            rows: &c.rows,
            turn_offsets: &c.turn_offsets,
            roles: &c.roles,
            contents: StrCol { offsets: &c.offsets, data: &c.data },
            image_offsets: &c.image_offsets,
            images: StrCol { offsets: &c.no_paths, data: &[] },
            image_data: None,
            fields: vec![],
            audio: None,
            video: None,
        }
    }

    pub(crate) fn convs(n: usize) -> Vec<Vec<(u8, &'static str)>> {
        (0..n)
            .map(|i| vec![(1, "hello there"), (2, if i % 3 == 0 { "short" } else { "a somewhat longer answer here" })])
            .collect()
    }

    #[test]
    fn same_output_for_any_thread_count() {
        let c = cols(&convs(40));
        let run = |threads| {
            let mut comp = Compiler::new(plan(""), TOKENIZER, threads, None).unwrap();
            comp.add_batch(0, &batch(&c)).unwrap();
            comp.add_batch(1, &batch(&c)).unwrap();
            comp.finish().unwrap();
            let p = comp.emit(0, usize::MAX).unwrap();
            (p.input_ids, p.loss_mask, p.segment_row, p.segment_template, p.row_offsets)
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(4));
    }

    #[test]
    fn templates_apply_to_user_turns_only_where_configured() {
        let c = cols(&convs(20));
        let mut comp = Compiler::new(plan(""), TOKENIZER, 1, None).unwrap();
        comp.add_batch(0, &batch(&c)).unwrap();
        comp.add_batch(1, &batch(&c)).unwrap();
        comp.finish().unwrap();
        let p = comp.emit(0, usize::MAX).unwrap();
        for (s, t) in p.segment_source.iter().zip(&p.segment_template) {
            assert_eq!(*s == 1, *t >= 0);
        }
        let used: std::collections::HashSet<i32> = p.segment_template.iter().copied().filter(|&t| t >= 0).collect();
        assert_eq!(used.len(), 2);
    }

    /// `<video>` runs through the whole pipeline: the recipe's added tokens in the
    /// tokenizer, a placeholder put where the text has none, each run in its wrappers at
    /// the recorded position, with the clip's grid and frames.
    #[test]
    fn video_runs_from_container_metadata() {
        let clips = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data/video/clips");
        let names = ["ntsc-320x240.mp4", "rotated-128x72.mp4"];
        let extra = r#", "added_tokens": ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"],
            "video": {"placeholder": "<video>", "token": "<|video_pad|>", "start": "<|vision_start|>", "end": "<|vision_end|>"}"#;
        let mut p = plan(extra);
        p.seq_len = 2048;
        p.sources.truncate(1);
        p.sources[0].video_root = Some(clips.to_string());
        let c = cols(&[vec![(1, "<video>\nwhat is this?"), (2, "a gradient")], vec![(1, "and this?"), (2, "another one")]]);
        let (offsets, mut data, mut ends) = (vec![0i64, 1, 2], Vec::new(), vec![0i64]);
        for n in names {
            data.extend_from_slice(n.as_bytes());
            ends.push(data.len() as i64);
        }
        let mut b = batch(&c);
        b.video = Some((&offsets, StrCol { offsets: &ends, data: &data }));
        let mut comp = Compiler::new(p, TOKENIZER, 1, None).unwrap();
        let tk = comp.tokenizer();
        let (token, start, end) = (tk.video_token().unwrap(), tk.token_id("<|vision_start|>").unwrap(), tk.token_id("<|vision_end|>").unwrap());
        assert_eq!((start, end, token), (49153, 49154, 49155)); // after the vocabulary, in order
        assert_eq!(comp.add_batch(0, &b).unwrap(), 2);
        comp.finish().unwrap();
        let out = comp.emit(0, usize::MAX).unwrap();
        assert_eq!(out.video_lengths.len(), 2);
        let path_of = |k: usize| std::str::from_utf8(&out.video_path_data[out.video_path_offsets[k] as usize..out.video_path_offsets[k + 1] as usize]).unwrap();
        for k in 0..2 {
            let want = video::video_info(comp.plan().video.as_ref().unwrap(), &Path::new(clips).join(path_of(k))).unwrap();
            let row = (0..out.row_offsets.len() - 1).find(|&r| out.video_offsets[r] as usize <= k && k < out.video_offsets[r + 1] as usize).unwrap();
            let (pos, n) = (out.row_offsets[row] as usize + out.video_positions[k] as usize, out.video_lengths[k] as usize);
            assert_eq!(n as u32, want.tokens);
            assert_eq!([out.video_grid_t[k], out.video_grid_h[k], out.video_grid_w[k]], want.grid);
            assert_eq!(out.video_frames[k], want.frames);
            assert!(out.input_ids[pos..pos + n].iter().all(|&t| t == token));
            assert_eq!((out.input_ids[pos - 1], out.input_ids[pos + n]), (start, end));
            assert!(out.loss_mask[pos - 1..=pos + n].iter().all(|&m| m == 0));
        }
        assert_eq!(out.input_ids.iter().filter(|&&t| t == token).count(), out.video_lengths.iter().sum::<u32>() as usize);
    }

    #[test]
    fn overlong_policies() {
        let long: String = "word ".repeat(80);
        let conv = vec![vec![(1u8, "q1"), (2u8, "a1"), (1, "q2"), (2, long.as_str()), (1, "q3"), (2, "a3")]];
        let c = cols(&conv);
        for (policy, samples) in [("drop", 0usize), ("truncate", 1), ("split_turns", 2)] {
            let mut comp = Compiler::new(plan(&format!(r#", "overlong": "{policy}""#)), TOKENIZER, 1, None).unwrap();
            comp.add_batch(0, &batch(&c)).unwrap();
            let store = &comp.stores[0];
            assert_eq!(store.samples.len(), samples, "{policy}");
            for s in &store.samples {
                assert!(s.len <= 64);
                assert!(s.trained > 0, "{policy}: a kept sample must train something");
            }
        }
    }

    #[test]
    fn data_errors_name_the_row_or_skip() {
        let conv = vec![vec![(1u8, "ok"), (2u8, "fine")], vec![(1u8, "no answer")]];
        let c = cols(&conv);
        let mut comp = Compiler::new(plan(""), TOKENIZER, 1, None).unwrap();
        let err = comp.add_batch(0, &batch(&c)).unwrap_err();
        assert!(matches!(err, Error::Data { row: 1, .. }), "{err}");
        let mut skip = plan("");
        skip.sources[0].on_error = OnError::Skip;
        let mut comp = Compiler::new(skip, TOKENIZER, 1, None).unwrap();
        assert_eq!(comp.add_batch(0, &batch(&c)).unwrap(), 1);
        assert_eq!(comp.stores[0].stats.skipped, 1);
    }

    /// The shadow check samples about 1 in 1000 rows, and a wrong fast engine stops the
    /// build with the text, both id lists and the switch, even with on_error = "skip".
    #[test]
    fn shadow_check_stops_a_build_on_a_mismatch() {
        let n = 3000;
        let shadowed: Vec<u64> = (0..n as u64)
            .filter(|&r| rng::below(rng::keyed(3, rng::name_hash("a"), r, rng::PURPOSE_SHADOW), SHADOW_ONE_IN) == 0)
            .collect();
        assert!((1..10).contains(&shadowed.len()), "{shadowed:?}");
        let c = cols(&convs(n));
        let mut skip = plan("");
        skip.sources[0].on_error = OnError::Skip;
        let mut comp = Compiler::new(skip.clone(), TOKENIZER, 2, None).unwrap();
        assert_eq!(comp.tokenizer.engine().0, "fast");
        assert_eq!(comp.add_batch(0, &batch(&c)).unwrap(), n, "an exact engine passes the check");
        let mut comp = Compiler::new(skip, TOKENIZER, 2, None).unwrap();
        comp.tokenizer.inject_fast_engine_fault();
        let err = comp.add_batch(0, &batch(&c)).unwrap_err().to_string();
        assert!(err.contains(&format!("row {}:", shadowed[0])), "{err}");
        for want in
            ["shadow check", "hello there", "fast ids: [", "hf ids:", "tokenizer_engine = \"hf\"", "--tokenizer-engine hf"]
        {
            assert!(err.contains(want), "{want}: {err}");
        }
        // Forced HF: no shadow check, the fault is not reached.
        let mut comp = Compiler::new(plan(r#", "tokenizer_engine": "hf""#), TOKENIZER, 2, None).unwrap();
        comp.tokenizer.inject_fast_engine_fault();
        assert_eq!(comp.tokenizer.engine().0, "hf");
        assert_eq!(comp.add_batch(0, &batch(&c)).unwrap(), n);
    }

    #[test]
    fn malformed_columns_are_rejected_not_panicking() {
        let mut c = cols(&convs(3));
        c.turn_offsets[2] = 99;
        let mut comp = Compiler::new(plan(""), TOKENIZER, 1, None).unwrap();
        assert!(matches!(comp.add_batch(0, &batch(&c)), Err(Error::Internal(_))));
    }
}
