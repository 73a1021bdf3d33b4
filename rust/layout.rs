//! The release's layout: which samples are selected (exact mixture counts), in which
//! order (interleaved by source), packed into which rows (best-fit decreasing), with the
//! build's statistics; and the packed rows, emitted in pieces as flat arrays.

use crate::compile::{Compiler, SampleRec, SourceStats, Store};
use crate::error::{Error, Result};
use crate::mix::{self, Pick};
use crate::pack;
use crate::plan::{Balance, MixturePlan, Packing, Plan};
use crate::rng;
use crate::spill::Spill;
use serde::{Deserialize, Serialize};

/// The list columns of a release, in order. Each takes its values from the `Packed`
/// array of the same name, split per row by `row_offsets` (input_ids, loss_mask),
/// `segment_offsets` (segment_*) or `image_offsets` (image_*); `image_paths` is the
/// string column (`image_path_offsets`, `image_path_data`).
pub const RELEASE_COLUMNS: [&str; 15] = [
    "input_ids",
    "loss_mask",
    "segment_lengths",
    "segment_source",
    "segment_row",
    "segment_part",
    "segment_template",
    "segment_repeat",
    "segment_images",
    "image_positions",
    "image_lengths",
    "image_paths",
    "image_grid_t",
    "image_grid_h",
    "image_grid_w",
];

/// Packed rows as flat arrays: row r is `input_ids[row_offsets[r]..row_offsets[r+1]]`,
/// its segments (one per sample) `segment_offsets[r]..segment_offsets[r+1]` of the
/// `segment_*` arrays, its image runs `image_offsets[r]..image_offsets[r+1]` of the
/// `image_*` arrays.
#[derive(Default)]
pub struct Packed {
    pub row_offsets: Vec<i64>,
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    pub segment_offsets: Vec<i64>,
    pub segment_lengths: Vec<u32>,
    pub segment_source: Vec<u16>,
    pub segment_row: Vec<u64>,
    pub segment_part: Vec<u16>,
    pub segment_template: Vec<i32>,
    pub segment_repeat: Vec<u32>,
    pub segment_images: Vec<u32>,
    pub image_offsets: Vec<i64>,
    /// Where each image run starts: a token position in its row.
    pub image_positions: Vec<u32>,
    pub image_lengths: Vec<u32>,
    pub image_path_offsets: Vec<i64>,
    pub image_path_data: Vec<u8>,
    /// Each image's (t, h, w) patch grid under the grid rule; 0 under a fixed count.
    pub image_grid_t: Vec<u32>,
    pub image_grid_h: Vec<u32>,
    pub image_grid_w: Vec<u32>,
    /// Audio runs as image runs: row r's are `audio_offsets[r]..audio_offsets[r+1]`;
    /// each clip's length in samples at the model's rate. Empty without audio.
    pub audio_offsets: Vec<i64>,
    pub audio_positions: Vec<u32>,
    pub audio_lengths: Vec<u32>,
    pub audio_path_offsets: Vec<i64>,
    pub audio_path_data: Vec<u8>,
    pub audio_samples: Vec<u64>,
    /// Video runs as audio runs, each clip's (t, h, w) grid before merging and its frames
    /// sampled (0 under a fixed count). Empty without video.
    pub video_offsets: Vec<i64>,
    pub video_positions: Vec<u32>,
    pub video_lengths: Vec<u32>,
    pub video_path_offsets: Vec<i64>,
    pub video_path_data: Vec<u8>,
    pub video_grid_t: Vec<u32>,
    pub video_grid_h: Vec<u32>,
    pub video_grid_w: Vec<u32>,
    pub video_frames: Vec<u32>,
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
    /// The best of the lower bounds in `packing.bounds`: no packing uses fewer sequences.
    pub lower_bound: u64,
    /// lower_bound / sequences: 1.0 means no packing could do better.
    pub packing_efficiency: f64,
    pub packing: PackingStats,
}

