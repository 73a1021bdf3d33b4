//! Video token counts from the container's metadata alone: the video track's frame count,
//! frame rate, frame size and display matrix, never a decoded frame. A fixed count, or the
//! Qwen2-VL rule of transformers' `Qwen2VLVideoProcessor`: frames sampled at `fps` (at
//! least `min_frames`, at most `max_frames` and the clip's own, floored to a multiple of
//! `temporal_patch`), each frame resized by the image rule's `smart_resize` (optionally
//! under an even share of a total pixel budget, the processor's `cap_pixels_per_frame`),
//! then `t·h·w / merge²` tokens for the (t, h, w) patch grid.
//!
//! Fragmented MP4 counts the frames of the track's runs in its fragments. Matroska and
//! WebM are read by `matroska` (the frame count from the duration and the
//! default frame duration, as FFmpeg's figures give it). MP4 and MOV (ISO base media)
//! containers are read by the `mp4` crate: pure Rust (the
//! wheel stays abi3 and self-contained), MIT, and it takes a `Read + Seek` source, so the
//! media data box is skipped by seeking and only the boxes describing the tracks are read
//! (Mozilla's `mp4parse` reads through the media data, which a read budget cannot allow).
//! Its tables are bounded by the box sizes it checks; a panic in it is caught and
//! reported as a broken file. Budgets as for images and audio: only regular files are
//! opened and at most `HEADER_READ_LIMIT` bytes are read from one.

use crate::error::Error;
use crate::media::{smart_resize, Budget};
use crate::plan::VideoPlan;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Bytes the metadata reader may read from one file (the track tables grow with the clip:
/// an hour at 30 fps takes about a megabyte).
pub const HEADER_READ_LIMIT: u64 = 16 << 20;
/// The most tokens a rule may ever let one clip take (`max_tokens` at most this).
pub const MAX_VIDEO_TOKENS: u64 = 1 << 20;
/// transformers' `smart_resize` refuses frames whose sides differ more than this.
const MAX_ASPECT: f64 = 200.0;

/// What a release records of one clip: its tokens, its (t, h, w) patch grid before
/// merging (of the upright picture) and the frames sampled; grid and frames 0 under a
/// fixed count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VideoInfo {
    pub tokens: u32,
    pub grid: [u32; 3],
    pub frames: u32,
}

/// The video track as its container describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub frames: u64,
    /// The average frame rate as a ratio, frames · timescale / summed frame durations
    /// (what FFmpeg's MP4 demuxer, and so PyAV's `average_rate`, gives).
    pub rate: (u64, u64),
    /// The coded frame size, as a decoder gives the frames.
    pub width: u64,
    pub height: u64,
    /// The display matrix turns the picture by 90° or 270°.
    pub quarter_turned: bool,
}

impl Header {
    pub fn fps(&self) -> f64 {
        self.rate.0 as f64 / self.rate.1.max(1) as f64
    }
}

/// The frames `Qwen2VLVideoProcessor.sample_frames` picks from a clip of `total` frames at
/// `clip_fps`, as the length of its `torch.arange(0, total, total / n)` (computed in f64
/// as torch does); an error where it would raise (no frame to sample).
pub fn sampled_frames(plan: &VideoPlan, total: u64, clip_fps: f64) -> std::result::Result<u64, String> {
    let tp = plan.temporal_patch.max(1) as f64;
    let total_f = total as f64;
    let most = ((plan.max_frames as f64).min(total_f) / tp).floor() * tp;
    let wanted = total_f / clip_fps * plan.fps;
    let n = wanted.max(plan.min_frames as f64).min(most).min(total_f);
    let n = (n / tp).floor() * tp;
    if !(n >= 1.0) {
        return Err(format!(
            "the clip has {total} frames, fewer than temporal_patch = {} (no frame can be sampled)",
            plan.temporal_patch
        ));
    }
    Ok((total_f / (total_f / n)).ceil() as u64)
}

