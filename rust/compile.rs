//! The per-source batch pipeline and the final mix + pack.
//!
//! Python hands over whole columns per batch (rows, turns, contents, images, extra
//! fields); each sample is turned into messages (instruction template applied), rendered,
//! tokenized and masked in parallel; results are appended in row order, so the output is
//! the same for any thread count. `finish` computes exact mixture counts, packs, and
//! returns flat arrays ready to be written as shards.

use crate::error::{Error, Result};
use crate::instruct::{self, Template};
use crate::media;
use crate::mix;
use crate::overlong;
use crate::pack;
use crate::plan::{MixturePlan, OnError, Overlong, Packing, Plan, TrainOn};
use crate::render::{ChatRenderer, Message, Role};
use crate::rng;
use crate::spill::{Record, Spill};
use crate::tokenize::{Encoded, TextTokenizer};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A string column as Arrow lays it out: `offsets[i]..offsets[i+1]` into `data`.
#[derive(Clone, Copy)]
pub struct StrCol<'a> {
    pub offsets: &'a [i64],
    pub data: &'a [u8],
}

impl<'a> StrCol<'a> {
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, what: &str) -> Result<()> {
        self.check_str().map_err(|message| Error::plan(what, message))
    }

    /// Offsets in order and inside the data: a malformed column is an error, not a panic.
    pub fn check_str(&self) -> std::result::Result<(), String> {
        let ok = !self.offsets.is_empty()
            && self.offsets.windows(2).all(|w| w[0] <= w[1])
            && self.offsets[0] >= 0
            && (*self.offsets.last().unwrap() as usize) <= self.data.len();
        if ok {
            Ok(())
        } else {
            Err("malformed string column passed to the core (offsets out of order or out of range)".into())
        }
    }

    pub fn get(&self, i: usize) -> std::result::Result<&'a str, String> {
        let (s, e) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        std::str::from_utf8(&self.data[s..e]).map_err(|e| format!("not valid UTF-8 ({e})"))
    }
}

/// One batch of one source, as columns.
pub struct Batch<'a> {
    pub rows: &'a [u64],
    /// Per sample, the range of its turns: `turn_offsets[i]..turn_offsets[i+1]`.
    pub turn_offsets: &'a [i64],
    /// Per turn: 0 system, 1 user, 2 assistant.
    pub roles: &'a [u8],
    pub contents: StrCol<'a>,
    /// Per sample, the range of its images in `images`.
    pub image_offsets: &'a [i64],
    pub images: StrCol<'a>,
    /// Extra per-sample fields for instruction templates, in the plan's order.
    pub fields: Vec<StrCol<'a>>,
}

fn check_offsets(offsets: &[i64], n: usize, len: usize, what: &str) -> Result<()> {
    let ok = offsets.len() == n + 1 && offsets[0] == 0 && offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[n] as usize == len;
    if ok {
        Ok(())
    } else {
        Err(Error::plan(what, "malformed offsets passed to the core"))
    }
}

impl Batch<'_> {
    fn validate(&self, n_fields: usize) -> Result<()> {
        let n = self.rows.len();
        self.contents.check("batch.contents")?;
        self.images.check("batch.images")?;
        check_offsets(self.turn_offsets, n, self.roles.len(), "batch.turn_offsets")?;
        check_offsets(self.image_offsets, n, self.images.len(), "batch.image_offsets")?;
        if self.contents.len() != self.roles.len() {
            return Err(Error::plan("batch.contents", "one content per turn expected"));
        }
        if self.fields.len() != n_fields {
            return Err(Error::plan("batch.fields", format!("{n_fields} field columns expected, got {}", self.fields.len())));
        }
        for f in &self.fields {
            f.check("batch.fields")?;
            if f.len() != n {
                return Err(Error::plan("batch.fields", "one value per sample expected"));
            }
        }
        Ok(())
    }
}

/// One previewed sample: (rendered text, tokens, template id), or why it is unusable.
pub type Preview = std::result::Result<(String, Encoded, i32), String>;