/// How the rows were packed and how close that is to the bounds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PackingStats {
    /// The packer whose rows the release holds (`tight` keeps the best of several).
    pub packer: Option<pack::Packer>,
    pub bounds: pack::Bounds,
    /// sequences / bounds.best − 1.
    pub gap: f64,
    /// Tokens per sequence over seq_len: min, median, max, and how many sequences fall in
    /// each tenth (the last holds full ones).
    pub fill_per_sequence: Spread,
    pub fill_histogram: [u64; 10],
    pub images_per_sequence: Spread,
    /// `[output] max_images`, and the cap `balance = "images"` packed under.
    pub max_images: Option<u32>,
    pub image_cap: Option<u32>,
    /// Under an image budget or balance: the packing by tokens alone, for comparison.
    pub without_image_budget: Option<Unbudgeted>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Unbudgeted {
    pub sequences: u64,
    pub lower_bound: u64,
    pub packing_efficiency: f64,
}

/// The packing decided by `finish`: items (source, pick) in mixture order, and the rows
/// they fill (indices into `items`).
pub(crate) struct Layout {
    pub items: Vec<(u16, Pick)>,
    pub bins: Vec<Vec<u32>>,
}

impl Compiler {
    /// Mixes and packs every sample added; returns the summary. Rows come from `emit`.
    ///
    /// ```text
    ///  stores     a: a0 a1 a2 a3        b: b0 b1           (usable samples per source)
    ///  select     a: a2 a0 a3           b: b1 b0 b1'       exact counts, repeats marked
    ///  interleave a2 b1 a0 b0 a3 b1'                       sources spread evenly
    ///  pack       [a2 b0 ·] [b1 a3] [a0 b1' ·]             best-fit decreasing into
    ///                                                      rows of seq_len tokens, each
    ///                                                      row's segments in mixture order
    ///  order      rows shuffled by the seed (or by their first segment)
    /// ```
    pub fn finish(&mut self) -> Result<Summary> {
        let plan = &self.plan;
        count_usable(plan, &mut self.stores)?;
        let picks = select(plan, &self.stores, &self.source_keys)?;
        let items = interleave(&picks);
        let rec = |&(s, p): &(u16, Pick)| self.stores[s as usize].samples[p.index as usize];
        let lengths: Vec<u32> = items.iter().map(|it| rec(it).len).collect();
        let images: Vec<u32> = items.iter().map(|it| rec(it).n_img).collect();
        let (bins, packing) = pack_rows(plan, &lengths, &images);
        let summary = summarize(plan, &self.stores, &items, bins.len() as u64, packing);
        self.layout = Some(Layout { items, bins });
        Ok(summary)
    }

    /// The packed rows `lo..hi` (after `finish`), as flat arrays; rows are emitted in
    /// pieces so a release is written without holding it all in memory.
    ///
    /// ```text
    ///  row r     input_ids  [ sample ·········· | sample ······ | sample ··· ]  ≤ seq_len
    ///            loss_mask  [ 0 0 0 1 1 1 1 0 0 | 0 0 1 1 1 0 0 | 0 0 1 1 0 ]
    ///            segment_*  one entry per sample: length, source, row, part,
    ///                       template, repeat, images
    ///            image_*    one entry per image run: position, length, path, grid
    /// ```
    pub fn emit(&mut self, lo: usize, hi: usize) -> Result<Packed> {
        let layout = self.layout.as_ref().ok_or_else(|| Error::internal("emit() before finish()"))?;
        let hi = hi.min(layout.bins.len());
        let stores = &self.stores;
        emit_rows(&layout.bins[lo.min(hi)..hi], &mut self.spill, media_tokens(&self.tokenizer), |it| {
            let (s, pick) = layout.items[it as usize];
            (&stores[s as usize], s, pick)
        })
    }
}

/// The ids of the tokens that media runs are made of: image (0 without), audio, video.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct MediaTokens {
    pub image: u32,
    pub audio: Option<u32>,
    pub video: Option<u32>,
}

pub(crate) fn media_tokens(t: &crate::tokenize::TextTokenizer) -> MediaTokens {
    MediaTokens { image: t.image_token().unwrap_or(0), audio: t.audio_token(), video: t.video_token() }
}

