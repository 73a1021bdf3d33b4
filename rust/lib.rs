//! mmrecipe core: the per-sample work of a recipe build, in parallel and deterministic.
//!
//! Stages, one module each: instruction templates (`instruct`), chat-template rendering
//! (`render`), tokenization with response-only masks (`tokenize`), image token counts
//! (`media`), the per-source batch pipeline (`compile`), exact mixtures (`mix`) and
//! best-fit-decreasing packing (`pack`); for the LLM stages, per-row prompts and cache
//! keys (`prompts`) and the parsing of generated conversations (`replies`). The Python
//! binding lives behind the `python` feature so `cargo test` runs without linking Python.

pub mod chunks;
pub mod compile;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod instruct;
pub mod media;
pub mod mix;
pub mod overlong;
pub mod pack;
pub mod plan;
pub mod prompts;
pub mod render;
pub mod replies;
pub mod rng;
pub mod spill;
pub mod tokenize;

#[cfg(feature = "python")]
mod python;

// mimalloc: tokenization allocates and frees many small buffers on every worker thread;
// glibc malloc spent ~40% of the tokenize stage in malloc/free (bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
