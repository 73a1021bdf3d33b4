//! Image token counts. A fixed count (LLaVA-style), or the Qwen2-VL rule computed from the
//! width and height in the file header; pixels are never decoded.
//!
//! Budgets keep hostile input from costing unbounded work: an image takes at most
//! `MAX_IMAGE_TOKENS`, only regular files are opened (a FIFO blocks on open, a device never
//! ends), and the header reader gives up after `HEADER_READ_LIMIT` bytes.

use crate::error::Error;
use crate::plan::ImagePlan;
use crate::render::{Message, Role};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The most tokens one image may take. 16,384 is what the largest `max_pixels` the Qwen2-VL
/// processors use (12,845,056 = 16,384 × 28²) gives; a rule asking for more is a mistake
/// (`count = 10**9` would allocate gigabytes for each sample).
pub const MAX_IMAGE_TOKENS: u64 = 16_384;
/// Bytes the header reader may read from one file. Readers skip segments by seeking, so a
/// real header needs kilobytes (a JPEG with megabytes of metadata before its frame header
/// still reads only a block per segment); a file whose segments lead on and on fails here.
pub const HEADER_READ_LIMIT: u64 = 16 << 20;

/// A sample whose text has no image placeholder gets one per image at the start of its
/// first user turn (the LLaVA convention); text that already places them is left alone.
pub fn place_images(messages: &mut [Message], placeholder: &str, count: usize) -> Result<(), String> {
    if count == 0 || messages.iter().any(|m| m.content.contains(placeholder)) {
        return Ok(());
    }
    let first_user = messages
        .iter_mut()
        .find(|m| m.role == Role::User)
        .ok_or_else(|| "the sample has images but no user turn to put them in".to_string())?;
    first_user.content.insert_str(0, &(placeholder.repeat(count) + "\n"));
    Ok(())
}

/// Qwen2-VL `smart_resize`: the (height, width) an image is resized to, multiples of
/// `factor` = patch × merge, with the pixel count kept within [min_pixels, max_pixels].
pub fn smart_resize(height: u64, width: u64, factor: u64, min_pixels: u64, max_pixels: u64) -> (u64, u64) {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    // Python's round() rounds half to even; match it exactly.
    let mut h_bar = ((h / f).round_ties_even() * f).max(f);
    let mut w_bar = ((w / f).round_ties_even() * f).max(f);
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = ((h / beta / f).floor() * f).max(f);
        w_bar = ((w / beta / f).floor() * f).max(f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    (h_bar as u64, w_bar as u64)
}

/// Image tokens for an image of the given size under the plan's dynamic rule, saturating
/// (a patch or merge of 0 counts as 1: `check_plan` refuses them).
pub fn dynamic_tokens(plan: &ImagePlan, width: u64, height: u64) -> u64 {
    let (patch, merge) = (plan.patch.max(1) as u64, plan.merge.max(1) as u64);
    let (h, w) = smart_resize(height, width, patch.saturating_mul(merge), plan.min_pixels, plan.max_pixels);
    (h / patch).saturating_mul(w / patch) / merge.saturating_mul(merge)
}

/// `dynamic_tokens` as a u32 (saturating), for the Python helper.
pub fn dynamic_count(plan: &ImagePlan, width: u64, height: u64) -> u32 {
    dynamic_tokens(plan, width, height).min(u32::MAX as u64) as u32
}

/// What the plan's rule can never allow, refused before any image is read: a fixed count,
/// or a `min_pixels` that every image reaches, above `MAX_IMAGE_TOKENS`; a `max_pixels`
/// that lets images above it; patch or merge of 0; `min_pixels` above `max_pixels`.
pub fn check_plan(plan: &ImagePlan) -> crate::error::Result<()> {
    let over = |what: &str, tokens: u64| {
        format!("{what} gives {tokens} tokens per image, more than the {MAX_IMAGE_TOKENS} an image may take")
    };
    if let Some(count) = plan.count {
        if count as u64 > MAX_IMAGE_TOKENS {
            return Err(Error::plan("model.image.count", over(&format!("count = {count}"), count as u64)));
        }
        return Ok(());
    }
    if plan.patch == 0 || plan.merge == 0 {
        return Err(Error::plan("model.image", "patch and merge must be at least 1"));
    }
    if plan.min_pixels > plan.max_pixels {
        return Err(Error::plan(
            "model.image.min_pixels",
            format!("{} is above max_pixels = {}", plan.min_pixels, plan.max_pixels),
        ));
    }
    let per_token = (plan.patch as u64 * plan.merge as u64).saturating_pow(2);
    for (key, pixels) in [("min_pixels", plan.min_pixels), ("max_pixels", plan.max_pixels)] {
        let tokens = pixels / per_token;
        if tokens > MAX_IMAGE_TOKENS {
            let what = format!("{key} = {pixels} (patch {}, merge {})", plan.patch, plan.merge);
            return Err(Error::plan(format!("model.image.{key}"), over(&what, tokens)));
        }
    }
    Ok(())
}

/// What a release records of one image: its tokens, and under the grid rule its patch
/// grid (t, h, w) before merging, of the image upright (EXIF orientation applied, as the
/// loader and the models' processors open it); `[0, 0, 0]` under a fixed count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub tokens: u32,
    pub grid: [u32; 3],
}