/// The (t, h, w) patch grid and tokens for `frames` sampled frames of `height`×`width`.
pub fn grid_for(plan: &VideoPlan, frames: u64, height: u64, width: u64) -> std::result::Result<([u32; 3], u64), String> {
    let (patch, merge, tp) = (plan.patch.max(1) as u64, plan.merge.max(1) as u64, plan.temporal_patch.max(1) as u64);
    let (long, short) = (height.max(width) as f64, height.min(width).max(1) as f64);
    if long / short > MAX_ASPECT {
        return Err(format!("its frames ({width}×{height}) are more than {MAX_ASPECT} times longer than wide"));
    }
    let factor = patch * merge;
    let mut max_pixels = plan.max_pixels;
    if plan.cap_pixels_per_frame {
        // The processor's resize: an even share of 90% of max_video_tokens' pixels, per
        // temporal patch, floored at 1.05 × min_pixels.
        let total_pixels = (plan.max_video_tokens as f64 * factor as f64 * factor as f64 * 0.9) as u64;
        let share = total_pixels.saturating_mul(tp) / frames.max(1);
        max_pixels = max_pixels.min(share).max((plan.min_pixels as f64 * 1.05) as u64);
    }
    let (h, w) = smart_resize(height, width, factor, plan.min_pixels, max_pixels);
    let t = frames.div_ceil(tp);
    let (gh, gw) = (h / patch, w / patch);
    let tokens = t.saturating_mul(gh).saturating_mul(gw) / (merge * merge);
    let side = |v: u64| v.min(u32::MAX as u64) as u32;
    Ok(([side(t), side(gh), side(gw)], tokens))
}

/// What the plan can never allow, refused before any clip is read.
pub fn check_plan(plan: &VideoPlan) -> crate::error::Result<()> {
    let most = plan.max_tokens.min(MAX_VIDEO_TOKENS);
    if let Some(count) = plan.count {
        if count == 0 || count as u64 > most {
            return Err(Error::plan("model.video.count", format!("count = {count}: a clip takes between 1 and {most} tokens")));
        }
        return Ok(());
    }
    if plan.max_tokens == 0 || plan.max_tokens > MAX_VIDEO_TOKENS {
        return Err(Error::plan("model.video.max_tokens", format!("must be between 1 and {MAX_VIDEO_TOKENS}")));
    }
    for (key, v) in [
        ("patch", plan.patch as u64),
        ("merge", plan.merge as u64),
        ("temporal_patch", plan.temporal_patch as u64),
        ("max_frames", plan.max_frames as u64),
        ("max_video_tokens", plan.max_video_tokens),
    ] {
        if v == 0 {
            return Err(Error::plan(format!("model.video.{key}"), "must be at least 1"));
        }
    }
    if !(plan.fps.is_finite() && plan.fps > 0.0) {
        return Err(Error::plan("model.video.fps", format!("{} is not a positive frame rate", plan.fps)));
    }
    if plan.min_pixels > plan.max_pixels {
        return Err(Error::plan("model.video.min_pixels", format!("{} is above max_pixels = {}", plan.min_pixels, plan.max_pixels)));
    }
    if plan.min_frames > plan.max_frames {
        return Err(Error::plan("model.video.min_frames", format!("{} is above max_frames = {}", plan.min_frames, plan.max_frames)));
    }
    Ok(())
}

/// Tokens, grid and frames for a clip described by `header`, or why it has none.
pub fn tokens_for(plan: &VideoPlan, header: Header) -> std::result::Result<VideoInfo, String> {
    if header.frames == 0 {
        return Err("the clip has no frames".to_string());
    }
    if header.width == 0 || header.height == 0 {
        return Err("the clip's frames have zero size".to_string());
    }
    if let Some(count) = plan.count {
        return Ok(VideoInfo { tokens: count, grid: [0; 3], frames: 0 });
    }
    let frames = sampled_frames(plan, header.frames, header.fps())?;
    // A quarter turn swaps the sides: the same tokens, the grid of the upright picture.
    let (h, w) = if header.quarter_turned { (header.width, header.height) } else { (header.height, header.width) };
    let (grid, tokens) = grid_for(plan, frames, h, w)?;
    if tokens > plan.max_tokens {
        return Err(format!(
            "the clip ({} frames at {:.3} fps, {}×{}) gives {tokens} tokens ({frames} frames sampled), more than max_tokens = {}",
            header.frames,
            header.fps(),
            header.width,
            header.height,
            plan.max_tokens
        ));
    }
    Ok(VideoInfo { tokens: tokens as u32, grid, frames: frames.min(u32::MAX as u64) as u32 })
}

