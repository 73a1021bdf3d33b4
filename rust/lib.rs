//! mmrecipe core: the per-sample work of a recipe build, in parallel and deterministic.
//!
//! ```text
//!  Python (sources, LLM stages)          Rust core                       Python (release)
//!  columns per batch ──▶ compile: messages ─▶ text ─▶ tokens + mask ─▶ stores
//!                        layout: select ─▶ interleave ─▶ pack ─▶ emit ──▶ parquet shards
//! ```
//!
//! Modules, in the order the data passes them:
//! - `columns`: the buffers that cross the boundary (string columns, one batch), checked.
//! - `plan`: the build plan, a resolved recipe as the core reads it (JSON from Python).
//! - `compile`: the per-sample pipeline of each batch, into one store per source.
//! - `instruct`: instruction templates (`{question}`, `{field}`) and the choice of one per turn.
//! - `audio`: audio token counts (fixed, or the Whisper rule from the header's length).
//! - `video`: video token counts (fixed, or the Qwen2-VL rule from the container metadata);
//!   `matroska`: the metadata of Matroska and WebM files.
//! - `media`: image token counts (fixed, or Qwen2-VL's rule from the file header) and placeholders.
//! - `render`: chat-template rendering (minijinja) with each message's span in the text.
//! - `tokenize`: tokenization with response-only loss masks and image token runs.
//! - `fastbpe`: the fast engine tokenize uses for byte-level BPE shapes it knows.
//! - `overlong`: what to do with a sample over seq_len (truncate, split at turns).
//! - `spill`: tokenized samples kept compactly (on disk) until packing.
//! - `store`: one source's tokenized samples saved to, and loaded from, the token store.
//! - `layout`: selection, interleaving, packing, statistics and emitting the packed rows.
//! - `mix`: exact mixture counts (largest remainder) and the seeded choice of samples.
//! - `pack`: best-fit-decreasing bin packing and its lower bound.
//! - `rng`: the counter-based generator every seeded choice is made with.
//! - `pool`: worker-thread pools that are rebuilt in a forked child.
//! - `chunks`: large JSON / JSON Lines files read in chunks of records.
//! - `llm`: the LLM stages' columns: prompts and cache keys (`llm::prompts`), generated
//!   conversations parsed back (`llm::replies`).
//! - `shard`: a shard's rows planned on one machine and emitted on another.
//! - `error`: the one error type; `python`: the binding (`mmrecipe._core`), behind the
//!   `python` feature so `cargo test` runs without linking Python.

pub mod audio;
pub mod chunks;
pub mod columns;
pub mod compile;
pub mod error;
pub mod fastbpe;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod instruct;
pub mod layout;
pub mod llm;
pub mod matroska;
pub mod media;
pub mod mix;
pub mod overlong;
pub mod pack;
pub mod plan;
pub mod pool;
pub mod render;
pub mod rng;
pub mod shard;
pub mod spill;
pub mod store;
pub mod tar;
pub mod tokenize;
pub mod video;

#[cfg(feature = "python")]
mod python;

// mimalloc: tokenization allocates and frees many small buffers on every worker thread;
// glibc malloc spent ~40% of the tokenize stage in malloc/free (bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
