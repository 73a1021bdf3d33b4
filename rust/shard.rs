//! One shard's rows as a plan another process emits them from: what the packing put in
//! each row (every segment's record location, source, row, media), never the tokens. A
//! cluster build's driver mixes and packs on lengths only; a task per shard reads the
//! records from the files they lie in (its spill on shared storage, the entries the
//! cluster's tasks wrote) and emits the very arrays `Compiler::emit` would.
//!
//! ```text
//!  driver   finish()  ─▶  shard_plan(lo, hi)  ──(bytes)──▶  task   ShardEmitter::new(plan)
//!                         rows lo..hi: segments                      emit(a, b): rows lo+a..lo+b
//!                         + the files holding their records          read from those files
//! ```

use crate::compile::{Compiler, SampleRec, Store};
use crate::error::{Error, Result};
use crate::layout::{emit_rows, media_tokens, MediaTokens, Packed};
use crate::mix::Pick;
use crate::audio::AudioInfo;
use crate::spill::{Record, Spill};
use crate::video::VideoInfo;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Rows of a shard: `rows[r]` segments each, in order, their records in `files`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShardPlan {
    files: Vec<String>,
    tokens: MediaTokens,
    rows: Vec<u32>,
    segments: Vec<Segment>,
}

/// One segment as `emit` needs it: the sample as its store keeps it, its source and its
/// pick's repeat, its media (paths with their grid or info; the sample's media indices are
/// its store's, renumbered by the emitter).
#[derive(Debug, Serialize, Deserialize)]
struct Segment {
    source: u16,
    repeat: u32,
    sample: SampleRec,
    images: Vec<(String, [u32; 3])>,
    audios: Vec<(String, AudioInfo)>,
    videos: Vec<(String, VideoInfo)>,
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Compiler {
    /// The plan of rows `lo..hi` (after `finish`), as JSON; the spill is flushed first, so
    /// that another process reads its file whole.
    pub fn shard_plan(&mut self, lo: usize, hi: usize) -> Result<Vec<u8>> {
        let layout = self.layout.as_ref().ok_or_else(|| Error::internal("shard_plan() before finish()"))?;
        self.spill.flush()?;
        let files = self.spill.files();
        if files[0].is_empty() {
            return Err(Error::internal("a shard plan of a spill held in memory"));
        }
        let hi = hi.min(layout.bins.len());
        let bins = &layout.bins[lo.min(hi)..hi];
        let mut segments = Vec::with_capacity(bins.iter().map(Vec::len).sum());
        for bin in bins {
            for &it in bin {
                let (s, pick) = layout.items[it as usize];
                let store = &self.stores[s as usize];
                let r = store.samples[pick.index as usize];
                let (img, aud, vid) = (r.img as usize, r.aud as usize, r.vid as usize);
                segments.push(Segment {
                    source: s,
                    repeat: pick.repeat,
                    sample: r,
                    images: (img..img + r.n_img as usize).map(|k| (text(store.image_path(k)), store.image_grids[k])).collect(),
                    audios: (aud..aud + r.n_aud as usize).map(|k| (text(store.audio_path(k)), store.audio_infos[k])).collect(),
                    videos: (vid..vid + r.n_vid as usize).map(|k| (text(store.video_path(k)), store.video_infos[k])).collect(),
                });
            }
        }
        let plan = ShardPlan {
            files,
            tokens: media_tokens(&self.tokenizer),
            rows: bins.iter().map(|b| b.len() as u32).collect(),
            segments,
        };
        serde_json::to_vec(&plan).map_err(|e| Error::internal(format!("shard plan: {e}")))
    }
}

/// Emits the rows of a shard plan, reading their records from the files it names.
pub struct ShardEmitter {
    /// Every segment's sample, in order; its media indexed as in any store.
    store: Store,
    sources: Vec<(u16, Pick)>,
    /// Each row's segments (indices into `store.samples`).
    bins: Vec<Vec<u32>>,
    spill: Spill,
    tokens: MediaTokens,
}

impl ShardEmitter {
    pub fn new(plan: &[u8]) -> Result<Self> {
        let plan: ShardPlan =
            serde_json::from_slice(plan).map_err(|e| Error::internal(format!("a shard plan that does not parse: {e}")))?;
        let mut spill = Spill::new(None)?;
        for file in &plan.files {
            // Sizes are checked when read: a record past its file's end is an error then.
            let len = std::fs::metadata(file).map(|m| m.len()).map_err(|e| Error::Io {
                path: file.clone(),
                message: format!("a token file this shard reads is not visible here: {e}"),
            })?;
            spill.attach(Path::new(file), len);
        }
        let mut store = Store::default();
        let mut sources = Vec::with_capacity(plan.segments.len());
        for seg in plan.segments {
            let sample = seg.sample;
            if sample.record.file as usize >= plan.files.len() {
                return Err(Error::internal("a shard plan's segment names a file it does not list"));
            }
            let media = store.next_media([seg.images.len(), seg.audios.len(), seg.videos.len()]);
            store.samples.push(SampleRec {
                // The spill's own file is 0: the plan's files are attached from 1.
                record: Record { file: sample.record.file + 1, ..sample.record },
                row: sample.row,
                part: sample.part,
                len: sample.len,
                trained: sample.trained,
                template: sample.template,
                ..media
            });
            for (path, grid) in seg.images {
                store.push_image_path(&path);
                store.image_grids.push(grid);
            }
            for (path, info) in seg.audios {
                store.push_audio(&path, info);
            }
            for (path, info) in seg.videos {
                store.push_video(&path, info);
            }
            let index = sources.len() as u32;
            sources.push((seg.source, Pick { index, repeat: seg.repeat }));
        }
        let mut bins = Vec::with_capacity(plan.rows.len());
        let mut at = 0u32;
        for &n in &plan.rows {
            bins.push((at..at + n).collect());
            at += n;
        }
        if at as usize != sources.len() {
            return Err(Error::internal("a shard plan's rows do not add up to its segments"));
        }
        Ok(ShardEmitter { store, sources, bins, spill, tokens: plan.tokens })
    }