/// The tokens of the clip at `path`, from its container's metadata.
pub fn video_info(plan: &VideoPlan, path: &Path) -> std::result::Result<VideoInfo, String> {
    let header = read_header(path)?;
    tokens_for(plan, header).map_err(|m| format!("video {}: {m}", path.display()))
}

/// The video track's metadata (MP4/MOV: the first track whose handler is `vide`;
/// Matroska/WebM: the first video track).
pub fn read_header(path: &Path) -> std::result::Result<Header, String> {
    let cannot = |m: String| format!("cannot read video {}: {m}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| cannot(e.to_string()))?;
    if !meta.is_file() {
        return Err(cannot("not a regular file".into()));
    }
    let mut file = File::open(path).map_err(|e| cannot(e.to_string()))?;
    let mut head = [0u8; 8];
    let n = file.read(&mut head).map_err(|e| cannot(e.to_string()))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| cannot(e.to_string()))?;
    let source = Budget::new(file, HEADER_READ_LIMIT, "video metadata");
    let size = meta.len();
    if crate::matroska::is_matroska(&head[..n]) {
        return crate::matroska::read_header(source, size).map_err(cannot);
    }
    if n < 8 || !head[4..8].iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(cannot("not an MP4, MOV, Matroska or WebM file (no ISO base media box or EBML header at its start)".into()));
    }
    let parsed = std::panic::catch_unwind(move || mp4::Mp4Reader::read_header(source, size).map(|r| (r.moov, r.moofs)));
    let (moov, moofs) = match parsed {
        Ok(Ok(boxes)) => boxes,
        Ok(Err(e)) => return Err(cannot(format!("not an MP4 or MOV file the metadata reader knows ({e})"))),
        Err(_) => return Err(cannot("the container's metadata is malformed".into())),
    };
    let trak = moov
        .traks
        .iter()
        .find(|t| t.mdia.hdlr.handler_type == mp4::FourCC::from(*b"vide"))
        .ok_or_else(|| cannot("no video track".into()))?;
    let stbl = &trak.mdia.minf.stbl;
    let mut frames = stbl.stsz.sample_count as u64;
    let timescale = trak.mdia.mdhd.timescale as u64;
    let mut summed: u64 = stbl.stts.entries.iter().map(|e| e.sample_count as u64 * e.sample_delta as u64).sum();
    if let Some(mvex) = &moov.mvex {
        // A fragmented MP4: the frames in the track tables (often none; FFmpeg's own
        // count stops there) and the track's runs in the fragments, each lasting as its
        // run, its fragment or the track's defaults say; the rate is the same ratio of
        // frames to summed durations.
        let (more, lasting) = fragments(&moofs, trak.tkhd.track_id, mvex.trex.default_sample_duration);
        (frames, summed) = (frames + more, summed + lasting);
        if frames == 0 {
            return Err(cannot("a fragmented MP4 whose fragments hold no frame of its video track".into()));
        }
    }
    let duration = if summed > 0 { summed } else { trak.mdia.mdhd.duration };
    if timescale == 0 || duration == 0 {
        return Err(cannot("the header states no frame rate (no timescale or duration)".into()));
    }
    let stsd = &stbl.stsd;
    let coded = stsd
        .avc1
        .as_ref()
        .map(|b| (b.width, b.height))
        .or(stsd.hev1.as_ref().map(|b| (b.width, b.height)))
        .or(stsd.vp09.as_ref().map(|b| (b.width, b.height)));
    let (width, height) = coded.unwrap_or((trak.tkhd.width.value(), trak.tkhd.height.value()));
    let m = &trak.tkhd.matrix;
    let quarter_turned = m.a == 0 && m.d == 0 && m.b != 0 && m.c != 0;
    Ok(Header {
        frames,
        rate: (frames.saturating_mul(timescale), duration),
        width: width as u64,
        height: height as u64,
        quarter_turned,
    })
}