/// Tokens for one image: the fixed count, or the dynamic count from its header; more than
/// `MAX_IMAGE_TOKENS` is an error naming the image and the rule.
pub fn image_tokens(plan: &ImagePlan, path: &Path) -> std::result::Result<u32, String> {
    image_info(plan, path).map(|i| i.tokens)
}

/// The tokens and grid of one image, from its header (and its EXIF orientation under the
/// grid rule).
pub fn image_info(plan: &ImagePlan, path: &Path) -> std::result::Result<ImageInfo, String> {
    image_info_in(plan, path, None)
}

/// `image_info` of the image `path` names (a file, or a container reference: see
/// `open_image`), read from `bytes` where the caller holds them (a parquet cell).
pub fn image_info_in(plan: &ImagePlan, path: &Path, bytes: Option<&[u8]>) -> std::result::Result<ImageInfo, String> {
    // The header is read even for a fixed count: a missing or broken image is caught here,
    // with its source and row, not by the training job.
    let (width, height) = image_size_in(path, bytes)?;
    if width == 0 || height == 0 {
        return Err(format!("image {} has zero size", path.display()));
    }
    let tokens = tokens_for(plan, width, height).map_err(|m| format!("image {}: {m}", path.display()))?;
    if plan.count.is_some() {
        return Ok(ImageInfo { tokens, grid: [0; 3] });
    }
    // A quarter turn swaps the sides: the same token count, the grid transposed.
    let (width, height) = if quarter_turned_in(path, bytes) { (height, width) } else { (width, height) };
    Ok(ImageInfo { tokens, grid: grid_for(plan, width, height) })
}

/// The grid rule's (t, h, w) patch grid for an upright image of the given size.
pub fn grid_for(plan: &ImagePlan, width: u64, height: u64) -> [u32; 3] {
    let (patch, merge) = (plan.patch.max(1) as u64, plan.merge.max(1) as u64);
    let (h, w) = smart_resize(height, width, patch.saturating_mul(merge), plan.min_pixels, plan.max_pixels);
    let side = |v: u64| (v / patch).min(u32::MAX as u64) as u32;
    [1, side(h), side(w)]
}

/// Whether the image's EXIF orientation turns it by 90° (orientations 5–8), read from the
/// EXIF block of a JPEG, PNG (`eXIf`), WebP (`EXIF`) or TIFF file. An unreadable or absent
/// block means upright, as PIL's `exif_transpose` treats it.
pub fn quarter_turned(path: &Path) -> bool {
    quarter_turned_in(path, None)
}

