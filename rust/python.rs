//! The Python binding (`mmrecipe._core`): a few coarse calls over whole NumPy buffers,
//! the GIL released while the core works. Errors are raised as the exception classes
//! defined here (`mmrecipe.errors` re-exports them with their documentation).

use crate::columns::{Batch, StrCol};
use crate::compile::Compiler;
use crate::error::Error;
use crate::fastbpe::FastBpe;
use crate::layout::{Packed, RELEASE_COLUMNS};
use crate::plan::{Plan, TokenizerEngine};
use crate::render::{self, Message};
use crate::tokenize::{choose_engine, TextTokenizer};
use numpy::{IntoPyArray, PyReadonlyArray1};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3::IntoPyObjectExt;

// Every error mmrecipe raises on purpose is an MMRecipeError. Named as `mmrecipe.errors`
// shows them, so tracebacks and pickles refer to the public module.
create_exception!(mmrecipe.errors, MMRecipeError, PyException);
create_exception!(mmrecipe.errors, RecipeError, MMRecipeError);
create_exception!(mmrecipe.errors, SourceError, MMRecipeError);
create_exception!(mmrecipe.errors, DataError, MMRecipeError);
create_exception!(mmrecipe.errors, TokenizerError, MMRecipeError);
create_exception!(mmrecipe.errors, TemplateError, MMRecipeError);
create_exception!(mmrecipe.errors, ReleaseError, MMRecipeError);
create_exception!(mmrecipe.errors, LLMError, MMRecipeError);
create_exception!(mmrecipe.errors, StorageError, MMRecipeError);
create_exception!(mmrecipe.errors, InternalError, MMRecipeError);

fn add_exceptions(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MMRecipeError", py.get_type::<MMRecipeError>())?;
    m.add("RecipeError", py.get_type::<RecipeError>())?;
    m.add("SourceError", py.get_type::<SourceError>())?;
    m.add("DataError", py.get_type::<DataError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("TemplateError", py.get_type::<TemplateError>())?;
    m.add("ReleaseError", py.get_type::<ReleaseError>())?;
    m.add("LLMError", py.get_type::<LLMError>())?;
    m.add("StorageError", py.get_type::<StorageError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    Ok(())
}

/// The one table from core errors to exception classes: each kind's class and the
/// attributes that say where (`key`; `source`, `row`, `field`; `path`).
fn to_py(py: Python<'_>, err: Error) -> PyErr {
    let message = err.to_string();
    let raise = || -> PyResult<PyErr> {
        let (exc, attributes): (PyErr, Vec<(&str, Py<PyAny>)>) = match err {
            Error::Plan { key, .. } => (RecipeError::new_err(message), vec![("key", key.into_py_any(py)?)]),
            Error::Tokenizer(_) => (TokenizerError::new_err(message), vec![]),
            Error::Template(_) => (TemplateError::new_err(message), vec![]),
            Error::Data { source, row, field, .. } => (
                DataError::new_err(message),
                vec![("source", source.into_py_any(py)?), ("row", row.into_py_any(py)?), ("field", field.into_py_any(py)?)],
            ),
            Error::Io { path, .. } => (StorageError::new_err(message), vec![("path", path.into_py_any(py)?)]),
            Error::Internal(_) => (InternalError::new_err(message), vec![]),
        };
        for (name, value) in attributes {
            exc.value(py).setattr(name, value)?;
        }
        Ok(exc)
    };
    raise().unwrap_or_else(|e| e)
}

fn str_col<'a>(offsets: &'a PyReadonlyArray1<'_, i64>, data: &'a PyReadonlyArray1<'_, u8>) -> PyResult<StrCol<'a>> {
    Ok(StrCol { offsets: offsets.as_slice()?, data: data.as_slice()? })
}

/// One batch as a dict of NumPy arrays (`mmrecipe.buffers.batch_arguments` makes it):
/// see `columns::Batch` for what each holds; `fields` has (offsets, bytes) per template
/// field, in the plan's order.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct BatchColumns<'py> {
    rows: PyReadonlyArray1<'py, u64>,
    turn_offsets: PyReadonlyArray1<'py, i64>,
    roles: PyReadonlyArray1<'py, u8>,
    content_offsets: PyReadonlyArray1<'py, i64>,
    content_data: PyReadonlyArray1<'py, u8>,
    image_offsets: PyReadonlyArray1<'py, i64>,
    image_path_offsets: PyReadonlyArray1<'py, i64>,
    image_path_data: PyReadonlyArray1<'py, u8>,
    /// Per image, its bytes where the source holds them (a parquet cell); absent or
    /// all empty: every image is read from its path.
    #[pyo3(default)]
    image_data_offsets: Option<PyReadonlyArray1<'py, i64>>,
    #[pyo3(default)]
    image_data: Option<PyReadonlyArray1<'py, u8>>,
    fields: Vec<(PyReadonlyArray1<'py, i64>, PyReadonlyArray1<'py, u8>)>,
    /// Per sample, its audio clips (offsets into the path column); absent without audio.
    #[pyo3(default)]
    audio_offsets: Option<PyReadonlyArray1<'py, i64>>,
    #[pyo3(default)]
    audio_path_offsets: Option<PyReadonlyArray1<'py, i64>>,
    #[pyo3(default)]
    audio_path_data: Option<PyReadonlyArray1<'py, u8>>,
    /// Per sample, its video clips, as audio; absent without video.
    #[pyo3(default)]
    video_offsets: Option<PyReadonlyArray1<'py, i64>>,
    #[pyo3(default)]
    video_path_offsets: Option<PyReadonlyArray1<'py, i64>>,
    #[pyo3(default)]
    video_path_data: Option<PyReadonlyArray1<'py, u8>>,
}

impl BatchColumns<'_> {
    /// Views of the arrays, valid while `self` holds them (no copy).
    fn batch(&self) -> PyResult<Batch<'_>> {
        Ok(Batch {
            rows: self.rows.as_slice()?,
            turn_offsets: self.turn_offsets.as_slice()?,
            roles: self.roles.as_slice()?,
            contents: str_col(&self.content_offsets, &self.content_data)?,
            image_offsets: self.image_offsets.as_slice()?,
            images: str_col(&self.image_path_offsets, &self.image_path_data)?,
            image_data: match (&self.image_data_offsets, &self.image_data) {
                (Some(o), Some(d)) => Some(str_col(o, d)?),
                _ => None,
            },
            fields: self.fields.iter().map(|(o, d)| str_col(o, d)).collect::<PyResult<Vec<_>>>()?,
            audio: match (&self.audio_offsets, &self.audio_path_offsets, &self.audio_path_data) {
                (Some(a), Some(o), Some(d)) => Some((a.as_slice()?, str_col(o, d)?)),
                _ => None,
            },
            video: match (&self.video_offsets, &self.video_path_offsets, &self.video_path_data) {
                (Some(v), Some(o), Some(d)) => Some((v.as_slice()?, str_col(o, d)?)),
                _ => None,
            },
        })
    }
}

