//! The build plan: a recipe after Python resolved and validated it, sent across the
//! boundary as JSON. Unknown fields are rejected so the two sides cannot drift apart.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub seed: u64,
    /// The epoch of a multi-epoch release this plan builds (`[output] epochs`; 0 for the first).
    #[serde(default)]
    pub epoch: u64,
    /// Jinja source of the chat template (the model's own, or a built-in's text).
    pub chat_template: String,
    #[serde(default)]
    pub bos_token: Option<String>,
    #[serde(default)]
    pub eos_token: Option<String>,
    /// `[model] added_tokens`: special tokens appended to the tokenizer as it is loaded.
    #[serde(default)]
    pub added_tokens: Vec<String>,
    #[serde(default)]
    pub image: Option<ImagePlan>,
    #[serde(default)]
    pub audio: Option<AudioPlan>,
    #[serde(default)]
    pub video: Option<VideoPlan>,
    pub seq_len: u32,
    #[serde(default)]
    pub train_on: TrainOn,
    #[serde(default = "yes")]
    pub train_on_eos: bool,
    #[serde(default)]
    pub overlong: Overlong,
    #[serde(default)]
    pub packing: Packing,
    /// Images per packed sequence at most (`[output] max_images`).
    #[serde(default)]
    pub max_images: Option<u32>,
    /// `[output] balance = "images"`: image counts per sequence as even as the packing allows.
    #[serde(default)]
    pub balance: Balance,
    #[serde(default = "yes")]
    pub shuffle: bool,
    pub mixture: MixturePlan,
    /// Temperature sampling: a source's share ∝ weight × usable_samples^alpha (0 = weights only).
    #[serde(default)]
    pub alpha: f64,
    pub sources: Vec<SourcePlan>,
    /// `[model] tokenizer_engine`: which encoder turns text into ids (the ids are the same).
    #[serde(default)]
    pub tokenizer_engine: TokenizerEngine,
}

impl Plan {
    /// The seed of this plan's epoch: templates, subset, order and packing drawn by it.
    pub fn epoch_seed(&self) -> u64 {
        crate::rng::epoch_seed(self.seed, self.epoch)
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    #[default]
    Assistant,
    LastAssistant,
    All,
}

/// The encoder requested: the fast engine where the tokenizer's shape allows it, HF's
/// `tokenizers` otherwise (`Auto`), or one of them forced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerEngine {
    #[default]
    Auto,
    Hf,
    Fast,
}

impl TokenizerEngine {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "hf" => Some(Self::Hf),
            "fast" => Some(Self::Fast),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    #[default]
    Drop,
    Truncate,
    SplitTurns,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// Best-fit decreasing, then the refill and pattern packers where they use fewer rows.
    #[default]
    Tight,
    Bfd,
    None,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    None,
    Images,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Fail,
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MixturePlan {
    /// Every usable row once.
    Natural,
    /// Exactly this many samples, split by weight.
    Samples(u64),
    /// This many tokens, split by weight; each source stops at the first sample that
    /// reaches its share.
    Tokens(u64),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePlan {
    /// Text that marks where an image goes (e.g. `<image>`).
    pub placeholder: String,
    /// The tokenizer token repeated for each image.
    pub token: String,
    /// Fixed tokens per image (LLaVA-style); when absent, computed from the image size.
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default = "default_patch")]
    pub patch: u32,
    #[serde(default = "default_merge")]
    pub merge: u32,
    #[serde(default = "default_min_pixels")]
    pub min_pixels: u64,
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub end: Option<String>,
}

fn default_patch() -> u32 {
    14
}
fn default_merge() -> u32 {
    2
}
fn default_min_pixels() -> u64 {
    56 * 56
}
fn default_max_pixels() -> u64 {
    28 * 28 * 1280
}

/// `[model] audio`: how `<audio>` placeholders expand (audio.rs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioPlan {
    pub placeholder: String,
    pub token: String,
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub end: Option<String>,
    /// Fixed tokens per clip; when absent, the Whisper rule from the clip's length.
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default = "default_sampling_rate")]
    pub sampling_rate: u32,
    #[serde(default = "default_chunk_seconds")]
    pub chunk_seconds: u32,
    #[serde(default = "default_hop_length")]
    pub hop_length: u32,
    #[serde(default = "default_pool")]
    pub pool: u32,
    #[serde(default)]
    pub long: LongAudio,
}

/// A clip longer than the window: an error, or cut to it as the feature extractor does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LongAudio {
    #[default]
    Error,
    Truncate,
}

fn default_sampling_rate() -> u32 {
    16_000
}
fn default_chunk_seconds() -> u32 {
    30
}
fn default_hop_length() -> u32 {
    160
}
fn default_pool() -> u32 {
    2
}

/// `[model] video`: how `<video>` placeholders expand (video.rs). The defaults are
/// transformers' `Qwen2VLVideoProcessor`'s.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoPlan {
    pub placeholder: String,
    pub token: String,
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub end: Option<String>,
    /// Fixed tokens per clip; when absent, the Qwen2-VL rule from the container metadata.
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default = "default_video_fps")]
    pub fps: f64,
    #[serde(default = "default_min_frames")]
    pub min_frames: u32,
    #[serde(default = "default_max_frames")]
    pub max_frames: u32,
    #[serde(default = "default_video_min_pixels")]
    pub min_pixels: u64,
    #[serde(default = "default_video_max_pixels")]
    pub max_pixels: u64,
    #[serde(default = "default_patch")]
    pub patch: u32,
    #[serde(default = "default_merge")]
    pub merge: u32,
    #[serde(default = "default_temporal_patch")]
    pub temporal_patch: u32,
    /// The processor's `cap_pixels_per_frame`: each frame under an even share of
    /// `max_video_tokens` worth of pixels (off by default, as in the processor).
    #[serde(default)]
    pub cap_pixels_per_frame: bool,
    #[serde(default = "default_max_video_tokens")]
    pub max_video_tokens: u64,
    /// A clip giving more tokens is an error naming it.
    #[serde(default = "default_video_max_tokens")]
    pub max_tokens: u64,
}

fn default_video_fps() -> f64 {
    2.0
}
fn default_min_frames() -> u32 {
    4
}
fn default_max_frames() -> u32 {
    768
}
fn default_video_min_pixels() -> u64 {
    128 * 28 * 28
}
fn default_video_max_pixels() -> u64 {
    768 * 28 * 28
}
fn default_temporal_patch() -> u32 {
    2
}
fn default_max_video_tokens() -> u64 {
    128_000
}
fn default_video_max_tokens() -> u64 {
    32_768
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePlan {
    pub name: String,
    /// Instruction templates applied to each user turn; empty = use the turn text as is.
    #[serde(default)]
    pub templates: Vec<String>,
    /// Names of the extra per-sample field columns, in the order batches pass them.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Directory that image paths are relative to.
    #[serde(default)]
    pub image_root: Option<String>,
    /// Directory that audio paths are relative to.
    #[serde(default)]
    pub audio_root: Option<String>,
    /// Directory that video paths are relative to.
    #[serde(default)]
    pub video_root: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: f64,
    #[serde(default)]
    pub on_error: OnError,
    /// The most passes over this source a mixture may take (exceeding it is an error).
    #[serde(default)]
    pub max_epochs: Option<f64>,
}

fn default_weight() -> f64 {
    1.0
}
