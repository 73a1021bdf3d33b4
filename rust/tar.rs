//! WebDataset shards: the regular-file members of an uncompressed tar file (name, offset
//! of the data, size), listed by reading each 512-byte header and seeking over the data.
//! ustar and GNU headers, GNU long names (`L`), pax paths and sizes (`x`); what `tarfile`
//! lists for the same file (a test holds them equal).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const BLOCK: u64 = 512;

/// One regular file in the archive: its data is bytes [offset, offset + size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// Why a file is not a listable tar archive; the message says where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarError {
    /// The file ends inside a member's data or a header.
    Truncated(String),
    /// Not a tar file (a header that is not one), or an I/O error.
    Unreadable(String),
}

fn field_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A numeric header field: octal text (NUL- or space-terminated), or GNU base-256.
fn number(b: &[u8]) -> Option<u64> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        let mut v: u64 = (b[0] & 0x7f) as u64;
        for &c in &b[1..] {
            v = v.checked_mul(256)?.checked_add(c as u64)?;
        }
        return Some(v);
    }
    let text: Vec<u8> = b.iter().copied().take_while(|&c| c != 0).collect();
    let text = std::str::from_utf8(&text).ok()?.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn checksum_ok(h: &[u8; 512]) -> bool {
    let Some(want) = number(&h[148..156]) else { return false };
    let sum: u64 = h.iter().enumerate().map(|(i, &c)| if (148..156).contains(&i) { 32 } else { c as u64 }).sum();
    // Some old writers summed signed bytes.
    let signed: i64 = h.iter().enumerate().map(|(i, &c)| if (148..156).contains(&i) { 32 } else { c as i8 as i64 }).sum();
    sum == want || signed == want as i64
}

/// pax records "LEN key=value\n": the path and size they set.
fn pax(data: &[u8], name: &mut Option<String>, size: &mut Option<u64>) {
    let mut rest = data;
    while let Some(space) = rest.iter().position(|&c| c == b' ') {
        let Some(len) = std::str::from_utf8(&rest[..space]).ok().and_then(|s| s.parse::<usize>().ok()) else { return };
        if len <= space || len > rest.len() {
            return;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(eq) = record.iter().position(|&c| c == b'=') {
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            match key {
                b"path" => *name = Some(String::from_utf8_lossy(value).into_owned()),
                b"size" => *size = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()),
                _ => {}
            }
        }
        rest = &rest[len..];
    }
}

/// The regular-file members of the tar file at `path`, in archive order.
pub fn members(path: &Path) -> Result<Vec<Member>, TarError> {
    let unreadable = |e: std::io::Error| TarError::Unreadable(e.to_string());
    let mut f = File::open(path).map_err(unreadable)?;
    let len = f.metadata().map_err(unreadable)?.len();
    let (mut pos, mut out) = (0u64, Vec::new());
    let (mut long_name, mut pax_size): (Option<String>, Option<u64>) = (None, None);
    let mut header = [0u8; 512];
    loop {
        if pos >= len {
            break; // no end-of-archive blocks: tarfile takes the end of the file as the end
        }
        if pos + BLOCK > len {
            return Err(TarError::Truncated(format!("a header at byte {pos} is cut short")));
        }
        f.seek(SeekFrom::Start(pos)).map_err(unreadable)?;
        f.read_exact(&mut header).map_err(unreadable)?;
        if header.iter().all(|&c| c == 0) {
            break; // end of archive
        }
        if !checksum_ok(&header) {
            return Err(TarError::Unreadable(format!("bad header checksum at byte {pos}")));
        }
        let kind = header[156];
        let size = number(&header[124..136]).ok_or_else(|| TarError::Unreadable(format!("bad size field at byte {pos}")))?;
        let size = if matches!(kind, b'0' | 0 | b'7') { pax_size.take().unwrap_or(size) } else { size };
        let data = pos + BLOCK;
        let next = data.checked_add(size.div_ceil(BLOCK) * BLOCK).ok_or_else(|| TarError::Unreadable("size out of range".into()))?;
        let mut name = field_str(&header[0..100]);
        if &header[257..263] == b"ustar\0" {
            let prefix = field_str(&header[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        match kind {
            b'L' | b'x' => {
                if data + size > len {
                    return Err(TarError::Truncated(format!("an extended header at byte {pos} is cut short")));
                }
                let mut buf = vec![0u8; size.min(1 << 20) as usize];
                f.read_exact(&mut buf).map_err(unreadable)?;
                if kind == b'L' {
                    long_name = Some(field_str(&buf));
                } else {
                    pax(&buf, &mut long_name, &mut pax_size);
                }
            }
            b'0' | 0 | b'7' => {
                let name = long_name.take().unwrap_or(name);
                if data + size > len {
                    return Err(TarError::Truncated(format!("member '{name}' ends at byte {}, the file has {len}", data + size)));
                }
                out.push(Member { name, offset: data, size });
            }
            b'g' => {}
            _ => {
                long_name = None;
                pax_size = None;
            }
        }
        pos = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, size: u64, kind: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&c| c as u64).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn member(name: &str, data: &[u8], kind: u8) -> Vec<u8> {
        let mut b = header(name, data.len() as u64, kind);
        b.extend(data);
        b.resize(b.len().div_ceil(512) * 512, 0);
        b
    }

    #[test]
    fn lists_members_long_names_and_truncation() {
        let long = "d/".to_string() + &"x".repeat(150) + ".txt";
        let mut tar = member("a.png", b"PNGDATA", b'0');
        tar.extend(member("././@LongLink", format!("{long}\0").as_bytes(), b'L'));
        tar.extend(member("d/xxxx", b"caption", b'0'));
        tar.extend(member("dir/", b"", b'5'));
        tar.extend(member("pax", b"17 path=p/b.json\n10 size=2\n", b'x'));
        tar.extend(member("ignored", b"{}", b'0'));
        let full = tar.len();
        tar.extend([0u8; 1024]);
        let path = std::env::temp_dir().join(format!("mmrecipe-tar-{}.tar", std::process::id()));
        std::fs::write(&path, &tar).unwrap();
        let got = members(&path).unwrap();
        let names: Vec<&str> = got.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a.png", long.as_str(), "p/b.json"]);
        assert_eq!((got[0].offset, got[0].size), (512, 7));
        assert_eq!(&tar[got[1].offset as usize..][..got[1].size as usize], b"caption");
        assert_eq!(got[2].size, 2);
        // The last member's data whole, its padding gone: listed; a byte of it gone: truncated.
        std::fs::write(&path, &tar[..full - 512 + 2]).unwrap();
        assert_eq!(members(&path).unwrap().len(), 3);
        std::fs::write(&path, &tar[..full - 512 + 1]).unwrap();
        assert!(matches!(members(&path), Err(TarError::Truncated(m)) if m.contains("member 'p/b.json' ends at byte")));
        std::fs::write(&path, &tar[..512 + 3]).unwrap();
        assert_eq!(members(&path), Err(TarError::Truncated("member 'a.png' ends at byte 519, the file has 515".into())));
        std::fs::write(&path, b"not a tar file at all".repeat(40)).unwrap();
        assert!(matches!(members(&path), Err(TarError::Unreadable(m)) if m.contains("bad header checksum at byte 0")));
        std::fs::remove_file(&path).unwrap();
    }
}