/// The frames and summed durations of track `track`'s runs in the fragments `moofs`.
fn fragments(moofs: &[mp4::MoofBox], track: u32, default_duration: u32) -> (u64, u64) {
    let (mut frames, mut summed) = (0u64, 0u64);
    for traf in moofs.iter().flat_map(|m| &m.trafs).filter(|t| t.tfhd.track_id == track) {
        let Some(run) = &traf.trun else { continue };
        frames += run.sample_count as u64;
        summed += if run.sample_durations.is_empty() {
            run.sample_count as u64 * traf.tfhd.default_sample_duration.unwrap_or(default_duration) as u64
        } else {
            run.sample_durations.iter().map(|&d| d as u64).sum::<u64>()
        };
    }
    (frames, summed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::tests::Temp;
    use proptest::prelude::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data/video/clips");

    fn plan(extra: &str) -> VideoPlan {
        serde_json::from_str(&format!(r#"{{"placeholder":"<video>","token":"<video>"{extra}}}"#)).unwrap()
    }

    fn header(frames: u64, rate: (u64, u64), width: u64, height: u64) -> Header {
        Header { frames, rate, width, height, quarter_turned: false }
    }

    #[test]
    fn fixture_metadata() {
        // Frame counts, rates and sizes as PyAV reports them (tests/test_video.py checks
        // the same against PyAV itself).
        let h = read_header(&Path::new(FIXTURES).join("ntsc-320x240.mp4")).unwrap();
        assert_eq!((h.frames, h.width, h.height, h.quarter_turned), (75, 320, 240, false));
        assert!((h.fps() - 30000.0 / 1001.0).abs() < 1e-9, "{}", h.fps());
        let r = read_header(&Path::new(FIXTURES).join("rotated-128x72.mp4")).unwrap();
        assert_eq!((r.frames, r.width, r.height, r.quarter_turned), (45, 128, 72, true));
        let m = read_header(&Path::new(FIXTURES).join("film-160x90.mp4")).unwrap();
        assert_eq!((m.frames, m.width, m.height, m.fps()), (96, 160, 90, 24.0));
    }

    #[test]
    fn qwen2_vl_counts() {
        // 2 s at 10 fps, 64×48: 4 frames at 2 fps (t = 2); the frame resized to 280×392
        // by min_pixels = 128·28² (transformers' smart_resize): 2·20·28/4 = 280 tokens.
        let info = tokens_for(&plan(""), header(20, (200, 20), 64, 48)).unwrap();
        assert_eq!(info, VideoInfo { tokens: 280, grid: [2, 20, 28], frames: 4 });
        // A long clip: max_frames caps the sampled frames.
        assert_eq!(sampled_frames(&plan(""), 100_000, 1.0).unwrap(), 768);
        // Fewer frames than min_frames: all of them, floored to temporal_patch.
        assert_eq!(sampled_frames(&plan(""), 3, 25.0).unwrap(), 2);
        assert!(sampled_frames(&plan(""), 1, 25.0).is_err());
    }

    #[test]
    fn rotated_clips_transpose_the_grid() {
        let upright = tokens_for(&plan(""), header(45, (45 * 15, 45), 1280, 720)).unwrap();
        let turned = tokens_for(&plan(""), Header { quarter_turned: true, ..header(45, (45 * 15, 45), 1280, 720) }).unwrap();
        assert_eq!(upright.tokens, turned.tokens);
        assert_eq!([upright.grid[0], upright.grid[2], upright.grid[1]], turned.grid);
        assert!(upright.grid[2] > upright.grid[1]);
    }

    #[test]
    fn the_pixel_cap_shares_a_budget_across_frames() {
        let capped = plan(r#","cap_pixels_per_frame":true,"max_video_tokens":1000,"max_tokens":100000"#);
        let free = plan(r#","max_tokens":1000000"#);
        let h = header(3000, (3000 * 30, 3000), 1920, 1080);
        let (a, b) = (tokens_for(&capped, h).unwrap(), tokens_for(&free, h).unwrap());
        assert_eq!(a.frames, b.frames);
        assert!(a.tokens < b.tokens, "{a:?} {b:?}");
    }

    #[test]
    fn counts_and_budgets() {
        assert_eq!(tokens_for(&plan(r#","count":64"#), header(10, (10, 1), 64, 64)).unwrap(), VideoInfo { tokens: 64, grid: [0; 3], frames: 0 });
        let e = tokens_for(&plan(r#","max_tokens":100"#), header(20, (200, 20), 64, 48)).unwrap_err();
        assert!(e.contains("more than max_tokens = 100"), "{e}");
        assert!(tokens_for(&plan(""), header(0, (0, 1), 64, 48)).is_err());
        assert!(tokens_for(&plan(""), header(10, (10, 1), 64000, 48)).unwrap_err().contains("longer than wide"));
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let text = Path::new(FIXTURES).join("not-a-video.mp4");
        let e = read_header(&text).unwrap_err();
        assert!(e.starts_with(&format!("cannot read video {}", text.display())), "{e}");
        let mut cut = std::fs::read(Path::new(FIXTURES).join("gradient-64x48.mp4")).unwrap();
        cut.truncate(cut.len() / 3);
        let at = cut.windows(4).position(|w| w == b"moov");
        let cut = Temp::new("cut.mp4", &cut);
        assert!(read_header(&cut.0).is_err() || at.is_none());
        let junk = Temp::new("junk.mp4", b"\0\0\0\x10ftypisom\0\0\0\0\0\0\0\x08moov");
        assert!(read_header(&junk.0).unwrap_err().starts_with("cannot read video"));
        assert!(read_header(Path::new("/dev/zero")).unwrap_err().ends_with("not a regular file"));
        assert!(read_header(Path::new("/nonexistent/a.mp4")).unwrap_err().starts_with("cannot read video /nonexistent/a.mp4"));
    }

    #[test]
    fn plans_are_checked() {
        assert!(check_plan(&plan("")).is_ok());
        assert!(check_plan(&plan(r#","count":0"#)).is_err());
        assert!(check_plan(&plan(r#","temporal_patch":0"#)).is_err());
        assert!(check_plan(&plan(r#","fps":0.0"#)).is_err());
        assert!(check_plan(&plan(r#","min_frames":10,"max_frames":4"#)).is_err());
        assert!(check_plan(&plan(r#","min_pixels":100,"max_pixels":10"#)).is_err());
    }

    proptest! {
        /// Whatever the clip, the sampled frames are a positive multiple of temporal_patch
        /// within max_frames and the clip, and the grid's tokens are t·h·w / merge².
        #[test]
        fn sampling_stays_in_bounds(total in 2u64..5000, num in 1u64..120_000, den in 1u64..5000, w in 16u64..2000, h in 16u64..2000) {
            let p = plan("");
            let frames = sampled_frames(&p, total, num as f64 / den as f64).unwrap();
            prop_assert!(frames >= 2 && frames <= total.min(768));
            let (grid, tokens) = grid_for(&p, frames, h, w).unwrap();
            prop_assert_eq!(grid[0] as u64, frames.div_ceil(2));
            prop_assert_eq!(tokens, grid[0] as u64 * grid[1] as u64 * grid[2] as u64 / 4);
            prop_assert!(grid[1] % 2 == 0 && grid[2] % 2 == 0);
        }
    }
}