/// The packed arrays as a dict keyed by their names. The destructuring is exhaustive: a
/// field added to `Packed` must be listed here.
macro_rules! packed_dict {
    ($py:expr, $packed:expr, $($field:ident),* $(,)?) => {{
        let Packed { $($field),* } = $packed;
        let d = PyDict::new($py);
        $(d.set_item(stringify!($field), $field.into_pyarray($py))?;)*
        d
    }};
}

/// An entry loaded: (meta, "") or (None, why it was not used).
type LoadedPy<'py> = (Option<Bound<'py, pyo3::types::PyBytes>>, String);

fn loaded_to_py(py: Python<'_>, loaded: crate::store::Loaded) -> LoadedPy<'_> {
    match loaded {
        Ok(meta) => (Some(pyo3::types::PyBytes::new(py, &meta)), String::new()),
        Err(why) => (None, why),
    }
}

fn records(attach: bool) -> crate::store::Records {
    if attach {
        crate::store::Records::Attach
    } else {
        crate::store::Records::Copy
    }
}

/// The packed arrays as NumPy arrays keyed by their names.
fn packed_to_dict(py: Python<'_>, p: Packed) -> PyResult<Bound<'_, PyDict>> {
    Ok(packed_dict!(
        py,
        p,
            row_offsets,
            input_ids,
            loss_mask,
            segment_offsets,
            segment_lengths,
            segment_source,
            segment_row,
            segment_part,
            segment_template,
            segment_repeat,
            segment_images,
            image_offsets,
            image_positions,
            image_lengths,
            image_path_offsets,
            image_path_data,
            image_grid_t,
            image_grid_h,
            image_grid_w,
            audio_offsets,
            audio_positions,
            audio_lengths,
            audio_path_offsets,
            audio_path_data,
            audio_samples,
            video_offsets,
            video_positions,
            video_lengths,
            video_path_offsets,
            video_path_data,
            video_grid_t,
            video_grid_h,
            video_grid_w,
            video_frames,
    ))
}

/// Emits the rows of a shard planned by `Compiler.shard_plan`, reading their token records
/// from the files the plan names (where a cluster task writes the shard).
#[pyclass(module = "mmrecipe._core", name = "ShardEmitter")]
struct PyShardEmitter {
    inner: crate::shard::ShardEmitter,
}

#[pymethods]
impl PyShardEmitter {
    #[new]
    fn new(py: Python<'_>, plan: &[u8]) -> PyResult<Self> {
        let inner = py.detach(|| crate::shard::ShardEmitter::new(plan)).map_err(|e| to_py(py, e))?;
        Ok(PyShardEmitter { inner })
    }

    /// The shard's rows.
    fn rows(&self) -> usize {
        self.inner.rows()
    }

    /// Rows lo..hi of the shard as `Compiler.emit` gives them.
    fn emit<'py>(&mut self, py: Python<'py>, lo: usize, hi: usize) -> PyResult<Bound<'py, PyDict>> {
        let inner = &mut self.inner;
        let p = py.detach(|| inner.emit(lo, hi)).map_err(|e| to_py(py, e))?;
        packed_to_dict(py, p)
    }
}

