//! Audio token counts from the file header alone: the clip's length in samples and its
//! sample rate, never the samples themselves. A fixed count, or the Whisper rule: the
//! feature extractor's mel frames (one per `hop_length` samples, the clip padded or cut
//! to a `chunk_seconds` window), the encoder's stride-2 convolution, then the model's
//! pooling (Qwen2-Audio: an average pool of 2).
//!
//! The headers are read by `symphonia`: pure Rust (nothing to link, so the wheel stays
//! abi3 and self-contained), one demuxer per container (WAV, FLAC, Ogg, MP3) that parses
//! the stream header and its frame count without decoding a packet, and well kept.
//! Budgets as for images: only regular files are opened and at most `HEADER_READ_LIMIT`
//! bytes are read from one.

use crate::error::Error;
use crate::media::Budget;
use crate::plan::{AudioPlan, LongAudio};
use std::fs::File;
use std::path::Path;
use symphonia::core::codecs::audio::well_known::CODEC_ID_OPUS;
use symphonia::core::codecs::CodecParameters;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::{MediaSource, MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;

/// Bytes the header reader may read from one file (a metadata block or an Ogg stream's
/// last page can sit far from the start; the demuxers reach them by seeking).
pub const HEADER_READ_LIMIT: u64 = 16 << 20;
/// The most tokens one clip may take under a fixed count.
pub const MAX_AUDIO_TOKENS: u64 = 16_384;

/// What a release records of one clip: its tokens and its length in samples at the
/// model's sampling rate (before the window cuts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AudioInfo {
    pub tokens: u32,
    pub samples: u64,
}

/// The length of one clip as its header states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frames (samples per channel) at the file's own rate.
    pub frames: u64,
    pub sample_rate: u32,
}

impl Header {
    /// Samples at `rate` after resampling: ⌈frames · rate / own rate⌉, as librosa's and
    /// soxr's resamplers give; exact when the rates are equal.
    pub fn samples_at(&self, rate: u32) -> u64 {
        if self.sample_rate == rate || self.sample_rate == 0 {
            return self.frames;
        }
        let num = self.frames as u128 * rate as u128;
        num.div_ceil(self.sample_rate as u128).min(u64::MAX as u128) as u64
    }

    pub fn seconds(&self) -> f64 {
        self.frames as f64 / self.sample_rate.max(1) as f64
    }
}

/// Mel frames the Whisper feature extractor marks as audio (its attention mask, the
/// sample mask taken every `hop` samples) for `samples` samples, cut to `window`.
pub fn whisper_frames(samples: u64, window: u64, hop: u64) -> u64 {
    samples.min(window).div_ceil(hop.max(1))
}

/// Tokens from mel frames: the stride-2 convolution `(f - 1) // 2 + 1`, then an average
/// pool of kernel and stride `pool`, `(x - pool) // pool + 1` (Qwen2-Audio's
/// `_get_feat_extract_output_lengths` with pool 2; pool 1 is Whisper's encoder alone).
pub fn whisper_tokens(frames: u64, pool: u64) -> u64 {
    if frames == 0 {
        return 0;
    }
    let conv = (frames - 1) / 2 + 1;
    let pool = pool.max(1);
    if conv < pool {
        return 0;
    }
    (conv - pool) / pool + 1
}

/// What the plan can never allow, refused before any clip is read.
pub fn check_plan(plan: &AudioPlan) -> crate::error::Result<()> {
    if let Some(count) = plan.count {
        if count == 0 || count as u64 > MAX_AUDIO_TOKENS {
            return Err(Error::plan(
                "model.audio.count",
                format!("count = {count}: a clip takes between 1 and {MAX_AUDIO_TOKENS} tokens"),
            ));
        }
        return Ok(());
    }
    for (key, v) in [
        ("sampling_rate", plan.sampling_rate as u64),
        ("chunk_seconds", plan.chunk_seconds as u64),
        ("hop_length", plan.hop_length as u64),
        ("pool", plan.pool as u64),
    ] {
        if v == 0 {
            return Err(Error::plan(format!("model.audio.{key}"), "must be at least 1"));
        }
    }
    let most = window_tokens(plan);
    if most == 0 || most > MAX_AUDIO_TOKENS {
        return Err(Error::plan(
            "model.audio",
            format!("a full {} s window gives {most} tokens; a clip takes between 1 and {MAX_AUDIO_TOKENS}", plan.chunk_seconds),
        ));
    }
    Ok(())
}