/// What the build keeps of one usable sample.
#[derive(Debug, Clone, Copy)]
struct SampleRec {
    row: u64,
    part: u16,
    record: Record,
    len: u32,
    trained: u32,
    /// First of its images in the store's image paths.
    img: u32,
    n_img: u32,
    template: i32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStats {
    pub name: String,
    pub rows: u64,
    pub skipped: u64,
    pub dropped_overlong: u64,
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

#[derive(Default)]
struct Store {
    samples: Vec<SampleRec>,
    image_paths: String,
    image_path_ends: Vec<u64>,
    stats: SourceStats,
}

/// One processed sample before it joins its source's store.
struct Done {
    enc: Encoded,
    template: i32,
    image_paths: Vec<usize>,
    truncated: bool,
    /// Which piece of a conversation split at turn boundaries (0 otherwise).
    part: u16,
}

enum Outcome {
    Keep(Vec<Done>),
    Overlong,
}

/// The packed release, as flat arrays (offsets index rows into the flat values).
#[derive(Default)]
pub struct Packed {
    pub row_offsets: Vec<i64>,
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    pub seg_offsets: Vec<i64>,
    pub seg_lengths: Vec<u32>,
    pub seg_source: Vec<u16>,
    pub seg_row: Vec<u64>,
    pub seg_part: Vec<u16>,
    pub seg_template: Vec<i32>,
    pub seg_repeat: Vec<u32>,
    pub seg_images: Vec<u32>,
    pub img_offsets: Vec<i64>,
    pub img_pos: Vec<u32>,
    pub img_len: Vec<u32>,
    pub img_path_offsets: Vec<i64>,
    pub img_path_data: Vec<u8>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub sources: Vec<SourceStats>,
    pub sequences: u64,
    pub segments: u64,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub seq_len: u32,
    /// Tokens over sequences × seq_len.
    pub fill: f64,
    /// ⌈tokens / seq_len⌉: the fewest sequences any packing could use.
    pub lower_bound: u64,
    /// lower_bound / sequences: 1.0 means no packing could do better.
    pub packing_efficiency: f64,
}

/// The packing decided by `finish`: items (source, pick) and the rows they fill.
struct Layout {
    items: Vec<(u16, mix::Pick)>,
    bins: Vec<Vec<u32>>,
}

pub struct Compiler {
    plan: Plan,
    spill: Spill,
    layout: Option<Layout>,
    renderer: ChatRenderer,
    tokenizer: TextTokenizer,
    templates: Vec<Vec<Template>>,
    source_keys: Vec<u64>,
    stores: Vec<Store>,
    pool: rayon::ThreadPool,
    pool_pid: u32,
    threads: usize,
}

fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("mmrecipe-{i}"))
        .build()
        .map_err(|e| Error::plan("threads", e.to_string()))
}