/// Compiles the samples of a recipe into packed, masked token sequences.
#[pyclass(module = "mmrecipe._core", name = "Compiler")]
struct PyCompiler {
    inner: Compiler,
}

#[pymethods]
impl PyCompiler {
    #[new]
    #[pyo3(signature = (plan_json, tokenizer_path, threads = 0, spill_dir = None))]
    fn new(
        py: Python<'_>,
        plan_json: &[u8],
        tokenizer_path: &str,
        threads: usize,
        spill_dir: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let plan: Plan =
            serde_json::from_slice(plan_json).map_err(|e| PyValueError::new_err(format!("invalid build plan: {e}")))?;
        let path = tokenizer_path.to_string();
        let inner = py.detach(move || Compiler::new(plan, &path, threads, spill_dir.as_deref())).map_err(|e| to_py(py, e))?;
        Ok(PyCompiler { inner })
    }

    /// Adds one batch of source `source` (the columns `mmrecipe.buffers.batch_arguments`
    /// makes); returns how many usable samples it added.
    fn add_batch(&mut self, py: Python<'_>, source: usize, columns: BatchColumns<'_>) -> PyResult<usize> {
        let batch = columns.batch()?;
        let inner = &mut self.inner;
        py.detach(|| inner.add_batch(source, &batch)).map_err(|e| to_py(py, e))
    }

    /// Samples of a batch rendered and tokenized as the build would (nothing is kept):
    /// per sample (text, ids, mask, byte offsets [n, 2], template id, image runs), or an
    /// error message. Same arguments as `add_batch`.
    fn preview_batch<'py>(&mut self, py: Python<'py>, source: usize, columns: BatchColumns<'_>) -> PyResult<Bound<'py, PyList>> {
        let batch = columns.batch()?;
        let inner = &mut self.inner;
        let results = py.detach(|| inner.preview(source, &batch)).map_err(|e| to_py(py, e))?;
        let out = PyList::empty(py);
        for r in results {
            match r {
                Ok((text, enc, template)) => {
                    let offsets: Vec<u32> = enc.offsets.iter().flat_map(|&(a, b)| [a, b]).collect();
                    let runs: Vec<(u32, u32)> = enc.images.iter().map(|r| (r.pos, r.len)).collect();
                    out.append((
                        text,
                        enc.ids.into_pyarray(py),
                        enc.mask.into_pyarray(py),
                        offsets.into_pyarray(py),
                        template,
                        runs,
                    ))?;
                }
                Err(message) => out.append(message)?,
            }
        }
        Ok(out)
    }