/// Emits `bins` (rows of items) as flat arrays; `item` gives each item's store, source
/// and pick.
pub(crate) fn emit_rows<'a>(
    bins: &[Vec<u32>],
    spill: &mut Spill,
    tokens: MediaTokens,
    item: impl Fn(u32) -> (&'a Store, u16, Pick),
) -> Result<Packed> {
    let mut out = Packed::default();
    out.row_offsets.push(0);
    out.segment_offsets.push(0);
    out.image_offsets.push(0);
    out.image_path_offsets.push(0);
    out.audio_offsets.push(0);
    out.audio_path_offsets.push(0);
    out.video_offsets.push(0);
    out.video_path_offsets.push(0);
    for bin in bins {
        let row_start = out.input_ids.len();
        for &it in bin {
            let (store, s, pick) = item(it);
            let seg_start = out.input_ids.len();
            emit_segment(&mut out, spill, store, (s, pick), row_start, tokens.image)?;
            if let Some(token) = tokens.audio {
                emit_audio(&mut out, store, store.samples[pick.index as usize], seg_start, row_start, token)?;
            }
            if let Some(token) = tokens.video {
                emit_video(&mut out, store, store.samples[pick.index as usize], seg_start, row_start, token)?;
            }
        }
        out.audio_offsets.push(out.audio_positions.len() as i64);
        out.video_offsets.push(out.video_positions.len() as i64);
        out.row_offsets.push(out.input_ids.len() as i64);
        out.segment_offsets.push(out.segment_lengths.len() as i64);
        out.image_offsets.push(out.image_positions.len() as i64);
    }
    Ok(out)
}