/// Tokens of a full window under the Whisper rule.
pub fn window_tokens(plan: &AudioPlan) -> u64 {
    let window = plan.sampling_rate as u64 * plan.chunk_seconds as u64;
    whisper_tokens(whisper_frames(window, window, plan.hop_length as u64), plan.pool as u64)
}

/// Tokens for a clip of `header`'s length under the plan, or why it has none.
pub fn tokens_for(plan: &AudioPlan, header: Header) -> std::result::Result<AudioInfo, String> {
    let samples = header.samples_at(plan.sampling_rate);
    if samples == 0 {
        return Err("the clip is empty (0 samples)".to_string());
    }
    if let Some(count) = plan.count {
        return Ok(AudioInfo { tokens: count, samples });
    }
    let window = plan.sampling_rate as u64 * plan.chunk_seconds as u64;
    if samples > window && plan.long == LongAudio::Error {
        return Err(format!(
            "the clip is {:.2} s long, more than the {} s window (chunk_seconds); set long = \"truncate\" in [model.audio] to cut it",
            header.seconds(),
            plan.chunk_seconds
        ));
    }
    let tokens = whisper_tokens(whisper_frames(samples, window, plan.hop_length as u64), plan.pool as u64);
    if tokens == 0 {
        return Err(format!("the clip is too short ({samples} samples) to give a token"));
    }
    Ok(AudioInfo { tokens: tokens.min(u32::MAX as u64) as u32, samples })
}

/// The tokens of the clip at `path`, from its header.
pub fn audio_info(plan: &AudioPlan, path: &Path) -> std::result::Result<AudioInfo, String> {
    let header = read_header(path)?;
    tokens_for(plan, header).map_err(|m| format!("audio {}: {m}", path.display()))
}