    /// Mixes and packs everything added; returns the build summary as JSON.
    fn finish(&mut self, py: Python<'_>) -> PyResult<String> {
        let inner = &mut self.inner;
        let summary = py.detach(|| inner.finish()).map_err(|e| to_py(py, e))?;
        serde_json::to_string(&summary).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Packed rows lo..hi (after `finish`) as flat NumPy arrays, keyed by the release's
    /// column names and their offsets (`layout::Packed`).
    fn emit<'py>(&mut self, py: Python<'py>, lo: usize, hi: usize) -> PyResult<Bound<'py, PyDict>> {
        let inner = &mut self.inner;
        let p = py.detach(|| inner.emit(lo, hi)).map_err(|e| to_py(py, e))?;
        packed_to_dict(py, p)
    }

    /// The plan of rows lo..hi (after `finish`) that a `ShardEmitter` emits them from in
    /// another process: the rows' segments and the files holding their token records.
    fn shard_plan<'py>(&mut self, py: Python<'py>, lo: usize, hi: usize) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let inner = &mut self.inner;
        let plan = py.detach(|| inner.shard_plan(lo, hi)).map_err(|e| to_py(py, e))?;
        Ok(pyo3::types::PyBytes::new(py, &plan))
    }

    /// Renders and tokenizes conversations given as JSON
    /// (`[{"messages": [{"role", "content"}], "image_counts": [..]}]`). For previews and
    /// tests; the build path uses `add_batch`. Returns (text, ids, mask, image runs) each.
    fn encode_chats<'py>(&mut self, py: Python<'py>, chats_json: &str) -> PyResult<Bound<'py, PyList>> {
        #[derive(serde::Deserialize)]
        struct Chat {
            messages: Vec<Message>,
            #[serde(default)]
            image_counts: Vec<u32>,
        }
        let chats: Vec<Chat> = serde_json::from_str(chats_json).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let chats: Vec<(Vec<Message>, Vec<u32>)> = chats.into_iter().map(|c| (c.messages, c.image_counts)).collect();
        let inner = &mut self.inner;
        let results = py.detach(|| inner.encode_many(&chats)).map_err(|e| to_py(py, e))?;
        let out = PyList::empty(py);
        for r in results {
            let (text, enc) = r.map_err(|e| to_py(py, e))?;
            let runs: Vec<(u32, u32)> = enc.images.iter().map(|r| (r.pos, r.len)).collect();
            out.append((text, enc.ids.into_pyarray(py), enc.mask.into_pyarray(py), runs))?;
        }
        Ok(out)
    }

    /// Saves source `source`'s samples (after its last batch) to the token store entry
    /// `path` for `key`, with `meta` kept beside them; returns the entry's size in bytes.
    /// The file is written beside `path` and renamed into place.
    fn save_source(&mut self, py: Python<'_>, source: usize, key: &str, meta: &[u8], path: std::path::PathBuf) -> PyResult<u64> {
        let inner = &mut self.inner;
        py.detach(|| inner.save_source(source, key, meta, &path)).map_err(|e| to_py(py, e))
    }

    /// Loads the token store entry `path` as source `source`'s samples (before any of
    /// its batches): (meta, "") when the entry is whole and holds `key`, else (None, why)
    /// and the source is left empty, to be tokenized.
    #[pyo3(signature = (source, key, path, attach = false))]
    fn load_source<'py>(
        &mut self,
        py: Python<'py>,
        source: usize,
        key: &str,
        path: std::path::PathBuf,
        attach: bool,
    ) -> PyResult<LoadedPy<'py>> {
        let inner = &mut self.inner;
        let loaded = py.detach(|| inner.load_source(source, key, &path, records(attach))).map_err(|e| to_py(py, e))?;
        Ok(loaded_to_py(py, loaded))
    }

    /// Loads the entry `path` of a work unit of source `source` (the rows after those
    /// loaded so far) and appends its samples: (meta, "") when whole and holding `key`,
    /// else (None, why) and the source is left as it was.
    #[pyo3(signature = (source, key, path, attach = false))]
    fn load_unit<'py>(
        &mut self,
        py: Python<'py>,
        source: usize,
        key: &str,
        path: std::path::PathBuf,
        attach: bool,
    ) -> PyResult<LoadedPy<'py>> {
        let inner = &mut self.inner;
        let loaded = py.detach(|| inner.load_unit(source, key, &path, records(attach))).map_err(|e| to_py(py, e))?;
        Ok(loaded_to_py(py, loaded))
    }

    /// The longest sample of source `source` tokenized so far, before the overlong policy
    /// (when it fits seq_len, the policy changed no sample of the source).
    fn source_max_len(&self, py: Python<'_>, source: usize) -> PyResult<u32> {
        self.inner.source_max_len(source).map_err(|e| to_py(py, e))
    }

    /// The id of a token, or None.
    fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer().token_id(token)
    }

    /// The tokenizer engine in use ("fast" or "hf") and why it was chosen.
    fn tokenizer_engine(&self) -> (&'static str, String) {
        let (name, why) = self.inner.tokenizer().engine();
        (name, why.to_string())
    }
}