/// Records each source's usable samples; a source with none is an error.
fn count_usable(plan: &Plan, stores: &mut [Store]) -> Result<()> {
    for (s, store) in stores.iter_mut().enumerate() {
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
    Ok(())
}

/// The samples each source contributes (exact counts of samples or tokens), checked
/// against the sources' `max_epochs`.
fn select(plan: &Plan, stores: &[Store], source_keys: &[u64]) -> Result<Vec<Vec<Pick>>> {
    let sizes: Vec<u64> = stores.iter().map(|s| s.samples.len() as u64).collect();
    let weights: Vec<f64> = plan.sources.iter().map(|s| s.weight).collect();
    let weights = mix::effective_weights(&weights, &sizes, plan.alpha);
    let rows_of = |store: &Store| store.samples.iter().map(|r| r.row).collect::<Vec<u64>>();
    let picks: Vec<Vec<Pick>> = match plan.mixture {
        MixturePlan::Natural | MixturePlan::Samples(_) => {
            let counts = match plan.mixture {
                MixturePlan::Samples(total) => mix::largest_remainder(&weights, total),
                _ => sizes.clone(),
            };
            stores.iter().enumerate().map(|(s, st)| mix::select(&rows_of(st), counts[s], plan.epoch_seed(), source_keys[s])).collect()
        }
        MixturePlan::Tokens(total) => {
            let targets = mix::largest_remainder(&weights, total);
            stores
                .iter()
                .enumerate()
                .map(|(s, st)| {
                    let lengths: Vec<u32> = st.samples.iter().map(|r| r.len).collect();
                    mix::select_tokens(&rows_of(st), &lengths, targets[s], plan.epoch_seed(), source_keys[s])
                })
                .collect()
        }
    };
    check_epochs(plan, &picks, &sizes)?;
    Ok(picks)
}

fn check_epochs(plan: &Plan, picks: &[Vec<Pick>], sizes: &[u64]) -> Result<()> {
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
    Ok(())
}

/// Every source's picks as one sequence (source, pick), sources spread evenly.
fn interleave(picks: &[Vec<Pick>]) -> Vec<(u16, Pick)> {
    let counts: Vec<u64> = picks.iter().map(|p| p.len() as u64).collect();
    let mut next = vec![0usize; picks.len()];
    mix::interleave(&counts)
        .into_iter()
        .map(|s| {
            let p = picks[s as usize][next[s as usize]];
            next[s as usize] += 1;
            (s, p)
        })
        .collect()
}

/// Rows of item indices, packed as the plan says, in the plan's row order, and the
/// packing's stats.
fn pack_rows(plan: &Plan, lengths: &[u32], images: &[u32]) -> (Vec<Vec<u32>>, PackingStats) {
    let budget = pack::Budget { tokens: plan.seq_len, images: plan.max_images };
    let bounds = pack::bounds(lengths, images, plan.seq_len, plan.max_images);
    let mut stats = PackingStats { bounds, max_images: plan.max_images, ..Default::default() };
    // A later epoch hands the packer the items in an order of its own, so samples of equal
    // length share rows with other samples than in epoch 0 (packers break ties by position).
    let order: Option<Vec<u32>> = (plan.epoch > 0 && plan.packing != Packing::None).then(|| {
        let mut order: Vec<u32> = (0..lengths.len() as u32).collect();
        rng::shuffle(&mut order, plan.epoch_seed(), rng::name_hash("mmrecipe/pack"));
        order
    });
    let reordered = |of: &[u32]| -> Vec<u32> { order.as_ref().map(|o| o.iter().map(|&i| of[i as usize]).collect()).unwrap_or_default() };
    let (own_lengths, own_images) = (reordered(lengths), reordered(images));
    let (lengths_in, images_in) = if order.is_some() { (&own_lengths[..], &own_images[..]) } else { (lengths, images) };
    let (mut bins, packer) = match (plan.packing, plan.balance) {
        (Packing::None, _) => ((0..lengths.len() as u32).map(|i| vec![i]).collect(), pack::Packer::None),
        (_, Balance::Images) => {
            let (bins, packer, cap) = pack::balanced(lengths_in, images_in, budget);
            stats.image_cap = cap;
            (bins, packer)
        }
        (Packing::Bfd, Balance::None) => (pack::best_fit_decreasing(lengths_in, images_in, budget), pack::Packer::Bfd),
        (Packing::Tight, Balance::None) => pack::tight(lengths_in, images_in, budget),
    };
    if let Some(order) = &order {
        for b in bins.iter_mut() {
            for i in b.iter_mut() {
                *i = order[*i as usize];
            }
        }
    }
    stats.packer = Some(packer);
    if plan.packing != Packing::None && (plan.max_images.is_some() || plan.balance == Balance::Images) {
        let alone = pack::bounds(lengths, images, plan.seq_len, None).best;
        let sequences = pack::tight(lengths, images, pack::Budget::tokens(plan.seq_len)).0.len() as u64;
        stats.without_image_budget =
            Some(Unbudgeted { sequences, lower_bound: alone, packing_efficiency: efficiency(alone, sequences) });
    }
    if plan.packing != Packing::None {
        for b in bins.iter_mut() {
            b.sort_unstable(); // segments in mixture order within a row
        }
    }
    if plan.shuffle {
        rng::shuffle(&mut bins, plan.epoch_seed(), rng::name_hash("mmrecipe/rows"));
    } else if plan.packing != Packing::None {
        bins.sort_unstable_by_key(|b| b[0]);
    }
    stats.gap = if bounds.best == 0 { 0.0 } else { bins.len() as f64 / bounds.best as f64 - 1.0 };
    let total = |b: &Vec<u32>, of: &[u32]| b.iter().map(|&i| of[i as usize] as f64).sum::<f64>();
    let fills: Vec<f64> = bins.iter().map(|b| total(b, lengths) / plan.seq_len as f64).collect();
    for &fill in &fills {
        stats.fill_histogram[((fill * 10.0) as usize).min(9)] += 1;
    }
    stats.fill_per_sequence = spread(fills.into_iter());
    stats.images_per_sequence = spread(bins.iter().map(|b| total(b, images)));
    (bins, stats)
}

fn efficiency(bound: u64, sequences: u64) -> f64 {
    if sequences == 0 {
        1.0
    } else {
        bound as f64 / sequences as f64
    }
}

/// Min, median, max and mean of some values (all 0 when there are none).
fn spread(values: impl Iterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return Spread::default();
    }
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    Spread { min: v[0], median: v[v.len() / 2], max: v[v.len() - 1], mean }
}

/// Per-source and overall counts of what was selected and packed.
fn summarize(plan: &Plan, stores: &[Store], items: &[(u16, Pick)], sequences: u64, packing: PackingStats) -> Summary {
    let mut sources: Vec<SourceStats> = stores.iter().map(|s| s.stats.clone()).collect();
    let (mut tokens, mut trained) = (0u64, 0u64);
    for &(s, pick) in items {
        let rec = stores[s as usize].samples[pick.index as usize];
        let st = &mut sources[s as usize];
        st.selected += 1;
        st.tokens += rec.len as u64;
        st.trained_tokens += rec.trained as u64;
        st.images += rec.n_img as u64;
        tokens += rec.len as u64;
        trained += rec.trained as u64;
    }
    let lower_bound = packing.bounds.best;
    Summary {
        sources,
        sequences,
        segments: items.len() as u64,
        tokens,
        trained_tokens: trained,
        seq_len: plan.seq_len,
        fill: if sequences == 0 { 0.0 } else { tokens as f64 / (sequences as f64 * plan.seq_len as f64) },
        lower_bound,
        packing_efficiency: efficiency(lower_bound, sequences),
        packing,
    }
}

