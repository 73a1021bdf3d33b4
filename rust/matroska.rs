//! Video metadata of Matroska and WebM files from their EBML elements: the segment's
//! duration and timestamp scale, the first video track's default frame duration and pixel
//! size. The frames themselves (clusters) are skipped by seeking, never read.
//!
//! Matroska keeps no frame count. FFmpeg (so PyAV) gives such a track 0 frames, an
//! average rate of 1e9 / DefaultDuration reduced to terms of at most 30000, and the file
//! a duration in microseconds; the count is the duration times that rate, rounded (the
//! loader samples from this count too, `loader/video.py`), and `tests/test_video.py`
//! checks it against the frames PyAV decodes.
//!
//! Why our own reader: the Matroska crates on crates.io either demux (read every block,
//! which a read budget cannot allow for a long clip) or parse the whole file into memory;
//! what a token count needs is eight elements, each a length-prefixed value.

use std::io::{Read, Seek, SeekFrom};

use crate::video::Header;

const EBML: u32 = 0x1A45_DFA3;
const DOC_TYPE: u32 = 0x4282;
const SEGMENT: u32 = 0x1853_8067;
const INFO: u32 = 0x1549_A966;
const TIMESTAMP_SCALE: u32 = 0x2A_D7B1;
const DURATION: u32 = 0x4489;
const TRACKS: u32 = 0x1654_AE6B;
const TRACK_ENTRY: u32 = 0xAE;
const TRACK_TYPE: u32 = 0x83;
const DEFAULT_DURATION: u32 = 0x23_E383;
const VIDEO: u32 = 0xE0;
const PIXEL_WIDTH: u32 = 0xB0;
const PIXEL_HEIGHT: u32 = 0xBA;
const PROJECTION: u32 = 0x7670;
const PROJECTION_POSE_ROLL: u32 = 0x7675;
/// A track of this type is video.
const VIDEO_TRACK: u64 = 1;
/// FFmpeg's bound on the terms of a Matroska track's average frame rate.
const RATE_TERMS: u64 = 30_000;

/// Whether `head` (a file's first bytes) starts an EBML document.
pub fn is_matroska(head: &[u8]) -> bool {
    head.len() >= 4 && u32::from_be_bytes(head[..4].try_into().unwrap()) == EBML
}

type Miss<T> = std::result::Result<T, String>;

/// An element's id, the offset its data starts at and its size (None: unknown, to the
/// end of its parent).
struct Element {
    id: u32,
    start: u64,
    size: Option<u64>,
}

impl Element {
    /// Where its data ends (at its start when its size is unknown: its children unread).
    fn end(&self) -> u64 {
        self.start + self.size.unwrap_or(0)
    }
}

struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn byte(&mut self) -> Miss<u8> {
        let mut b = [0u8; 1];
        self.inner.read_exact(&mut b).map_err(|e| format!("the file ends inside an element header ({e})"))?;
        self.pos += 1;
        Ok(b[0])
    }

    /// A variable-length integer of at most `most` bytes, its length marker kept: (the
    /// value, its length). An element id is one as it stands; a size drops the marker.
    fn coded(&mut self, most: u32, what: &str) -> Miss<(u64, u32)> {
        let first = self.byte()?;
        let len = first.leading_zeros() + 1;
        if len > most {
            return Err(format!("an element {what} of no valid length"));
        }
        let mut v = first as u64;
        for _ in 1..len {
            v = (v << 8) | self.byte()? as u64;
        }
        Ok((v, len))
    }

    fn element(&mut self) -> Miss<Element> {
        let id = self.coded(4, "id")?.0 as u32;
        let (coded, n) = self.coded(8, "header")?;
        let size = coded & !(1u64 << (7 * n)); // the marker bit dropped
        let unknown = size == (1u64 << (7 * n)) - 1; // all ones: to the end of the parent
        let start = self.pos;
        if !unknown && start.checked_add(size).is_none_or(|end| end > self.len) {
            return Err(format!("an element (id {id:#x}) runs past the end of the file"));
        }
        Ok(Element { id, start, size: (!unknown).then_some(size) })
    }

    fn skip_to(&mut self, at: u64) -> Miss<()> {
        self.inner.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
        self.pos = at;
        Ok(())
    }

    fn bytes(&mut self, e: &Element, most: u64) -> Miss<Vec<u8>> {
        let n = e.size.unwrap_or(0);
        if n > most {
            return Err(format!("element {:#x} holds {n} bytes, more than its {most}", e.id));
        }
        let mut v = vec![0u8; n as usize];
        self.inner.read_exact(&mut v).map_err(|err| err.to_string())?;
        self.pos += n;
        Ok(v)
    }

    fn uint(&mut self, e: &Element) -> Miss<u64> {
        Ok(self.bytes(e, 8)?.iter().fold(0u64, |v, &b| (v << 8) | b as u64))
    }

    fn float(&mut self, e: &Element) -> Miss<f64> {
        let b = self.bytes(e, 8)?;
        match b.len() {
            0 => Ok(0.0),
            4 => Ok(f32::from_be_bytes(b[..].try_into().unwrap()) as f64),
            8 => Ok(f64::from_be_bytes(b[..].try_into().unwrap())),
            n => Err(format!("a float of {n} bytes")),
        }
    }

    /// The children of the element ending at `end`, each handed to `each` (which reads
    /// it or leaves it, to be skipped); stops early when `each` says so.
    fn children(&mut self, end: u64, mut each: impl FnMut(&mut Self, &Element) -> Miss<bool>) -> Miss<()> {
        while self.pos < end {
            let e = self.element()?;
            let Some(size) = e.size else {
                // Only a segment or cluster may be of unknown size; nothing past one is read.
                each(self, &e)?;
                return Ok(());
            };
            if !each(self, &e)? {
                return Ok(());
            }
            self.skip_to(e.start + size)?;
        }
        Ok(())
    }
}

/// The video track's metadata: `inner` a Matroska or WebM file of `len` bytes.
pub fn read_header<R: Read + Seek>(inner: R, len: u64) -> Miss<Header> {
    let mut r = Reader { inner, pos: 0, len };
    let head = r.element()?;
    if head.id != EBML {
        return Err("not a Matroska or WebM file".into());
    }
    let mut doc = String::new();
    r.children(head.end(), |r, e| {
        if e.id == DOC_TYPE {
            doc = String::from_utf8_lossy(&r.bytes(e, 64)?).trim_end_matches('\0').to_string();
        }
        Ok(true)
    })?;
    if doc != "matroska" && doc != "webm" {
        return Err(format!("an EBML document of type {doc:?}, not Matroska or WebM"));
    }
    let segment = r.element()?;
    if segment.id != SEGMENT {
        return Err("no segment after the EBML header".into());
    }
    let end = segment.size.map_or(len, |s| segment.start + s);
    let (mut scale, mut duration) = (1_000_000u64, None::<f64>);
    let mut track: Option<Track> = None;
    let (mut info, mut tracks) = (false, false);
    r.children(end, |r, e| {
        match e.id {
            INFO => {
                info = true;
                r.children(e.end(), |r, f| {
                    match f.id {
                        TIMESTAMP_SCALE => scale = r.uint(f)?,
                        DURATION => duration = Some(r.float(f)?),
                        _ => {}
                    }
                    Ok(true)
                })?;
            }
            TRACKS => {
                tracks = true;
                r.children(e.end(), |r, t| {
                    if t.id == TRACK_ENTRY && track.is_none() {
                        track = video_track(r, t.end())?;
                    }
                    Ok(true)
                })?;
            }
            _ => {}
        }
        Ok(!(info && tracks))
    })?;
    let Track { default_duration, width, height, roll } = track.ok_or("no video track")?;
    if default_duration == 0 {
        return Err("the video track states no frame duration (DefaultDuration), so no frame rate".into());
    }
    let duration = duration.filter(|d| d.is_finite() && *d > 0.0).ok_or("the segment states no duration")?;
    let rate = bounded_ratio(1_000_000_000, default_duration, RATE_TERMS);
    // FFmpeg's file duration: microseconds, truncated.
    let micros = (duration * scale as f64 * 1000.0 / 1_000_000.0) as i64;
    let fps = rate.0 as f64 / rate.1 as f64;
    let frames = (micros as f64 / 1_000_000.0 * fps + 0.5).floor();
    if !(frames >= 1.0) {
        return Err(format!("a duration of {micros} µs at {fps:.3} fps holds no frame"));
    }
    // FFmpeg turns the picture by the projection's roll (its display matrix).
    let quarter_turned = (roll / 90.0).round().rem_euclid(2.0) == 1.0;
    Ok(Header { frames: frames as u64, rate, width, height, quarter_turned })
}