fn engine_request(requested: &str) -> PyResult<TokenizerEngine> {
    TokenizerEngine::parse(requested)
        .ok_or_else(|| PyValueError::new_err(format!("tokenizer_engine: '{requested}' is not one of 'auto', 'hf', 'fast'")))
}

/// The engine a build would tokenize `tokenizer_path` with when `requested` ("auto", "hf",
/// "fast"), and why. Forcing "fast" on a tokenizer it cannot encode exactly is a RecipeError.
#[pyfunction]
#[pyo3(signature = (tokenizer_path, requested = "auto"))]
fn tokenizer_engine(py: Python<'_>, tokenizer_path: &str, requested: &str) -> PyResult<(&'static str, String)> {
    let requested = engine_request(requested)?;
    let tk = TextTokenizer::from_file(tokenizer_path).map_err(|e| to_py(py, e))?;
    let (engine, why) = choose_engine(&tk, requested).map_err(|e| to_py(py, e))?;
    Ok((engine.name(), why))
}

/// Benchmarks and tests: the ids of each text encoded on this thread by one engine alone
/// ("fast": the fast engine's words and BPE, no cache; "hf": the tokenizers crate's
/// `encode`, also for the texts the fast engine does not serve), special-token text as
/// plain text. Returns (offsets per text, ids).
#[pyfunction]
fn encode_texts<'py>(py: Python<'py>, tokenizer_path: &str, texts: Vec<String>, engine: &str) -> PyResult<PackedBins<'py>> {
    let mut tk = TextTokenizer::from_file(tokenizer_path).map_err(|e| to_py(py, e))?;
    tk.set_encode_special_tokens(true);
    let fast = match engine {
        "fast" => Some(FastBpe::new(&tk).map_err(|e| PyValueError::new_err(format!("the fast engine does not apply: {e}")))?),
        "hf" => None,
        _ => return Err(PyValueError::new_err(format!("engine: {engine:?} is not 'fast' or 'hf'"))),
    };
    let (ids, offsets) = py
        .detach(|| {
            let mut ids: Vec<u32> = Vec::new();
            let mut offsets: Vec<i64> = vec![0];
            for t in &texts {
                match &fast {
                    Some(f) if f.serves(t) => ids.extend(f.encode(t)),
                    _ => ids.extend_from_slice(tk.encode(t.as_str(), false).map_err(|e| e.to_string())?.get_ids()),
                }
                offsets.push(ids.len() as i64);
            }
            Ok::<_, String>((ids, offsets))
        })
        .map_err(PyValueError::new_err)?;
    Ok((offsets.into_pyarray(py), ids.into_pyarray(py)))
}

/// (bin offsets, item indices).
type PackedBins<'py> = (Bound<'py, numpy::PyArray1<i64>>, Bound<'py, numpy::PyArray1<u32>>);

/// Checks lengths and image counts for the packing functions: every item fits an empty
/// bin, and there is an image count per item when one is needed.
fn pack_items<'a>(lengths: &'a [u32], images: Option<&'a [u32]>, capacity: u32, max_images: Option<u32>) -> PyResult<&'a [u32]> {
    if capacity == 0 {
        return Err(PyValueError::new_err("the capacity must be at least 1"));
    }
    if let Some(i) = lengths.iter().position(|&l| l == 0 || l > capacity) {
        return Err(PyValueError::new_err(format!("item {i}: a length of {} is outside 1..={capacity}", lengths[i])));
    }
    let images = images.unwrap_or(&[]);
    if max_images.is_some() && images.len() != lengths.len() {
        return Err(PyValueError::new_err(format!("{} image counts for {} lengths", images.len(), lengths.len())));
    }
    if let (Some(m), Some(i)) = (max_images, max_images.and_then(|m| images.iter().position(|&k| k > m))) {
        return Err(PyValueError::new_err(format!("item {i}: {} images exceed max_images = {m}", images[i])));
    }
    Ok(images)
}

