//! Per-row text for the LLM stages: prompt and sentence templates filled from a source's
//! fields (one template per row, chosen by the counter-based generator), and content keys
//! (SHA-256) that address the call cache. Whole columns in, whole columns out.

use crate::columns::StrCol;
use crate::instruct::Template;
use crate::rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

/// Filled text per row: row i takes template `choose(seed, stream, rows[i])` with each
/// `{name}` replaced by that row's value in the column of the same name. Returns
/// (offsets, bytes) or a message naming the bad template or the missing placeholder.
pub fn fill(
    templates: &[String],
    seed: u64,
    stream: &str,
    rows: &[u64],
    names: &[String],
    columns: &[StrCol<'_>],
) -> Result<(Vec<i64>, Vec<u8>), String> {
    if templates.is_empty() {
        return Err("no templates to choose from".into());
    }
    let parsed = templates
        .iter()
        .enumerate()
        .map(|(k, t)| Template::parse(t).map_err(|e| format!("template {k} ({t:?}): {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    for (k, t) in parsed.iter().enumerate() {
        if let Some(f) = t.fields().find(|f| !names.iter().any(|n| n == f)) {
            return Err(format!(
                "template {k} ({:?}) uses {{{f}}}, which is not a field here (fields: {})",
                templates[k],
                names.join(", ")
            ));
        }
    }
    for (name, c) in names.iter().zip(columns) {
        c.check_str().map_err(|e| format!("field {name}: {e}"))?;
    }
    if columns.len() != names.len() || columns.iter().any(|c| c.len() != rows.len()) {
        return Err("every field column must have one value per row".into());
    }
    let stream = rng::name_hash(stream);
    let filled: Vec<String> = rows
        .par_iter()
        .enumerate()
        .map(|(i, &row)| {
            let k = choose(seed, stream, row, parsed.len());
            parsed[k].fill(|f| names.iter().position(|n| n == f).and_then(|c| columns[c].get(i).ok()))
        })
        .collect::<Result<_, _>>()?;
    let mut offsets = Vec::with_capacity(filled.len() + 1);
    offsets.push(0i64);
    let mut data = Vec::with_capacity(filled.iter().map(String::len).sum());
    for s in &filled {
        data.extend_from_slice(s.as_bytes());
        offsets.push(data.len() as i64);
    }
    Ok((offsets, data))
}

/// The template index for a row (independent of the instruction-template choice).
pub fn choose(seed: u64, stream: u64, row: u64, n: usize) -> usize {
    rng::below(rng::keyed(seed, stream, row, rng::PURPOSE_LENGTHEN), n as u64) as usize
}

/// Lower-case hex SHA-256 of `prefix` followed by each row's text, 64 bytes per row.
pub fn keys(prefix: &[u8], texts: StrCol<'_>) -> Result<Vec<u8>, String> {
    texts.check_str()?;
    let base = Sha256::new_with_prefix(prefix);
    let digests: Vec<[u8; 32]> = (0..texts.len())
        .into_par_iter()
        .map(|i| {
            let (a, b) = (texts.offsets[i] as usize, texts.offsets[i + 1] as usize);
            base.clone().chain_update(&texts.data[a..b]).finalize().into()
        })
        .collect();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(digests.len() * 64);
    for d in digests {
        for byte in d {
            out.push(HEX[(byte >> 4) as usize]);
            out.push(HEX[(byte & 15) as usize]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(values: &[&str]) -> (Vec<i64>, Vec<u8>) {
        let mut offsets = vec![0i64];
        let mut data = Vec::new();
        for v in values {
            data.extend_from_slice(v.as_bytes());
            offsets.push(data.len() as i64);
        }
        (offsets, data)
    }

    fn texts(offsets: &[i64], data: &[u8]) -> Vec<String> {
        offsets.windows(2).map(|w| String::from_utf8(data[w[0] as usize..w[1] as usize].to_vec()).unwrap()).collect()
    }

    #[test]
    fn fills_each_row_from_its_fields() {
        let (qo, qd) = column(&["why?", "what?"]);
        let (ao, ad) = column(&["yes", "a cat"]);
        let cols = [StrCol { offsets: &qo, data: &qd }, StrCol { offsets: &ao, data: &ad }];
        let names = ["question".to_string(), "answer".to_string()];
        let (o, d) = fill(&["Q: {question} A: {answer} {{x}}".into()], 1, "s", &[0, 1], &names, &cols).unwrap();
        assert_eq!(texts(&o, &d), vec!["Q: why? A: yes {x}", "Q: what? A: a cat {x}"]);
    }

    #[test]
    fn choice_depends_on_row_not_position() {
        let templates: Vec<String> = (0..5).map(|k| format!("t{k} {{answer}}")).collect();
        let (ao, ad) = column(&["a", "b", "c"]);
        let names = ["answer".to_string()];
        let col = [StrCol { offsets: &ao, data: &ad }];
        let (o1, d1) = fill(&templates, 9, "src", &[10, 11, 12], &names, &col).unwrap();
        let (ao2, ad2) = column(&["c"]);
        let (o2, d2) = fill(&templates, 9, "src", &[12], &names, &[StrCol { offsets: &ao2, data: &ad2 }]).unwrap();
        assert_eq!(texts(&o1, &d1)[2], texts(&o2, &d2)[0]);
    }

    #[test]
    fn unknown_placeholder_is_named() {
        let (ao, ad) = column(&["a"]);
        let err =
            fill(&["{caption}".into()], 0, "s", &[0], &["answer".into()], &[StrCol { offsets: &ao, data: &ad }]).unwrap_err();
        assert!(err.contains("{caption}"), "{err}");
    }

    #[test]
    fn keys_are_sha256_of_prefix_and_text() {
        let (o, d) = column(&["abc", ""]);
        let out = keys(b"", StrCol { offsets: &o, data: &d }).unwrap();
        assert_eq!(&out[..64], b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(&out[64..], b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let (po, pd) = column(&["bc"]);
        let prefixed = keys(b"a", StrCol { offsets: &po, data: &pd }).unwrap();
        assert_eq!(&prefixed[..], &out[..64], "prefix + text hashes as one message");
    }
}