fn quarter_turned_in(path: &Path, bytes: Option<&[u8]>) -> bool {
    let Ok(file) = open_image(path, bytes) else { return false };
    let mut reader = BufReader::new(Budget::new(file, HEADER_READ_LIMIT, "image header"));
    let raw = match exif_block(&mut reader) {
        Some(raw) => exif::Reader::new().read_raw(raw).ok(),
        None => {
            let _ = reader.seek(SeekFrom::Start(0));
            exif::Reader::new().read_from_container(&mut reader).ok()
        }
    };
    let orientation = raw.and_then(|e| e.get_field(exif::Tag::Orientation, exif::In::PRIMARY).and_then(|f| f.value.get_uint(0)));
    matches!(orientation, Some(5..=8))
}

/// The EXIF block of a PNG or WebP file, found by seeking from chunk to chunk (the block
/// may follow the image data, and the library's reader reads through it); None for other
/// formats, which the library reads without going through the pixels.
fn exif_block<R: Read + Seek>(r: &mut R) -> Option<Vec<u8>> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head).ok()?;
    let (png, webp) = (head.starts_with(b"\x89PNG\r\n\x1a\n"), &head[0..4] == b"RIFF" && &head[8..12] == b"WEBP");
    if !png && !webp {
        return None;
    }
    r.seek(SeekFrom::Start(if png { 8 } else { 12 })).ok()?;
    let mut chunk = [0u8; 8];
    while r.read_exact(&mut chunk).is_ok() {
        let (len, kind) = if png {
            (u32::from_be_bytes(chunk[0..4].try_into().unwrap()) as u64, &chunk[4..8])
        } else {
            (u32::from_le_bytes(chunk[4..8].try_into().unwrap()) as u64, &chunk[0..4])
        };
        if kind == b"eXIf" || kind == b"EXIF" {
            let mut data = vec![0u8; len.min(1 << 20) as usize];
            r.read_exact(&mut data).ok()?;
            // Some WebP writers keep JPEG's "Exif\0\0" prefix before the TIFF header.
            let start = if data.starts_with(b"Exif\0\0") { 6 } else { 0 };
            return Some(data.split_off(start));
        }
        if kind == b"IEND" {
            break;
        }
        let skip = if png { len + 4 } else { len + (len & 1) }; // PNG: the CRC; WebP: padding
        r.seek(SeekFrom::Current(skip as i64)).ok()?;
    }
    Some(Vec::new())
}

/// Tokens for an image of the given size, or why the rule gives too many.
pub fn tokens_for(plan: &ImagePlan, width: u64, height: u64) -> std::result::Result<u32, String> {
    let (tokens, rule) = match plan.count {
        Some(count) => (count as u64, format!("count = {count}")),
        None => (
            dynamic_tokens(plan, width, height),
            format!(
                "its size {width}×{height} under min_pixels = {}, max_pixels = {} (patch {}, merge {})",
                plan.min_pixels, plan.max_pixels, plan.patch, plan.merge
            ),
        ),
    };
    if tokens > MAX_IMAGE_TOKENS {
        return Err(format!("{rule} gives {tokens} tokens, more than the {MAX_IMAGE_TOKENS} an image may take"));
    }
    Ok(tokens as u32)
}

/// (width, height) from the file's header. Only a regular file is opened, and at most
/// `HEADER_READ_LIMIT` bytes are read.
pub fn image_size(path: &Path) -> std::result::Result<(u64, u64), String> {
    image_size_in(path, None)
}

/// `image_size` of the image `path` names, read from `bytes` where given.
pub fn image_size_in(path: &Path, bytes: Option<&[u8]>) -> std::result::Result<(u64, u64), String> {
    let cannot = |e: std::io::Error| format!("cannot read image {}: {e}", path.display());
    let reader = BufReader::new(Budget::new(open_image(path, bytes)?, HEADER_READ_LIMIT, "image header"));
    header_size(reader).map_err(|e| match e {
        imagesize::ImageError::IoError(io) => cannot(io),
        other => format!("cannot read the size of image {}: {other}", path.display()),
    })
}