/// Packs `lengths` into bins of `capacity` tokens (and `max_images` images, counted by
/// `images`) with `packer` ("bfd", "tight", "refill", "patterns", "balanced" for
/// `balance = "images"`; benchmarks, tests):
/// returns (bin offsets, item indices) with bin b holding items[offsets[b]..offsets[b+1]].
#[pyfunction]
#[pyo3(signature = (lengths, capacity, packer = "bfd", images = None, max_images = None))]
fn pack_lengths<'py>(
    py: Python<'py>,
    lengths: PyReadonlyArray1<'py, u32>,
    capacity: u32,
    packer: &str,
    images: Option<PyReadonlyArray1<'py, u32>>,
    max_images: Option<u32>,
) -> PyResult<PackedBins<'py>> {
    use crate::pack;
    let l = lengths.as_slice()?;
    let images = images.as_ref().map(|a| a.as_slice()).transpose()?;
    let k = pack_items(l, images, capacity, max_images)?;
    let budget = pack::Budget { tokens: capacity, images: max_images };
    if packer == "patterns" && max_images.is_some() {
        return Err(PyValueError::new_err("the pattern packer counts tokens only: no max_images"));
    }
    let bins = match packer {
        "bfd" => py.detach(|| pack::best_fit_decreasing(l, k, budget)),
        "tight" => py.detach(|| pack::tight(l, k, budget).0),
        "refill" => py.detach(|| pack::refill(l, k, budget)),
        "patterns" => py.detach(|| pack::patterns(l, capacity)),
        "balanced" if images.is_some() => py.detach(|| pack::balanced(l, images.unwrap_or(&[]), budget).0),
        "balanced" => return Err(PyValueError::new_err("the balanced packer needs the image counts")),
        other => return Err(PyValueError::new_err(format!("unknown packer {other:?}; expected bfd, tight, refill, patterns or balanced"))),
    };
    let mut offsets = Vec::with_capacity(bins.len() + 1);
    offsets.push(0i64);
    let mut items = Vec::with_capacity(l.len());
    for b in bins {
        items.extend_from_slice(&b);
        offsets.push(items.len() as i64);
    }
    Ok((offsets.into_pyarray(py), items.into_pyarray(py)))
}

/// The lower bounds on the bins any packing of `lengths` needs (`pack::Bounds` as a
/// dict: l1, l2, count, dff, images, best).
#[pyfunction]
#[pyo3(signature = (lengths, capacity, images = None, max_images = None))]
fn pack_bounds<'py>(
    py: Python<'py>,
    lengths: PyReadonlyArray1<'py, u32>,
    capacity: u32,
    images: Option<PyReadonlyArray1<'py, u32>>,
    max_images: Option<u32>,
) -> PyResult<Bound<'py, PyDict>> {
    let l = lengths.as_slice()?;
    let images = images.as_ref().map(|a| a.as_slice()).transpose()?;
    let k = pack_items(l, images, capacity, max_images)?;
    let b = py.detach(|| crate::pack::bounds(l, k, capacity, max_images));
    let d = PyDict::new(py);
    for (key, v) in [("l1", b.l1), ("l2", b.l2), ("count", b.count), ("dff", b.dff), ("images", b.images), ("best", b.best)] {
        d.set_item(key, v)?;
    }
    Ok(d)
}

/// A JSON Lines file, or a JSON array of records, read as JSON Lines chunks.
#[pyclass(module = "mmrecipe._core", name = "JsonChunks")]
struct PyJsonChunks {
    inner: crate::chunks::JsonChunks,
}

#[pymethods]
impl PyJsonChunks {
    /// `offset`, `newlines`, `records`: the file read on from a `position()` (a work unit).
    #[new]
    #[pyo3(signature = (path, array, offset = 0, newlines = 0, records = 0))]
    fn new(path: std::path::PathBuf, array: bool, offset: u64, newlines: u64, records: u64) -> PyResult<Self> {
        let inner = crate::chunks::JsonChunks::open_at(&path, array, offset, newlines, records)
            .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("{}: {e}", path.display())))?;
        Ok(PyJsonChunks { inner })
    }

    /// Where the next chunk starts: (byte offset, newlines and records before it).
    fn position(&self) -> (u64, u64, u64) {
        self.inner.position()
    }

    /// The next chunk of at most `max_records` records as JSON Lines bytes, or None.
    fn next_chunk<'py>(&mut self, py: Python<'py>, max_records: usize) -> PyResult<Option<Bound<'py, pyo3::types::PyBytes>>> {
        let inner = &mut self.inner;
        let chunk = py.detach(|| inner.next_chunk(max_records.max(1))).map_err(PyValueError::new_err)?;
        Ok(chunk.map(|c| pyo3::types::PyBytes::new(py, &c)))
    }
}