/// The frame count and sample rate from the file's header (the first audio track).
pub fn read_header(path: &Path) -> std::result::Result<Header, String> {
    let cannot = |m: String| format!("cannot read audio {}: {m}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| cannot(e.to_string()))?;
    if !meta.is_file() {
        return Err(cannot("not a regular file".into()));
    }
    let file = File::open(path).map_err(|e| cannot(e.to_string()))?;
    let source = Budget::new(file, HEADER_READ_LIMIT, "audio header");
    let stream = MediaSourceStream::new(Box::new(source), MediaSourceStreamOptions::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let format = symphonia::default::get_probe()
        .probe(&hint, stream, FormatOptions::default(), MetadataOptions::default())
        .map_err(|e| cannot(format!("not a WAV, FLAC, Ogg or MP3 file the header reader knows ({e})")))?;
    let track = format.default_track(TrackType::Audio).ok_or_else(|| cannot("no audio track".into()))?;
    let Some(CodecParameters::Audio(params)) = &track.codec_params else {
        return Err(cannot("the audio track has no codec parameters".into()));
    };
    let sample_rate = params.sample_rate.filter(|&r| r > 0).ok_or_else(|| cannot("the header states no sample rate".into()))?;
    let mut frames = track.num_frames.ok_or_else(|| cannot("the header states no length".into()))?;
    if params.codec == CODEC_ID_OPUS {
        // The Ogg demuxer counts Opus's pre-skip (the encoder's delay, 312 frames from
        // libopus) in the length, which decoders drop: soundfile and ffmpeg report less.
        frames = frames.saturating_sub(track.delay.unwrap_or(0) as u64);
    }
    Ok(Header { frames, sample_rate })
}

/// The budget reader as symphonia's source (its length from the file).
impl MediaSource for Budget<File> {
    fn is_seekable(&self) -> bool {
        true
    }

    fn byte_len(&self) -> Option<u64> {
        self.inner.metadata().ok().map(|m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::tests::Temp;

    fn plan(extra: &str) -> AudioPlan {
        serde_json::from_str(&format!(r#"{{"placeholder":"<audio>","token":"<audio>"{extra}}}"#)).unwrap()
    }

    fn wav(rate: u32, channels: u16, frames: u32) -> Vec<u8> {
        let data = frames * channels as u32 * 2;
        let mut b = b"RIFF".to_vec();
        b.extend((36 + data).to_le_bytes());
        b.extend(b"WAVEfmt ");
        b.extend(16u32.to_le_bytes());
        b.extend(1u16.to_le_bytes());
        b.extend(channels.to_le_bytes());
        b.extend(rate.to_le_bytes());
        b.extend((rate * channels as u32 * 2).to_le_bytes());
        b.extend((channels * 2).to_le_bytes());
        b.extend(16u16.to_le_bytes());
        b.extend(b"data");
        b.extend(data.to_le_bytes());
        b.extend(std::iter::repeat_n(0u8, data as usize));
        b
    }

    #[test]
    fn qwen2_audio_counts() {
        // A full 30 s window: 3000 mel frames, 1500 after the convolution, 750 after pooling.
        assert_eq!(whisper_tokens(whisper_frames(480_000, 480_000, 160), 2), 750);
        assert_eq!(whisper_tokens(whisper_frames(16_000, 480_000, 160), 2), 25);
        assert_eq!(whisper_tokens(whisper_frames(16_000, 480_000, 160), 1), 50);
        assert_eq!(whisper_tokens(whisper_frames(1, 480_000, 160), 2), 0);
        assert_eq!(window_tokens(&plan("")), 750);
    }

    #[test]
    fn wav_headers_give_the_length() {
        let file = Temp::new("a.wav", &wav(16_000, 1, 24_000));
        assert_eq!(read_header(&file.0), Ok(Header { frames: 24_000, sample_rate: 16_000 }));
        assert_eq!(audio_info(&plan(""), &file.0).unwrap(), AudioInfo { tokens: 37, samples: 24_000 });
        let stereo = Temp::new("b.wav", &wav(8_000, 2, 8_000));
        let h = read_header(&stereo.0).unwrap();
        assert_eq!((h.frames, h.samples_at(16_000)), (8_000, 16_000));
        assert_eq!(audio_info(&plan(r#","count":7"#), &stereo.0).unwrap().tokens, 7);
    }

    #[test]
    fn long_clips_error_or_are_cut() {
        let file = Temp::new("long.wav", &wav(16_000, 1, 16_000 * 31));
        let e = audio_info(&plan(""), &file.0).unwrap_err();
        assert!(e.contains("long.wav: the clip is 31.00 s long, more than the 30 s window"), "{e}");
        assert_eq!(audio_info(&plan(r#","long":"truncate""#), &file.0).unwrap().tokens, 750);
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let junk = Temp::new("junk.wav", b"RIFF\x10\0\0\0WAVEjunkjunk");
        let e = read_header(&junk.0).unwrap_err();
        assert!(e.starts_with(&format!("cannot read audio {}", junk.0.display())), "{e}");
        let text = Temp::new("notes.ogg", b"this is not audio at all, just text");
        assert!(read_header(&text.0).unwrap_err().contains("header reader knows"));
        assert!(read_header(Path::new("/dev/zero")).unwrap_err().ends_with("not a regular file"));
        assert!(read_header(Path::new("/nonexistent/a.wav")).unwrap_err().starts_with("cannot read audio /nonexistent/a.wav"));
        let empty = Temp::new("empty.wav", &wav(16_000, 1, 0));
        assert!(audio_info(&plan(""), &empty.0).is_err());
    }

    #[test]
    fn plans_are_checked() {
        assert!(check_plan(&plan("")).is_ok());
        assert!(check_plan(&plan(r#","count":0"#)).is_err());
        assert!(check_plan(&plan(r#","count":100000"#)).is_err());
        assert!(check_plan(&plan(r#","hop_length":0"#)).is_err());
        assert!(check_plan(&plan(r#","chunk_seconds":100000"#)).is_err());
    }
}