/// The audio runs of the sample whose tokens start at `seg_start` of `out`: each clip's
/// run is the next stretch of audio tokens (they come from placeholders only: text never
/// tokenizes to them), its length the clip's tokens.
fn emit_audio(out: &mut Packed, store: &Store, rec: SampleRec, seg_start: usize, row_start: usize, token: u32) -> Result<()> {
    let mut at = seg_start;
    for k in rec.aud as usize..(rec.aud + rec.n_aud) as usize {
        let info = store.audio_infos[k];
        let found = out.input_ids[at..].iter().position(|&t| t == token).map(|p| p + at);
        let Some(pos) = found.filter(|&p| p + info.tokens as usize <= out.input_ids.len()) else {
            return Err(Error::internal("an audio run is missing from its sample's tokens"));
        };
        out.audio_positions.push((pos - row_start) as u32);
        out.audio_lengths.push(info.tokens);
        out.audio_path_data.extend_from_slice(store.audio_path(k));
        out.audio_path_offsets.push(out.audio_path_data.len() as i64);
        out.audio_samples.push(info.samples);
        at = pos + info.tokens as usize;
    }
    Ok(())
}

/// The video runs of the sample whose tokens start at `seg_start` of `out`, found as
/// audio runs are (video tokens come from placeholders only).
fn emit_video(out: &mut Packed, store: &Store, rec: SampleRec, seg_start: usize, row_start: usize, token: u32) -> Result<()> {
    let mut at = seg_start;
    for k in rec.vid as usize..(rec.vid + rec.n_vid) as usize {
        let info = store.video_infos[k];
        let found = out.input_ids[at..].iter().position(|&t| t == token).map(|p| p + at);
        let Some(pos) = found.filter(|&p| p + info.tokens as usize <= out.input_ids.len()) else {
            return Err(Error::internal("a video run is missing from its sample's tokens"));
        };
        out.video_positions.push((pos - row_start) as u32);
        out.video_lengths.push(info.tokens);
        out.video_path_data.extend_from_slice(store.video_path(k));
        out.video_path_offsets.push(out.video_path_data.len() as i64);
        out.video_grid_t.push(info.grid[0]);
        out.video_grid_h.push(info.grid[1]);
        out.video_grid_w.push(info.grid[2]);
        out.video_frames.push(info.frames);
        at = pos + info.tokens as usize;
    }
    Ok(())
}

