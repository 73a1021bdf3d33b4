//! The columns that cross the boundary: a string column as Arrow lays it out, and one
//! batch of one source as the flat arrays Python hands over (no copy). Both are checked
//! before any index is taken, so a malformed buffer is an error, never a panic.

use crate::error::{Error, Result};

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
        self.check_str().map_err(|message| Error::internal(format!("{what}: {message}")))
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

    /// Entry `i` as bytes (in range once `check_str` passed).
    pub fn bytes(&self, i: usize) -> &'a [u8] {
        &self.data[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    pub fn get(&self, i: usize) -> std::result::Result<&'a str, String> {
        let (s, e) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        std::str::from_utf8(&self.data[s..e]).map_err(|e| format!("not valid UTF-8 ({e})"))
    }
}

/// One batch of one source, as columns. Sample i has the turns
/// `turn_offsets[i]..turn_offsets[i+1]` (a role and a content each) and the images
/// `image_offsets[i]..image_offsets[i+1]` (a path each):
///
/// ```text
///   rows           [ 7         | 8                   ]   one per sample
///   turn_offsets   [ 0,          2,                  6 ]
///   roles          [ 1    2    | 1    2    1    2    ]   one per turn (1 user, 2 assistant)
///   contents       [ "q"  "a"  | "q"  "a"  "q"  "a"  ]
///   image_offsets  [ 0,          1,                  1 ]
///   images         [ "coco/1.jpg" ]                      one per image (sample 7's)
///   fields[f]      [ "v7"      | "v8"                ]   one per sample, per field
/// ```
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
    /// The bytes of each image where the source holds them in memory (a parquet cell),
    /// one entry per image, empty for an image read from its path; None: no bytes at all.
    pub image_data: Option<StrCol<'a>>,
    /// Extra per-sample fields for instruction templates, in the plan's order.
    pub fields: Vec<StrCol<'a>>,
    /// Per sample, its audio clips (a path each), as `image_offsets` and `images`;
    /// None for a source without audio.
    pub audio: Option<(&'a [i64], StrCol<'a>)>,
    /// Per sample, its video clips, as `audio`; None for a source without video.
    pub video: Option<(&'a [i64], StrCol<'a>)>,
}

fn check_offsets(offsets: &[i64], n: usize, len: usize, what: &str) -> Result<()> {
    let ok = offsets.len() == n + 1 && offsets[0] == 0 && offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[n] as usize == len;
    if ok {
        Ok(())
    } else {
        Err(Error::internal(format!("{what}: malformed offsets passed to the core")))
    }
}

impl Batch<'_> {
    /// Every offset in range and every column of the right length, for a source with
    /// `n_fields` template fields.
    pub fn validate(&self, n_fields: usize) -> Result<()> {
        let n = self.rows.len();
        self.contents.check("batch.contents")?;
        self.images.check("batch.images")?;
        check_offsets(self.turn_offsets, n, self.roles.len(), "batch.turn_offsets")?;
        check_offsets(self.image_offsets, n, self.images.len(), "batch.image_offsets")?;
        if let Some(data) = &self.image_data {
            data.check("batch.image_data")?;
            if data.len() != self.images.len() {
                return Err(Error::internal("batch.image_data: one entry per image expected"));
            }
        }
        if let Some((offsets, paths)) = &self.audio {
            paths.check("batch.audio")?;
            check_offsets(offsets, n, paths.len(), "batch.audio_offsets")?;
        }
        if let Some((offsets, paths)) = &self.video {
            paths.check("batch.video")?;
            check_offsets(offsets, n, paths.len(), "batch.video_offsets")?;
        }
        if self.contents.len() != self.roles.len() {
            return Err(Error::internal("batch.contents: one content per turn expected"));
        }
        if self.fields.len() != n_fields {
            return Err(Error::internal(format!("batch.fields: {n_fields} field columns expected, got {}", self.fields.len())));
        }
        for f in &self.fields {
            f.check("batch.fields")?;
            if f.len() != n {
                return Err(Error::internal("batch.fields: one value per sample expected"));
            }
        }
        Ok(())
    }
}