impl Compiler {
    /// `spill_dir`: where tokenized samples wait for packing (None: in memory).
    pub fn new(plan: Plan, tokenizer_path: &str, threads: usize, spill_dir: Option<&Path>) -> Result<Self> {
        if plan.seq_len < 2 {
            return Err(Error::plan("output.seq_len", "must be at least 2"));
        }
        let renderer = ChatRenderer::new(&plan.chat_template, plan.bos_token.as_deref(), plan.eos_token.as_deref())?;
        let tk = TextTokenizer::from_file(tokenizer_path)?;
        let image = plan.image.as_ref().map(|i| (i.placeholder.as_str(), i.token.as_str(), i.start.as_deref(), i.end.as_deref()));
        let tokenizer = TextTokenizer::new(tk, image)?;
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
        let source_keys = plan.sources.iter().map(|s| rng::name_hash(&s.name)).collect();
        let stores = plan
            .sources
            .iter()
            .map(|s| Store {
                stats: SourceStats { name: s.name.clone(), weight: s.weight, ..Default::default() },
                ..Default::default()
            })
            .collect();
        let threads = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { threads };
        Ok(Compiler {
            plan,
            spill: Spill::new(spill_dir)?,
            layout: None,
            renderer,
            tokenizer,
            templates,
            source_keys,
            stores,
            pool: build_pool(threads)?,
            pool_pid: std::process::id(),
            threads,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Worker threads do not survive a fork (PyTorch DataLoader workers fork): rebuild.
    fn ensure_pool(&mut self) -> Result<()> {
        if self.pool_pid != std::process::id() {
            self.pool = build_pool(self.threads)?;
            self.pool_pid = std::process::id();
        }
        Ok(())
    }

    /// Renders and tokenizes conversations on the build's thread pool (previews and tests;
    /// not the build path).
    pub fn encode_many(&mut self, chats: &[(Vec<Message>, Vec<u32>)]) -> Result<Vec<Result<(String, Encoded)>>> {
        self.ensure_pool()?;
        Ok(self.pool.install(|| chats.par_iter().map(|(m, counts)| self.encode_messages(m, counts)).collect()))
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

    /// Adds one batch of a source. Returns the number of usable samples it added.
    pub fn add_batch(&mut self, source: usize, batch: &Batch) -> Result<usize> {
        if source >= self.stores.len() {
            return Err(Error::plan("source", format!("no source with index {source}")));
        }
        batch.validate(self.plan.sources[source].fields.len())?;
        self.ensure_pool()?;
        let n = batch.rows.len();
        let results: Vec<std::result::Result<Outcome, (&'static str, String)>> =
            self.pool.install(|| (0..n).into_par_iter().map(|i| self.process(source, batch, i)).collect());
        let on_error = self.plan.sources[source].on_error;
        let name = self.plan.sources[source].name.clone();
        if self.layout.is_some() {
            return Err(Error::plan("build", "samples added after finish()"));
        }
        let store = &mut self.stores[source];
        let spill = &mut self.spill;
        let before = store.samples.len();
        for (i, result) in results.into_iter().enumerate() {
            store.stats.rows += 1;
            match result {
                Ok(Outcome::Overlong) => store.stats.dropped_overlong += 1,
                Ok(Outcome::Keep(done)) => {
                    for d in done {
                        append(store, spill, batch, i, d)?;
                    }
                }
                Err((field, message)) => {
                    let row = batch.rows[i];
                    if on_error == OnError::Fail {
                        return Err(Error::Data { source: name, row, field: field.to_string(), message });
                    }
                    store.stats.skipped += 1;
                    if store.stats.skipped_examples.len() < 5 {
                        store.stats.skipped_examples.push(format!("row {row}, field '{field}': {message}"));
                    }
                }
            }
        }
        Ok(store.samples.len() - before)
    }

    fn process(&self, source: usize, batch: &Batch, i: usize) -> std::result::Result<Outcome, (&'static str, String)> {
        let plan = &self.plan;
        let (messages, template, image_counts) = self.sample_messages(source, batch, i)?;
        let (i0, i1) = (batch.image_offsets[i] as usize, batch.image_offsets[i + 1] as usize);
        let image_paths: Vec<usize> = (i0..i1).collect();
        let enc = self.encode(&messages, &image_counts)?;
        if enc.ids.len() <= plan.seq_len as usize {
            return self.keep(vec![Done { enc, template, image_paths, truncated: false, part: 0 }]);
        }
        match plan.overlong {
            Overlong::Drop => Ok(Outcome::Overlong),
            Overlong::Truncate => {
                let mut enc = enc;
                if !overlong::truncate(&mut enc, plan.seq_len as usize, self.tokenizer.image_wrappers()) {
                    return Ok(Outcome::Overlong);
                }
                let mut image_paths = image_paths;
                image_paths.truncate(enc.images.len());
                self.keep(vec![Done { enc, template, image_paths, truncated: true, part: 0 }])
            }
            Overlong::SplitTurns => {
                let parts = self.split_turns(&messages, &image_counts)?;
                if parts.is_empty() {
                    return Ok(Outcome::Overlong);
                }
                let done = parts
                    .into_iter()
                    .enumerate()
                    .map(|(k, enc)| Done { enc, template, image_paths: image_paths.clone(), truncated: true, part: k as u16 })
                    .collect();
                self.keep(done)
            }
        }
    }

    /// Rendered text, tokens and template of samples of a batch, exactly as a build makes
    /// them (before overlong handling); for `recipe preview`.
    pub fn preview(&mut self, source: usize, batch: &Batch) -> Result<Vec<Preview>> {
        batch.validate(self.plan.sources[source].fields.len())?;
        self.ensure_pool()?;
        let n = batch.rows.len();
        Ok(self.pool.install(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let (messages, template, counts) =
                        self.sample_messages(source, batch, i).map_err(|(f, m)| format!("{f}: {m}"))?;
                    let rendered = self.renderer.render(&messages).map_err(|e| e.to_string())?;
                    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
                    let enc = self.tokenizer.encode(&rendered, &roles, &counts, self.plan.train_on, self.plan.train_on_eos)?;
                    Ok((rendered.text, enc, template))
                })
                .collect()
        }))
    }

    /// The messages of sample `i` with its instruction template applied and image
    /// placeholders in place, the template id, and the image token counts.
    #[allow(clippy::type_complexity)]
    fn sample_messages(
        &self,
        source: usize,
        batch: &Batch,
        i: usize,
    ) -> std::result::Result<(Vec<Message>, i32, Vec<u32>), (&'static str, String)> {
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
                let k = instruct::choose(plan.seed, self.source_keys[source], row, user_turn, pool.len());
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
        if plan.train_on != TrainOn::All && !messages.iter().any(|m| m.role == Role::Assistant) {
            return Err(("messages", "the sample has no assistant turn to train on".to_string()));
        }

        let (i0, i1) = (batch.image_offsets[i] as usize, batch.image_offsets[i + 1] as usize);
        let mut image_counts = Vec::with_capacity(i1 - i0);
        if i1 > i0 {
            let Some(img) = &plan.image else {
                return Err(("image", "the sample has images but the recipe sets no [model.image]".to_string()));
            };
            let root = src.image_root.as_deref().map(Path::new).unwrap_or(Path::new(""));
            for k in i0..i1 {
                let rel = batch.images.get(k).map_err(|m| ("image", m))?;
                let path: PathBuf = root.join(rel);
                image_counts.push(media::image_tokens(img, &path).map_err(|m| ("image", m))?);
            }
            media::place_images(&mut messages, &img.placeholder, i1 - i0).map_err(|m| ("image", m))?;
        }
        Ok((messages, template, image_counts))
    }

    fn encode(&self, messages: &[Message], image_counts: &[u32]) -> std::result::Result<Encoded, (&'static str, String)> {
        let rendered = self.renderer.render(messages).map_err(|e| ("messages", e.to_string()))?;
        let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
        self.tokenizer
            .encode(&rendered, &roles, image_counts, self.plan.train_on, self.plan.train_on_eos)
            .map_err(|m| ("messages", m))
    }

    fn keep(&self, done: Vec<Done>) -> std::result::Result<Outcome, (&'static str, String)> {
        if self.plan.train_on != TrainOn::All && done.iter().any(|d| d.enc.trained() == 0) {
            return Err(("messages", "no token of the sample is trained (empty responses and no end-of-turn token)".to_string()));
        }
        Ok(Outcome::Keep(done))
    }

    /// `overlong = "split_turns"`, with each part keeping the sample's images.
    fn split_turns(
        &self,
        messages: &[Message],
        image_counts: &[u32],
    ) -> std::result::Result<Vec<Encoded>, (&'static str, String)> {
        overlong::split_turns(messages, self.plan.seq_len as usize, |chunk| {
            let mut chunk = chunk.to_vec();
            if let Some(img) = self.plan.image.as_ref().filter(|_| !image_counts.is_empty()) {
                media::place_images(&mut chunk, &img.placeholder, image_counts.len()).map_err(|m| ("image", m))?;
            }
            self.encode(&chunk, image_counts)
        })
    }

    /// Exact mixture and packing; returns the summary. Rows come from `emit`.
    pub fn finish(&mut self) -> Result<Summary> {
        let plan = &self.plan;
        for (s, store) in self.stores.iter_mut().enumerate() {
            store.stats.usable = store.samples.len() as u64;
            if store.samples.is_empty() {
                return Err(Error::plan(
                    format!("source[{s}]"),
                    format!(
                        "source '{}' has no usable samples ({} rows, {} skipped, {} over seq_len {})",
                        store.stats.name, store.stats.rows, store.stats.skipped, store.stats.dropped_overlong, plan.seq_len
                    ),
                ));
            }
        }
        let sizes: Vec<u64> = self.stores.iter().map(|s| s.samples.len() as u64).collect();
        let weights: Vec<f64> = plan.sources.iter().map(|s| s.weight).collect();
        let weights = mix::effective_weights(&weights, &sizes, plan.alpha);
        let rows_of = |store: &Store| store.samples.iter().map(|r| r.row).collect::<Vec<u64>>();
        // Items in mixture order: (source, pick).
        let picks: Vec<Vec<mix::Pick>> = match plan.mixture {
            MixturePlan::Natural | MixturePlan::Samples(_) => {
                let counts = match plan.mixture {
                    MixturePlan::Samples(total) => mix::largest_remainder(&weights, total),
                    _ => sizes.clone(),
                };
                self.stores
                    .iter()
                    .enumerate()
                    .map(|(s, st)| mix::select(&rows_of(st), counts[s], plan.seed, self.source_keys[s]))
                    .collect()
            }
            MixturePlan::Tokens(total) => {
                let targets = mix::largest_remainder(&weights, total);
                self.stores
                    .iter()
                    .enumerate()
                    .map(|(s, st)| {
                        let lengths: Vec<u32> = st.samples.iter().map(|r| r.len).collect();
                        mix::select_tokens(&rows_of(st), &lengths, targets[s], plan.seed, self.source_keys[s])
                    })
                    .collect()
            }
        };
        for (s, src) in plan.sources.iter().enumerate() {
            let epochs = picks[s].len() as f64 / sizes[s] as f64;
            if let Some(max) = src.max_epochs {
                if epochs > max + 1e-9 {
                    return Err(Error::plan(
                        format!("source[{s}].max_epochs"),
                        format!(
                            "source '{}' would be repeated {epochs:.2} times ({} samples from {} usable) but max_epochs = {max}; lower its weight or the total, or raise max_epochs",
                            src.name, picks[s].len(), sizes[s]
                        ),
                    ));
                }
            }
        }
        let counts: Vec<u64> = picks.iter().map(|p| p.len() as u64).collect();
        let mut next = vec![0usize; picks.len()];
        let items: Vec<(u16, mix::Pick)> = mix::interleave(&counts)
            .into_iter()
            .map(|s| {
                let p = picks[s as usize][next[s as usize]];
                next[s as usize] += 1;
                (s, p)
            })
            .collect();
        let lengths: Vec<u32> = items.iter().map(|(s, p)| self.stores[*s as usize].samples[p.index as usize].len).collect();
        let mut bins: Vec<Vec<u32>> = match plan.packing {
            Packing::Bfd => {
                let mut bins = pack::best_fit_decreasing(&lengths, plan.seq_len);
                for b in bins.iter_mut() {
                    b.sort_unstable(); // segments in mixture order within a row
                }
                bins
            }
            Packing::None => (0..items.len() as u32).map(|i| vec![i]).collect(),
        };
        if plan.shuffle {
            rng::shuffle(&mut bins, plan.seed, rng::name_hash("mmrecipe/rows"));
        } else if plan.packing == Packing::Bfd {
            bins.sort_unstable_by_key(|b| b[0]);
        }

        let mut sources: Vec<SourceStats> = self.stores.iter().map(|s| s.stats.clone()).collect();
        let (mut tokens, mut trained) = (0u64, 0u64);
        for &(s, pick) in &items {
            let rec = self.stores[s as usize].samples[pick.index as usize];
            let st = &mut sources[s as usize];
            st.selected += 1;
            st.tokens += rec.len as u64;
            st.trained_tokens += rec.trained as u64;
            st.images += rec.n_img as u64;
            tokens += rec.len as u64;
            trained += rec.trained as u64;
        }
        let lower_bound = pack::lower_bound(&lengths, plan.seq_len);
        let sequences = bins.len() as u64;
        let summary = Summary {
            sources,
            sequences,
            segments: items.len() as u64,
            tokens,
            trained_tokens: trained,
            seq_len: plan.seq_len,
            fill: if sequences == 0 { 0.0 } else { tokens as f64 / (sequences as f64 * plan.seq_len as f64) },
            lower_bound,
            packing_efficiency: if sequences == 0 { 1.0 } else { lower_bound as f64 / sequences as f64 },
        };
        self.layout = Some(Layout { items, bins });
        Ok(summary)
    }

    /// The packed rows `lo..hi` (after `finish`), as flat arrays; rows are emitted in
    /// pieces so a release is written without holding it all in memory.
    pub fn emit(&mut self, lo: usize, hi: usize) -> Result<Packed> {
        let layout = self.layout.as_ref().ok_or_else(|| Error::plan("build", "emit() before finish()"))?;
        let hi = hi.min(layout.bins.len());
        let image_token = self.tokenizer.image_token().unwrap_or(0);
        let mut out = Packed::default();
        out.row_offsets.push(0);
        out.seg_offsets.push(0);
        out.img_offsets.push(0);
        out.img_path_offsets.push(0);
        for bin in &layout.bins[lo.min(hi)..hi] {
            for &it in bin {
                let (s, pick) = layout.items[it as usize];
                let store = &self.stores[s as usize];
                let rec = store.samples[pick.index as usize];
                let base = out.input_ids.len() as u32;
                let runs = self.spill.read(rec.record, image_token, &mut out.input_ids, &mut out.loss_mask)?;
                for (k, run) in runs.iter().enumerate() {
                    let k = rec.img as usize + k;
                    out.img_pos.push(base + run.pos);
                    out.img_len.push(run.len);
                    let start = if k == 0 { 0 } else { store.image_path_ends[k - 1] as usize };
                    let end = store.image_path_ends[k] as usize;
                    out.img_path_data.extend_from_slice(&store.image_paths.as_bytes()[start..end]);
                    out.img_path_offsets.push(out.img_path_data.len() as i64);
                }
                out.seg_lengths.push(rec.len);
                out.seg_source.push(s);
                out.seg_row.push(rec.row);
                out.seg_part.push(rec.part);
                out.seg_template.push(rec.template);
                out.seg_repeat.push(pick.repeat);
                out.seg_images.push(rec.n_img);
            }
            out.row_offsets.push(out.input_ids.len() as i64);
            out.seg_offsets.push(out.seg_lengths.len() as i64);
            out.img_offsets.push(out.img_pos.len() as i64);
        }
        Ok(out)
    }
}

fn append(store: &mut Store, spill: &mut Spill, batch: &Batch, i: usize, done: Done) -> Result<()> {
    let Done { enc, template, image_paths, truncated, part } = done;
    let rec = SampleRec {
        row: batch.rows[i],
        part,
        record: spill.append(&enc)?,
        len: enc.ids.len() as u32,
        trained: enc.trained() as u32,
        img: store.image_path_ends.len() as u32,
        n_img: enc.images.len() as u32,
        template,
    };
    for k in image_paths {
        // Validated as UTF-8 when the image was read.
        store.image_paths.push_str(batch.images.get(k).unwrap_or_default());
        store.image_path_ends.push(store.image_paths.len() as u64);
    }
    store.stats.truncated += truncated as u64;
    store.samples.push(rec);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENIZER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/models/smollm2/tokenizer.json");

    fn plan(extra: &str) -> Plan {
        let template = crate::render::builtin("chatml").unwrap();
        let json = format!(
            r#"{{"seed": 3, "chat_template": {}, "eos_token": "<|im_end|>", "seq_len": 64, "mixture": "natural",
                "sources": [{{"name": "a"}}, {{"name": "b", "templates": ["Q: {{question}}", "{{question}}?"]}}] {extra}}}"#,
            serde_json::to_string(template).unwrap()
        );
        serde_json::from_str(&json).unwrap()
    }

