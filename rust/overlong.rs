//! Over-long samples: `truncate` cuts one, `split_turns` makes several of a multi-turn
//! conversation at turn boundaries.

use crate::render::{Message, Role};
use crate::tokenize::Encoded;

/// Cuts a sample to at most `max` tokens: never inside an image run, at the end of a
/// response when one fits; false when nothing trained would remain.
pub fn truncate(enc: &mut Encoded, max: usize, (wrap_start, wrap_end): (bool, bool)) -> bool {
    let mut cut = max.min(enc.ids.len());
    for run in &enc.images {
        // The run with its start/end wrapper tokens is kept whole or not at all.
        let s = run.pos as usize - wrap_start as usize;
        let e = (run.pos + run.len) as usize + wrap_end as usize;
        if s < cut && cut < e {
            cut = s;
        }
    }
    // Prefer the end of a trained span (a turn boundary).
    if let Some(p) = (1..=cut).rev().find(|&p| enc.mask[p - 1] == 1 && (p == enc.ids.len() || enc.mask[p] == 0)) {
        cut = p;
    }
    if !enc.mask[..cut].contains(&1) {
        return false;
    }
    enc.ids.truncate(cut);
    enc.mask.truncate(cut);
    enc.offsets.truncate(cut);
    enc.images.retain(|r| ((r.pos + r.len) as usize + wrap_end as usize) <= cut);
    true
}

/// The conversation as several samples, each a run of whole rounds (a user turn and what
/// follows it) that fits in `max` tokens, each with the system prompt; `encode` tokenizes a
/// candidate part (and may add what every part needs, such as the images). A round that
/// alone does not fit is dropped, as is a part with nothing trained.
pub fn split_turns<E>(
    messages: &[Message],
    max: usize,
    encode: impl Fn(&[Message]) -> Result<Encoded, E>,
) -> Result<Vec<Encoded>, E> {
    let system: Vec<Message> = messages.iter().take_while(|m| m.role == Role::System).cloned().collect();
    let mut rounds: Vec<Vec<Message>> = Vec::new();
    for m in &messages[system.len()..] {
        if m.role == Role::User || rounds.is_empty() {
            rounds.push(Vec::new());
        }
        rounds.last_mut().unwrap().push(m.clone());
    }
    let part = |from: usize, to: usize| {
        let mut chunk = system.clone();
        chunk.extend(rounds[from..to].iter().flatten().cloned());
        encode(&chunk)
    };
    let mut parts = Vec::new();
    let mut start = 0;
    while start < rounds.len() {
        let mut best: Option<(usize, Encoded)> = None;
        for end in start + 1..=rounds.len() {
            let enc = part(start, end)?;
            if enc.ids.len() > max {
                break;
            }
            best = Some((end, enc));
        }
        match best {
            Some((end, enc)) => {
                if enc.trained() > 0 {
                    parts.push(enc);
                }
                start = end;
            }
            None => start += 1,
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::ImageRun;
    use proptest::prelude::*;

    #[test]
    fn rounds_that_fit_are_grouped() {
        let m = |role, n: usize| Message { role, content: "x".repeat(n) };
        let msgs = vec![
            m(Role::System, 1),
            m(Role::User, 1),
            m(Role::Assistant, 3),
            m(Role::User, 1),
            m(Role::Assistant, 9),
            m(Role::User, 1),
            m(Role::Assistant, 2),
        ];
        // A stand-in tokenizer: one token per character, everything trained.
        let encode = |chunk: &[Message]| -> Result<Encoded, ()> {
            let n: usize = chunk.iter().map(|m| m.content.len()).sum();
            Ok(Encoded { ids: vec![0; n], mask: vec![1; n], offsets: vec![(0, 0); n], images: vec![] })
        };
        let parts = split_turns(&msgs, 8, encode).unwrap();
        // [sys, r1] = 5 tokens; r2 alone is 11 > 8: dropped; [sys, r3] = 4.
        assert_eq!(parts.iter().map(|p| p.ids.len()).collect::<Vec<_>>(), vec![5, 4]);
    }

    proptest! {
        #[test]
        fn truncate_keeps_runs_whole_and_something_trained(
            mask in prop::collection::vec(0u8..2, 1..200),
            runs in prop::collection::vec((0u32..180, 1u32..20), 0..4),
            max in 1usize..200,
        ) {
            let n = mask.len();
            let mut images: Vec<ImageRun> = runs.into_iter().map(|(p, l)| ImageRun { pos: p.min(n as u32 - 1), len: l.min(n as u32 - p.min(n as u32 - 1)) }).collect();
            images.sort_by_key(|r| r.pos);
            images.dedup_by(|b, a| b.pos < a.pos + a.len); // non-overlapping runs
            let mut mask = mask;
            for r in &images { for k in r.pos..r.pos + r.len { mask[k as usize] = 0; } }
            let mut enc = Encoded { ids: vec![7; n], mask: mask.clone(), offsets: vec![(0, 0); n], images: images.clone() };
            if truncate(&mut enc, max, (false, false)) {
                prop_assert!(enc.ids.len() <= max);
                prop_assert!(enc.mask.contains(&1));
                let cut = enc.ids.len() as u32;
                for r in &images {
                    prop_assert!(r.pos + r.len <= cut || r.pos >= cut, "cut {} inside run {:?}", cut, r);
                }
                prop_assert_eq!(enc.images.len(), images.iter().filter(|r| r.pos + r.len <= cut).count());
            } else {
                prop_assert!(!mask[..max.min(n)].contains(&1) || images.iter().any(|r| (r.pos as usize) < max));
            }
        }
    }
}