/// The Jinja source of a built-in chat template, or None.
#[pyfunction]
fn builtin_template(name: &str) -> Option<&'static str> {
    render::builtin(name)
}

/// Image tokens for an image of `width` × `height` under the Qwen2-VL rule.
#[pyfunction]
#[pyo3(signature = (width, height, patch = 14, merge = 2, min_pixels = 3136, max_pixels = 1003520))]
fn image_token_count(width: u64, height: u64, patch: u32, merge: u32, min_pixels: u64, max_pixels: u64) -> u32 {
    let plan = crate::plan::ImagePlan {
        placeholder: String::new(),
        token: String::new(),
        count: None,
        patch,
        merge,
        min_pixels,
        max_pixels,
        start: None,
        end: None,
    };
    crate::media::dynamic_count(&plan, width, height)
}

/// A video clip's container metadata (never a decoded frame): (frames, frame rate as
/// (numerator, denominator), coded width, coded height, turned a quarter by its matrix).
#[pyfunction]
fn video_metadata(py: Python<'_>, path: std::path::PathBuf) -> PyResult<(u64, (u64, u64), u64, u64, bool)> {
    let h = py.detach(|| crate::video::read_header(&path)).map_err(PyValueError::new_err)?;
    Ok((h.frames, h.rate, h.width, h.height, h.quarter_turned))
}

/// The video rule's (tokens, [t, h, w] grid, frames sampled) for a clip of `frames` frames
/// at `rate` (numerator, denominator) and `width` × `height`, under the rule `rule_json`
/// (the core's video plan, JSON, without placeholder and token).
#[pyfunction]
#[pyo3(signature = (rule_json, frames, rate, width, height, quarter_turned = false))]
fn video_token_count(
    rule_json: &str,
    frames: u64,
    rate: (u64, u64),
    width: u64,
    height: u64,
    quarter_turned: bool,
) -> PyResult<(u32, [u32; 3], u32)> {
    let mut rule: serde_json::Value = serde_json::from_str(rule_json).map_err(|e| PyValueError::new_err(e.to_string()))?;
    if let Some(obj) = rule.as_object_mut() {
        obj.entry("placeholder").or_insert("<video>".into());
        obj.entry("token").or_insert("<video>".into());
    }
    let plan: crate::plan::VideoPlan = serde_json::from_value(rule).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let header = crate::video::Header { frames, rate, width, height, quarter_turned };
    let info = crate::video::tokens_for(&plan, header).map_err(PyValueError::new_err)?;
    Ok((info.tokens, info.grid, info.frames))
}

/// Runs `job` with the GIL released on the process's shared pool (rebuilt after a fork,
/// unlike rayon's global pool: see `pool`).
fn on_shared_pool<T: Send>(py: Python<'_>, job: impl FnOnce() -> T + Send) -> PyResult<T> {
    let pool = crate::pool::shared().map_err(|e| to_py(py, e))?;
    Ok(py.detach(|| pool.install(job)))
}

type Arr<'py, T> = Bound<'py, numpy::PyArray1<T>>;

/// Per-row text from templates (`mmrecipe.lengthen`): row i takes one of `templates`,
/// chosen by (seed, stream, rows[i]), filled from the columns named `names`. Returns
/// (offsets, bytes) of the filled strings.
#[pyfunction]
fn fill_templates<'py>(
    py: Python<'py>,
    templates: Vec<String>,
    seed: u64,
    stream: &str,
    rows: PyReadonlyArray1<'py, u64>,
    names: Vec<String>,
    columns: Vec<(PyReadonlyArray1<'py, i64>, PyReadonlyArray1<'py, u8>)>,
) -> PyResult<(Arr<'py, i64>, Arr<'py, u8>)> {
    let rows = rows.as_slice()?;
    let cols = columns.iter().map(|(o, d)| str_col(o, d)).collect::<PyResult<Vec<_>>>()?;
    let (offsets, data) = on_shared_pool(py, || crate::llm::prompts::fill(&templates, seed, stream, rows, &names, &cols))?
        .map_err(PyValueError::new_err)?;
    Ok((offsets.into_pyarray(py), data.into_pyarray(py)))
}