/// A readable, seekable image.
pub trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// The image `path` names, to read: `bytes` where the caller holds them; else, for a
/// container reference (the grammar is python/mmrecipe/imageref.py's), the member:
/// `CONTAINER#offset=N,size=N` is that byte range of the container file (a tar member),
/// read in place; `CONTAINER#rg=N,row=N,col=NAME` is a parquet cell, whose bytes come
/// with the batch; else the file itself. Only regular files are opened.
pub fn open_image<'a>(path: &Path, bytes: Option<&'a [u8]>) -> std::result::Result<Box<dyn ReadSeek + 'a>, String> {
    if let Some(bytes) = bytes {
        return Ok(Box::new(std::io::Cursor::new(bytes)));
    }
    let text = path.to_str().unwrap_or_default();
    if let Some((container, offset, size)) = parse_range(text) {
        let file = Path::new(container);
        let len = regular_file(file)?;
        let end = offset.saturating_add(size);
        if end > len {
            return Err(format!(
                "cannot read image {}: the container is truncated ({} bytes, the member ends at byte {end})",
                path.display(),
                len
            ));
        }
        let cannot = |e: std::io::Error| format!("cannot read image {}: {e}", path.display());
        let mut f = File::open(file).map_err(cannot)?;
        f.seek(SeekFrom::Start(offset)).map_err(cannot)?;
        return Ok(Box::new(Window { inner: f, start: offset, len: size, pos: 0 }));
    }
    if is_cell(text) {
        // The reader hands over every parquet cell's bytes with the batch: none means none.
        return Err(format!("cannot read image {}: the parquet cell holds no image bytes (null or empty)", path.display()));
    }
    regular_file(path)?;
    Ok(Box::new(File::open(path).map_err(|e| format!("cannot read image {}: {e}", path.display()))?))
}

/// The length of a regular file (a FIFO blocks on open, a device never ends).
fn regular_file(path: &Path) -> std::result::Result<u64, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read image {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("cannot read image {}: not a regular file", path.display()));
    }
    Ok(meta.len())
}

/// A canonical decimal ("0" or no leading zero).
fn decimal(s: &str) -> Option<u64> {
    let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if ok {
        s.parse().ok()
    } else {
        None
    }
}

/// `CONTAINER#offset=N,size=N` as (container, offset, size).
pub fn parse_range(text: &str) -> Option<(&str, u64, u64)> {
    let (container, member) = text.rsplit_once('#')?;
    let (offset, size) = member.strip_prefix("offset=")?.split_once(",size=")?;
    Some((container, decimal(offset)?, decimal(size)?))
}

/// Whether `text` is a parquet cell reference, `CONTAINER#rg=N,row=N,col=NAME`.
pub fn is_cell(text: &str) -> bool {
    let Some((_, member)) = text.rsplit_once('#') else { return false };
    let Some(rest) = member.strip_prefix("rg=") else { return false };
    let Some((rg, rest)) = rest.split_once(",row=") else { return false };
    let Some((row, col)) = rest.split_once(",col=") else { return false };
    let name_ok = !col.is_empty() && col.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~%-".contains(&b));
    decimal(rg).is_some() && decimal(row).is_some() && name_ok
}

/// Bytes [start, start + len) of a reader, seen as a stream of their own.
struct Window<R> {
    inner: R,
    start: u64,
    len: u64,
    pos: u64,
}

impl<R: Read> Read for Window<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(self.len.saturating_sub(self.pos).min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for Window<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        }
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start of the member"))?;
        self.inner.seek(SeekFrom::Start(self.start.saturating_add(target)))?;
        self.pos = target;
        Ok(target)
    }
}

/// (width, height) from a header read through `reader`.
pub fn header_size<R: std::io::BufRead + Seek>(reader: R) -> imagesize::ImageResult<(u64, u64)> {
    let size = imagesize::reader_size(reader)?;
    Ok((size.width as u64, size.height as u64))
}