/// Appends one selected sample to `out`, in the row that starts at token `row_start`:
/// its tokens and mask (read back from the spill), its segment, and its image runs
/// (positions in the row) with their paths.
fn emit_segment(
    out: &mut Packed,
    spill: &mut Spill,
    store: &Store,
    (source, pick): (u16, Pick),
    row_start: usize,
    image_token: u32,
) -> Result<()> {
    let rec = store.samples[pick.index as usize];
    let base = (out.input_ids.len() - row_start) as u32;
    let runs = spill.read(rec.record, rec.len, image_token, &mut out.input_ids, &mut out.loss_mask)?;
    for (k, run) in runs.iter().enumerate() {
        out.image_positions.push(base + run.pos);
        out.image_lengths.push(run.len);
        out.image_path_data.extend_from_slice(store.image_path(rec.img as usize + k));
        out.image_path_offsets.push(out.image_path_data.len() as i64);
        let [t, h, w] = store.image_grids[rec.img as usize + k];
        out.image_grid_t.push(t);
        out.image_grid_h.push(h);
        out.image_grid_w.push(w);
    }
    out.segment_lengths.push(rec.len);
    out.segment_source.push(source);
    out.segment_row.push(rec.row);
    out.segment_part.push(rec.part);
    out.segment_template.push(rec.template);
    out.segment_repeat.push(pick.repeat);
    out.segment_images.push(rec.n_img);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::columns::{Batch, StrCol};
    use crate::compile::tests::{batch, cols, convs, plan, TOKENIZER};

    #[test]
    fn exact_sample_mixture() {
        let c = cols(&convs(7));
        let mut comp = Compiler::new(plan(r#", "packing": "none""#), TOKENIZER, 2, None).unwrap();
        comp.plan.mixture = MixturePlan::Samples(25);
        comp.add_batch(0, &batch(&c)).unwrap();
        comp.add_batch(1, &batch(&c)).unwrap();
        comp.finish().unwrap();
        let p = comp.emit(0, usize::MAX).unwrap();
        let a = p.segment_source.iter().filter(|&&s| s == 0).count();
        assert_eq!((a, p.segment_source.len()), (13, 25));
        assert_eq!(p.row_offsets.len(), 26);
    }

    #[test]
    fn later_epochs_pack_samples_of_equal_length_with_other_partners() {
        let mut p = plan(r#", "packing": "bfd", "shuffle": false"#);
        p.seq_len = 100;
        let lengths: Vec<u32> = (0..24).map(|i| 30 + (i % 3)).collect();
        let images = vec![0u32; lengths.len()];
        let (first, _) = pack_rows(&p, &lengths, &images);
        p.epoch = 1;
        let (later, _) = pack_rows(&p, &lengths, &images);
        let items = |bins: &Vec<Vec<u32>>| {
            let mut all: Vec<u32> = bins.iter().flatten().copied().collect();
            all.sort_unstable();
            all
        };
        assert_eq!(items(&first), (0..24).collect::<Vec<u32>>());
        assert_eq!(items(&later), items(&first), "every item once");
        assert_eq!(later.len(), first.len(), "as many rows");
        assert_ne!(later, first, "other partners");
        for b in &later {
            assert!(b.windows(2).all(|w| w[0] < w[1]), "mixture order within a row");
            assert!(b.iter().map(|&i| lengths[i as usize]).sum::<u32>() <= 100);
        }
    }

    #[test]
    fn emit_before_finish_is_an_internal_error() {
        let mut comp = Compiler::new(plan(""), TOKENIZER, 1, None).unwrap();
        assert!(matches!(comp.emit(0, 1), Err(Error::Internal(_))));
    }

    #[test]
    fn image_runs_are_recorded_in_their_row() {
        let mut plan = plan(r#", "image": {"placeholder": "<image>", "token": "<image>", "count": 8}"#);
        plan.seq_len = 128;
        plan.sources[0].image_root = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/demo/data/images").into());
        let (n, name) = (12, b"astronaut.jpg");
        let c = cols(&convs(n));
        let image_offsets: Vec<i64> = (0..=n as i64).collect();
        let path_offsets: Vec<i64> = (0..=n as i64).map(|k| k * name.len() as i64).collect();
        let path_data = name.repeat(n);
        let with_images =
            Batch { image_offsets: &image_offsets, images: StrCol { offsets: &path_offsets, data: &path_data }, ..batch(&c) };
        let mut comp = Compiler::new(plan, TOKENIZER, 1, None).unwrap();
        comp.add_batch(0, &with_images).unwrap();
        comp.add_batch(1, &batch(&c)).unwrap();
        comp.finish().unwrap();
        let image_token = comp.tokenizer.image_token().unwrap();
        let rows = comp.layout.as_ref().unwrap().bins.len();
        assert!(rows >= 3, "several rows, several samples in some");
        // All rows in one piece, and each row as a piece of its own.
        let pieces = [vec![comp.emit(0, rows).unwrap()], (0..rows).map(|r| comp.emit(r, r + 1).unwrap()).collect()];
        for piece in pieces {
            let mut runs = 0;
            for p in &piece {
                for r in 0..p.row_offsets.len() - 1 {
                    let row = &p.input_ids[p.row_offsets[r] as usize..p.row_offsets[r + 1] as usize];
                    let (k0, k1) = (p.image_offsets[r] as usize, p.image_offsets[r + 1] as usize);
                    for k in k0..k1 {
                        let (pos, len) = (p.image_positions[k] as usize, p.image_lengths[k] as usize);
                        assert!(
                            len > 0 && pos + len <= row.len(),
                            "row {r}: run at {pos} (+{len}) outside its {} tokens",
                            row.len()
                        );
                        assert!(
                            row[pos..pos + len].iter().all(|&t| t == image_token),
                            "row {r}: run at {pos} is not image tokens"
                        );
                    }
                    let in_runs: u32 = p.image_lengths[k0..k1].iter().sum();
                    assert_eq!(row.iter().filter(|&&t| t == image_token).count(), in_runs as usize);
                    runs += k1 - k0;
                }
            }
            assert_eq!(runs, n, "one run per image");
        }
    }
}