    /// Owned columns for a batch of conversations given as (role, text) lists.
    struct Cols {
        rows: Vec<u64>,
        turn_offsets: Vec<i64>,
        roles: Vec<u8>,
        offsets: Vec<i64>,
        data: Vec<u8>,
        image_offsets: Vec<i64>,
        no_paths: Vec<i64>,
    }

    fn cols(convs: &[Vec<(u8, &str)>]) -> Cols {
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

    fn batch(c: &Cols) -> Batch<'_> {
        Batch {
            rows: &c.rows,
            turn_offsets: &c.turn_offsets,
            roles: &c.roles,
            contents: StrCol { offsets: &c.offsets, data: &c.data },
            image_offsets: &c.image_offsets,
            images: StrCol { offsets: &c.no_paths, data: &[] },
            fields: vec![],
        }
    }

    fn convs(n: usize) -> Vec<Vec<(u8, &'static str)>> {
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
            (p.input_ids, p.loss_mask, p.seg_row, p.seg_template, p.row_offsets)
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
        for (s, t) in p.seg_source.iter().zip(&p.seg_template) {
            assert_eq!(*s == 1, *t >= 0);
        }
        let used: std::collections::HashSet<i32> = p.seg_template.iter().copied().filter(|&t| t >= 0).collect();
        assert_eq!(used.len(), 2);
    }

    #[test]
    fn exact_sample_mixture() {
        let c = cols(&convs(7));
        let mut comp = Compiler::new(plan(r#", "packing": "none""#).clone(), TOKENIZER, 2, None).unwrap();
        comp.plan.mixture = MixturePlan::Samples(25);
        comp.add_batch(0, &batch(&c)).unwrap();
        comp.add_batch(1, &batch(&c)).unwrap();
        comp.finish().unwrap();
        let p = comp.emit(0, usize::MAX).unwrap();
        let a = p.seg_source.iter().filter(|&&s| s == 0).count();
        assert_eq!((a, p.seg_source.len()), (13, 25));
        assert_eq!(p.row_offsets.len(), 26);
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

    #[test]
    fn malformed_columns_are_rejected_not_panicking() {
        let mut c = cols(&convs(3));
        c.turn_offsets[2] = 99;
        let mut comp = Compiler::new(plan(""), TOKENIZER, 1, None).unwrap();
        assert!(matches!(comp.add_batch(0, &batch(&c)), Err(Error::Plan { .. })));
    }
}