/// A reader that fails once it has read `limit` bytes, naming `what` it was looking for:
/// every header reader (images, audio, video) reads through one.
pub(crate) struct Budget<R> {
    pub inner: R,
    left: u64,
    limit: u64,
    what: &'static str,
}

impl<R> Budget<R> {
    pub fn new(inner: R, limit: u64, what: &'static str) -> Self {
        Budget { inner, left: limit, limit, what }
    }
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other(format!("no {} found in the first {} MiB read", self.what, self.limit >> 20)));
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for Budget<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(to)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The shared header budget: reads stop at the limit with an error naming what was
    /// looked for; seeking past data costs nothing.
    #[test]
    fn the_read_budget_stops_at_its_limit() {
        let mut b = Budget::new(std::io::Cursor::new(vec![7u8; 5 << 20]), 2 << 20, "video metadata");
        b.seek(SeekFrom::Start(1 << 20)).unwrap();
        let mut buf = vec![0u8; 3 << 20];
        assert_eq!(b.read(&mut buf).unwrap(), 2 << 20, "a read is cut at the budget");
        let err = b.read(&mut buf).unwrap_err().to_string();
        assert_eq!(err, "no video metadata found in the first 2 MiB read");
    }

    #[test]
    fn smart_resize_matches_qwen2_vl_examples() {
        // Values from the Qwen2-VL processor with patch 14, merge 2 (factor 28).
        assert_eq!(smart_resize(224, 224, 28, 56 * 56, 28 * 28 * 1280), (224, 224));
        assert_eq!(smart_resize(100, 300, 28, 56 * 56, 28 * 28 * 1280), (112, 308));
        let (h, w) = smart_resize(4000, 3000, 28, 56 * 56, 28 * 28 * 1280);
        assert!(h * w <= 28 * 28 * 1280 && h % 28 == 0 && w % 28 == 0);
        let (h, w) = smart_resize(10, 10, 28, 56 * 56, 28 * 28 * 1280);
        assert!(h * w >= 56 * 56);
    }

    fn plan(extra: &str) -> ImagePlan {
        serde_json::from_str(&format!(r#"{{"placeholder":"<image>","token":"<image>"{extra}}}"#)).unwrap()
    }

    /// A file holding `bytes`, removed on drop (the audio tests use it too).
    pub(crate) struct Temp(pub(crate) std::path::PathBuf);

    impl Temp {
        pub(crate) fn new(name: &str, bytes: &[u8]) -> Temp {
            let path = std::env::temp_dir().join(format!("mmrecipe-media-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            Temp(path)
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        b.extend(width.to_be_bytes());
        b.extend(height.to_be_bytes());
        b.extend([8, 2, 0, 0, 0, 0, 0, 0, 0]);
        b
    }

    /// A TIFF-layout EXIF block holding one Orientation entry.
    fn exif_orientation(value: u16) -> Vec<u8> {
        let mut b = b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
        b.extend(value.to_be_bytes());
        b.extend([0, 0, 0, 0, 0, 0]);
        b
    }

    fn png_chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut b = (data.len() as u32).to_be_bytes().to_vec();
        b.extend(kind);
        b.extend(data);
        b.extend([0, 0, 0, 0]); // the CRC: not checked
        b
    }

    #[test]
    fn a_quarter_turn_transposes_the_grid_wherever_the_exif_block_lies() {
        let grid = plan(r#","patch":14,"merge":2,"min_pixels":3136,"max_pixels":50176"#);
        for (orientation, turned) in [(1, false), (3, false), (5, true), (6, true), (8, true)] {
            // 300 wide, 120 high, with the EXIF block after the image data.
            let mut bytes = png(300, 120);
            bytes.extend(png_chunk(b"IDAT", &[0; 40]));
            bytes.extend(png_chunk(b"eXIf", &exif_orientation(orientation)));
            bytes.extend(png_chunk(b"IEND", &[]));
            let file = Temp::new(&format!("turned-{orientation}.png"), &bytes);
            assert_eq!(quarter_turned(&file.0), turned, "orientation {orientation}");
            let info = image_info(&grid, &file.0).unwrap();
            let upright = if turned { grid_for(&grid, 120, 300) } else { grid_for(&grid, 300, 120) };
            assert_eq!(info.grid, upright);
            assert_ne!(grid_for(&grid, 120, 300), grid_for(&grid, 300, 120));
            assert_eq!(info.tokens, info.grid.iter().product::<u32>() / 4, "a turn keeps the token count");
            let fixed = image_info(&plan(r#","count":9"#), &file.0).unwrap();
            assert_eq!((fixed.tokens, fixed.grid), (9, [0, 0, 0]));
        }
        // No EXIF block, or a broken one: upright.
        let plain = Temp::new("plain.png", &png(300, 120));
        assert!(!quarter_turned(&plain.0));
        let mut broken = png(300, 120);
        broken.extend(png_chunk(b"eXIf", b"MM\0*garbage"));
        let broken = Temp::new("broken-exif.png", &broken);
        assert!(!quarter_turned(&broken.0));
    }

    #[test]
    fn container_members_are_read_in_place() {
        // A container holding junk, a 300×120 PNG, junk: the reference names the PNG's bytes.
        let image = png(300, 120);
        let mut bytes = vec![7u8; 1536];
        bytes.extend(&image);
        bytes.extend([9u8; 700]);
        let file = Temp::new("shard.tar", &bytes);
        let at = |offset: usize, size: usize| std::path::PathBuf::from(format!("{}#offset={offset},size={size}", file.0.display()));
        assert_eq!(image_size(&at(1536, image.len())), Ok((300, 120)));
        let grid = plan(r#","patch":14,"merge":2,"min_pixels":3136,"max_pixels":50176"#);
        assert_eq!(image_info(&grid, &at(1536, image.len())).unwrap().grid, grid_for(&grid, 300, 120));
        // The member's window: a reference to the junk is not an image.
        assert!(image_size(&at(0, 1536)).unwrap_err().contains("cannot read the size of image"));
        // A member past the end of the file: the container is truncated.
        let e = image_size(&at(1536, bytes.len())).unwrap_err();
        assert!(e.contains("the container is truncated"), "{e}");
        // Not canonical decimals: a plain (missing) file name, not a reference.
        assert_eq!(parse_range("a.tar#offset=01,size=2"), None);
        assert_eq!(parse_range("a#b.tar#offset=0,size=2"), Some(("a#b.tar", 0, 2)));
        // A parquet cell comes with its bytes; without them it has none.
        assert!(is_cell("x.parquet#rg=0,row=12,col=image") && !is_cell("x.parquet#rg=0,row=12,col="));
        let cell = Path::new("x.parquet#rg=0,row=3,col=image");
        assert!(image_size(cell).unwrap_err().contains("the parquet cell holds no image bytes"));
        assert_eq!(image_size_in(cell, Some(&image)), Ok((300, 120)));
        assert!(image_size_in(cell, Some(b"not an image")).unwrap_err().contains("x.parquet#rg=0,row=3,col=image"));
    }

    #[test]
    fn dynamic_count_of_224_square_is_64() {
        let plan: ImagePlan = serde_json::from_str(r#"{"placeholder":"<image>","token":"<image>"}"#).unwrap();
        assert_eq!(dynamic_count(&plan, 224, 224), 64);
    }

    #[test]
    fn token_budgets_are_errors_naming_the_rule() {
        let image = Temp::new("small.png", &png(224, 224));
        assert_eq!(image_tokens(&plan(""), &image.0), Ok(64));
        assert_eq!(image_tokens(&plan(r#","count":576"#), &image.0), Ok(576));

        let huge = plan(r#","count":1000000000"#);
        let e = check_plan(&huge).unwrap_err();
        assert_eq!(
            e.to_string(),
            "model.image.count: count = 1000000000 gives 1000000000 tokens per image, more than the 16384 an image may take"
        );
        let e = image_tokens(&huge, &image.0).unwrap_err();
        assert!(e.contains("small.png: count = 1000000000 gives 1000000000 tokens, more than the 16384"), "{e}");

        let greedy = plan(r#","min_pixels":1000000000000,"max_pixels":1000000000000"#);
        assert!(check_plan(&greedy)
            .unwrap_err()
            .to_string()
            .starts_with("model.image.min_pixels: min_pixels = 1000000000000 (patch 14, merge 2) gives 1275510204 tokens"));
        let e = image_tokens(&greedy, &image.0).unwrap_err();
        assert!(e.contains("its size 224×224 under min_pixels = 1000000000000"), "{e}");

        assert!(check_plan(&plan(r#","max_pixels":1000000000"#)).unwrap_err().to_string().starts_with("model.image.max_pixels"));
        assert!(check_plan(&plan(r#","patch":0"#)).is_err());
        assert!(check_plan(&plan(r#","min_pixels":5000,"max_pixels":4000"#)).is_err());
        assert!(check_plan(&plan(r#","max_pixels":12845056"#)).is_ok()); // Qwen2-VL's largest: exactly the limit
        assert!(check_plan(&plan("")).is_ok());

        // A long thin image under an allowed rule can still ask for too much.
        let thin = Temp::new("thin.png", &png(4_000_000, 1));
        let e = image_tokens(&plan(""), &thin.0).unwrap_err();
        assert!(e.contains("thin.png: its size 4000000×1"), "{e}");
    }

    #[test]
    fn counts_never_overflow_or_divide_by_zero() {
        let odd = plan(r#","patch":0,"merge":0,"min_pixels":18446744073709551615,"max_pixels":18446744073709551615"#);
        for (w, h) in [(0, 0), (1, u64::MAX), (u64::MAX, u64::MAX), (7, 3)] {
            let _ = dynamic_tokens(&odd, w, h);
            let _ = dynamic_count(&plan(""), w, h);
        }
    }

    #[test]
    fn only_regular_files_are_read() {
        assert!(image_size(Path::new("/dev/zero")).unwrap_err().ends_with("/dev/zero: not a regular file"));
        assert!(image_size(&std::env::temp_dir()).unwrap_err().contains("not a regular file"));
        let fifo = std::env::temp_dir().join(format!("mmrecipe-media-{}-fifo", std::process::id()));
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().map(|s| s.success()).unwrap_or(false);
        if made {
            // Opening a FIFO for reading would block until a writer comes.
            assert!(image_size(&fifo).unwrap_err().contains("not a regular file"));
            std::fs::remove_file(&fifo).unwrap();
        }
        assert!(image_size(Path::new("/nonexistent/x.png")).unwrap_err().starts_with("cannot read image /nonexistent/x.png: "));
    }

    #[test]
    fn header_reading_is_bounded() {
        // A JPEG whose segments never reach a frame header: each tiny segment costs a block
        // read, so the reader stops at the byte budget rather than walking the whole file.
        let mut endless = b"\xFF\xD8".to_vec();
        for _ in 0..(1 << 18) {
            endless.extend(b"\xFF\xE1\x00\x02");
        }
        let file = Temp::new("endless.jpg", &endless);
        let e = image_size(&file.0).unwrap_err();
        assert!(e.contains("no image header found in the first 16 MiB read"), "{e}");
        // Megabytes of metadata in few segments are fine: skipped by seeking.
        let mut big = b"\xFF\xD8".to_vec();
        for _ in 0..64 {
            big.extend(b"\xFF\xE2\xFF\xFF");
            big.extend(std::iter::repeat_n(0u8, 0xFFFF - 2));
        }
        big.extend(b"\xFF\xC0\x00\x11\x08\x01\x2C\x02\x58");
        let file = Temp::new("big.jpg", &big);
        assert_eq!(image_size(&file.0), Ok((600, 300)));
    }
}