/// Hex SHA-256 of `prefix` + each string of (offsets, bytes): 64 ASCII bytes per row.
#[pyfunction]
fn content_keys<'py>(
    py: Python<'py>,
    prefix: &[u8],
    offsets: PyReadonlyArray1<'py, i64>,
    data: PyReadonlyArray1<'py, u8>,
) -> PyResult<Bound<'py, numpy::PyArray1<u8>>> {
    let column = str_col(&offsets, &data)?;
    let keys = on_shared_pool(py, || crate::llm::prompts::keys(prefix, column))?.map_err(PyValueError::new_err)?;
    Ok(keys.into_pyarray(py))
}

/// Parses a column of LLM replies (`mmrecipe.stages`): row i is handled as `states[i]`
/// says (0 a finished reply, 1 cut at max_tokens, 2 no reply). Returns (valid, turn
/// offsets, roles, content offsets, content bytes, reason offsets, reason bytes).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn parse_replies<'py>(
    py: Python<'py>,
    offsets: PyReadonlyArray1<'py, i64>,
    data: PyReadonlyArray1<'py, u8>,
    states: PyReadonlyArray1<'py, u8>,
    format: &str,
    min_turns: usize,
) -> PyResult<(Arr<'py, u8>, Arr<'py, i64>, Arr<'py, u8>, Arr<'py, i64>, Arr<'py, u8>, Arr<'py, i64>, Arr<'py, u8>)> {
    let texts = str_col(&offsets, &data)?;
    let states = states.as_slice()?;
    let format = crate::llm::replies::Format::parse(format).map_err(PyValueError::new_err)?;
    let p = on_shared_pool(py, || crate::llm::replies::parse_column(texts, states, format, min_turns))?
        .map_err(PyValueError::new_err)?;
    Ok((
        p.valid.into_pyarray(py),
        p.turn_offsets.into_pyarray(py),
        p.roles.into_pyarray(py),
        p.content_offsets.into_pyarray(py),
        p.content.into_pyarray(py),
        p.reason_offsets.into_pyarray(py),
        p.reasons.into_pyarray(py),
    ))
}

/// The regular-file members of an uncompressed tar file: (names, data offsets, sizes).
/// Raises EOFError for a truncated file, ValueError for one that is not a tar archive.
#[pyfunction]
fn tar_members<'py>(
    py: Python<'py>,
    path: std::path::PathBuf,
) -> PyResult<(Vec<String>, Arr<'py, u64>, Arr<'py, u64>)> {
    let found = py.detach(|| crate::tar::members(&path));
    let members = found.map_err(|e| match e {
        crate::tar::TarError::Truncated(m) => pyo3::exceptions::PyEOFError::new_err(m),
        crate::tar::TarError::Unreadable(m) => PyValueError::new_err(m),
    })?;
    let offsets: Vec<u64> = members.iter().map(|m| m.offset).collect();
    let sizes: Vec<u64> = members.iter().map(|m| m.size).collect();
    let names = members.into_iter().map(|m| m.name).collect();
    Ok((names, offsets.into_pyarray(py), sizes.into_pyarray(py)))
}

/// The list columns of a release, in order (`layout::RELEASE_COLUMNS`).
#[pyfunction]
fn release_columns() -> Vec<&'static str> {
    RELEASE_COLUMNS.to_vec()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    add_exceptions(m)?;
    m.add_class::<PyCompiler>()?;
    m.add_class::<PyJsonChunks>()?;
    m.add_class::<PyShardEmitter>()?;
    m.add_function(wrap_pyfunction!(builtin_template, m)?)?;
    m.add_function(wrap_pyfunction!(tar_members, m)?)?;
    m.add_function(wrap_pyfunction!(image_token_count, m)?)?;
    m.add_function(wrap_pyfunction!(video_metadata, m)?)?;
    m.add_function(wrap_pyfunction!(video_token_count, m)?)?;
    m.add_function(wrap_pyfunction!(pack_lengths, m)?)?;
    m.add_function(wrap_pyfunction!(pack_bounds, m)?)?;
    m.add_function(wrap_pyfunction!(fill_templates, m)?)?;
    m.add_function(wrap_pyfunction!(content_keys, m)?)?;
    m.add_function(wrap_pyfunction!(parse_replies, m)?)?;
    m.add_function(wrap_pyfunction!(release_columns, m)?)?;
    m.add_function(wrap_pyfunction!(tokenizer_engine, m)?)?;
    m.add_function(wrap_pyfunction!(encode_texts, m)?)?;
    m.add("BUILTIN_TEMPLATES", render::BUILTINS.to_vec())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