    /// The shard's rows.
    pub fn rows(&self) -> usize {
        self.bins.len()
    }

    /// Rows `lo..hi` of the shard, as `Compiler::emit` gives them.
    pub fn emit(&mut self, lo: usize, hi: usize) -> Result<Packed> {
        let hi = hi.min(self.bins.len());
        let (store, sources) = (&self.store, &self.sources);
        emit_rows(&self.bins[lo.min(hi)..hi], &mut self.spill, self.tokens, |it| {
            let (s, pick) = sources[it as usize];
            (store, s, pick)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::tests::{batch, cols, convs, plan, TOKENIZER};
    use crate::store::Records;

    fn same(a: &Packed, b: &Packed) {
        assert_eq!(a.row_offsets, b.row_offsets);
        assert_eq!(a.input_ids, b.input_ids);
        assert_eq!(a.loss_mask, b.loss_mask);
        assert_eq!(a.segment_offsets, b.segment_offsets);
        assert_eq!(a.segment_lengths, b.segment_lengths);
        assert_eq!(a.segment_source, b.segment_source);
        assert_eq!(a.segment_row, b.segment_row);
        assert_eq!(a.segment_part, b.segment_part);
        assert_eq!(a.segment_template, b.segment_template);
        assert_eq!(a.segment_repeat, b.segment_repeat);
        assert_eq!(a.segment_images, b.segment_images);
        assert_eq!(a.image_offsets, b.image_offsets);
        assert_eq!(a.image_positions, b.image_positions);
        assert_eq!(a.image_lengths, b.image_lengths);
        assert_eq!((&a.image_path_offsets, &a.image_path_data), (&b.image_path_offsets, &b.image_path_data));
        assert_eq!((&a.image_grid_t, &a.image_grid_h, &a.image_grid_w), (&b.image_grid_t, &b.image_grid_h, &b.image_grid_w));
    }

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("mmrecipe-shard-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `rows` conversations of source `source` tokenized and saved as the entry `path`.
    fn save_entry(p: &crate::plan::Plan, source: usize, rows: usize, path: &Path) {
        let mut unit = Compiler::new(p.clone(), TOKENIZER, 1, None).unwrap();
        unit.add_batch(source, &batch(&cols(&convs(rows)))).unwrap();
        unit.save_source(source, "k", b"m", path).unwrap();
    }

    /// Repeats (25 of 14) and two sources, one tokenized here and one attached from an
    /// entry: every shard's plan emits the compiler's rows, whatever the shard's bounds and
    /// the pieces it is emitted in (media are covered by the builds on a cluster, which
    /// compare whole releases).
    #[test]
    fn a_shard_plan_emits_the_compilers_rows() {
        let d = dir("plan");
        let c = cols(&convs(7));
        let p = plan(r#", "packing": "bfd""#);
        save_entry(&p, 1, 7, &d.join("b.tok"));
        let mut comp = Compiler::new(p, TOKENIZER, 2, Some(&d)).unwrap();
        comp.plan.mixture = crate::plan::MixturePlan::Samples(25);
        comp.add_batch(0, &batch(&c)).unwrap();
        assert!(comp.load_unit(1, "k", &d.join("b.tok"), Records::Attach).unwrap().is_ok());
        let summary = comp.finish().unwrap();
        let rows = summary.sequences as usize;
        assert!(rows >= 4);
        let whole = comp.emit(0, rows).unwrap();
        assert!(whole.segment_source.iter().any(|&s| s == 1) && whole.segment_source.iter().any(|&s| s == 0));
        assert!(whole.segment_repeat.iter().any(|&r| r > 0), "repeats are planned too");
        for (lo, hi) in [(0, rows), (1, 3), (rows - 1, rows), (2, 2)] {
            let mut emitter = ShardEmitter::new(&comp.shard_plan(lo, hi).unwrap()).unwrap();
            assert_eq!(emitter.rows(), hi - lo);
            same(&emitter.emit(0, hi - lo).unwrap(), &comp.emit(lo, hi).unwrap());
            if hi - lo >= 2 {
                same(&emitter.emit(1, hi - lo).unwrap(), &comp.emit(lo + 1, hi).unwrap());
            }
        }
        drop(comp);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Attached records are never read on the planning side: an entry damaged right after
    /// it is loaded still mixes, packs and plans; the shard's emitter then fails naming the
    /// file (never a panic), and names a file gone as well.
    #[test]
    fn the_planner_never_reads_tokens_and_a_damaged_or_missing_token_file_is_an_error() {
        let d = dir("damage");
        let c = cols(&convs(5));
        let p = plan(r#", "packing": "bfd""#);
        let entry = d.join("a.tok");
        save_entry(&p, 0, 5, &entry);
        let mut comp = Compiler::new(p, TOKENIZER, 1, Some(&d)).unwrap();
        assert!(comp.load_source(0, "k", &entry, Records::Attach).unwrap().is_ok());
        let mut bytes = std::fs::read(&entry).unwrap();
        bytes.pop(); // the last record cut short
        std::fs::write(&entry, &bytes).unwrap();
        comp.add_batch(1, &batch(&c)).unwrap();
        let rows = comp.finish().unwrap().sequences as usize;
        let plan = comp.shard_plan(0, rows).unwrap();
        let err = ShardEmitter::new(&plan).unwrap().emit(0, rows).err().expect("a damaged record");
        assert!(comp.emit(0, rows).is_err(), "the compiler reads the same damaged records");
        assert!(err.to_string().contains("a.tok"), "{err}");
        std::fs::remove_file(&entry).unwrap();
        let err = ShardEmitter::new(&plan).err().expect("a missing file");
        assert!(err.to_string().contains("a.tok") && err.to_string().contains("not visible"), "{err}");
        assert!(ShardEmitter::new(b"{}").is_err());
        drop(comp);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