/// What a video track entry states.
struct Track {
    default_duration: u64,
    width: u64,
    height: u64,
    /// ProjectionPoseRoll, degrees.
    roll: f64,
}

/// The track entry ending at `end`, when it is video.
fn video_track<R: Read + Seek>(r: &mut Reader<R>, end: u64) -> Miss<Option<Track>> {
    let mut kind = 0u64;
    let mut track = Track { default_duration: 0, width: 0, height: 0, roll: 0.0 };
    r.children(end, |r, e| {
        match e.id {
            TRACK_TYPE => kind = r.uint(e)?,
            DEFAULT_DURATION => track.default_duration = r.uint(e)?,
            VIDEO => r.children(e.end(), |r, v| {
                match v.id {
                    PIXEL_WIDTH => track.width = r.uint(v)?,
                    PIXEL_HEIGHT => track.height = r.uint(v)?,
                    PROJECTION => r.children(v.end(), |r, p| {
                        if p.id == PROJECTION_POSE_ROLL {
                            track.roll = r.float(p)?;
                        }
                        Ok(true)
                    })?,
                    _ => {}
                }
                Ok(true)
            })?,
            _ => {}
        }
        Ok(true)
    })?;
    Ok((kind == VIDEO_TRACK).then_some(track))
}

/// `num / den` as the nearest fraction whose terms are at most `most`: the last continued
/// fraction convergent within the bound, or the semiconvergent past it where that is
/// nearer (how FFmpeg reduces a rate).
fn bounded_ratio(num: u64, den: u64, most: u64) -> (u64, u64) {
    let g = gcd(num, den).max(1);
    let (mut n, mut d) = ((num / g) as u128, (den / g) as u128);
    let most = most as u128;
    if n <= most && d <= most {
        return (n as u64, d as u64);
    }
    // (p0/q0, p1/q1): the two latest convergents.
    let (mut p0, mut q0, mut p1, mut q1) = (0u128, 1u128, 1u128, 0u128);
    while d != 0 {
        let a = n / d;
        let (p2, q2) = (a * p1 + p0, a * q1 + q0);
        if p2 > most || q2 > most {
            let mut x = a;
            if p1 != 0 {
                x = (most - p0) / p1;
            }
            if q1 != 0 {
                x = x.min((most - q0) / q1);
            }
            if d * (2 * x * q1 + q0) > n * q1 {
                (p1, q1) = (x * p1 + p0, x * q1 + q0);
            }
            break;
        }
        (p0, q0, p1, q1) = (p1, q1, p2, q2);
        (n, d) = (d, n - a * d);
    }
    (p1 as u64, q1 as u64)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn el(id: u32, body: &[u8]) -> Vec<u8> {
        let mut v = id.to_be_bytes().iter().copied().skip_while(|&b| b == 0).collect::<Vec<u8>>();
        v.push(0x01); // an 8-byte size: the marker, then 7 bytes
        v.extend_from_slice(&(body.len() as u64).to_be_bytes()[1..]);
        v.extend_from_slice(body);
        v
    }

    fn uint(id: u32, v: u64) -> Vec<u8> {
        el(id, &v.to_be_bytes())
    }

    fn file(doc: &str, duration: f64, default_duration: u64, clusters: usize) -> Vec<u8> {
        rolled(doc, duration, default_duration, clusters, None)
    }

    fn rolled(doc: &str, duration: f64, default_duration: u64, clusters: usize, roll: Option<f64>) -> Vec<u8> {
        let mut v = el(EBML, &el(DOC_TYPE, doc.as_bytes()));
        let info = [uint(TIMESTAMP_SCALE, 1_000_000), el(DURATION, &duration.to_be_bytes())].concat();
        let audio = el(TRACK_ENTRY, &uint(TRACK_TYPE, 2));
        let video = el(
            TRACK_ENTRY,
            &[
                uint(TRACK_TYPE, 1),
                uint(DEFAULT_DURATION, default_duration),
                el(
                    VIDEO,
                    &[
                        uint(PIXEL_WIDTH, 64),
                        uint(PIXEL_HEIGHT, 48),
                        roll.map(|r| el(PROJECTION, &el(PROJECTION_POSE_ROLL, &r.to_be_bytes()))).unwrap_or_default(),
                    ]
                    .concat(),
                ),
            ]
            .concat(),
        );
        let mut seg = vec![0u8; 0];
        for _ in 0..clusters {
            seg.extend(el(0x1F43_B675, &[0u8; 100]));
        }
        seg.extend(el(INFO, &info));
        seg.extend(el(TRACKS, &[audio, video].concat()));
        v.extend(el(SEGMENT, &seg));
        v
    }

    #[test]
    fn reads_the_first_video_track_past_clusters() {
        let bytes = file("webm", 1250.0, 41_666_667, 3);
        let h = read_header(Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(h, Header { frames: 30, rate: (24, 1), width: 64, height: 48, quarter_turned: false });
        let h = read_header(Cursor::new(file("matroska", 667.0, 33_366_667, 0)), u64::MAX).unwrap();
        assert_eq!((h.frames, h.rate), (20, (30_000, 1001)));
        for (roll, turned) in [(90.0, true), (-90.0, true), (270.0, true), (180.0, false), (0.0, false)] {
            let bytes = rolled("webm", 1000.0, 40_000_000, 1, Some(roll));
            assert_eq!(read_header(Cursor::new(&bytes), bytes.len() as u64).unwrap().quarter_turned, turned, "{roll}");
        }
    }

    #[test]
    fn what_is_not_there_is_named() {
        let bad = |bytes: Vec<u8>| read_header(Cursor::new(&bytes), bytes.len() as u64).unwrap_err();
        assert!(bad(file("mkv-ish", 1.0, 1, 0)).contains("not Matroska or WebM"));
        assert!(bad(file("webm", 1000.0, 0, 0)).contains("DefaultDuration"));
        assert!(bad(file("webm", 0.0, 40_000_000, 0)).contains("no duration"));
        assert!(bad(file("webm", 1000.0, 40_000_000, 0)[..60].to_vec()).contains("past the end"));
        assert!(bad(b"\x1a\x45\xdf\xa3".to_vec()).contains("ends inside"));
        assert!(!is_matroska(b"RIFF0000WAVE") && is_matroska(&file("webm", 1.0, 1, 0)));
        let other = el(0x1A45_DFA4, b"x");
        assert!(bad(other).contains("not a Matroska or WebM file"));
    }

    #[test]
    fn rates_reduce_as_ffmpeg_reduces_them() {
        // 1e9 / DefaultDuration for common rates, and the fractions FFmpeg reports.
        for (dd, rate) in [(41_666_667, (24, 1)), (33_366_667, (30_000, 1001)), (40_000_000, (25, 1)), (16_683_333, (60_000, 1001))] {
            let got = bounded_ratio(1_000_000_000, dd, RATE_TERMS);
            if rate.0 <= RATE_TERMS && rate.1 <= RATE_TERMS {
                assert_eq!(got, rate, "{dd}");
            } else {
                assert!(got.0 <= RATE_TERMS && got.1 <= RATE_TERMS);
                assert!((got.0 as f64 / got.1 as f64 - rate.0 as f64 / rate.1 as f64).abs() < 1e-3, "{dd}: {got:?}");
            }
        }
    }

    proptest! {
        /// Within the bound, no fraction is nearer (checked against every denominator).
        #[test]
        fn bounded_ratios_are_the_nearest(num in 1u64..5_000, den in 1u64..5_000, most in 1u64..60) {
            let (p, q) = bounded_ratio(num, den, most);
            prop_assert!(p <= most && q <= most && q >= 1);
            let x = num as f64 / den as f64;
            let err = (p as f64 / q as f64 - x).abs();
            for b in 1..=most {
                let a = ((x * b as f64).round() as u64).min(most);
                prop_assert!((a as f64 / b as f64 - x).abs() >= err - 1e-12, "{a}/{b} nearer than {p}/{q} to {num}/{den}");
            }
        }
    }
}
