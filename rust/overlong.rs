//! Over-long samples: `truncate` cuts one, `split_turns` makes several of a multi-turn
//! conversation at turn boundaries.

use crate::render::{Message, Role};
use crate::tokenize::Encoded;

/// Cuts a sample to at most `max` tokens: never inside an image run, at the end of a
/// response when one fits; false when nothing trained would remain.
pub fn truncate(enc: &mut Encoded, max: usize, (wrap_start, wrap_end): (bool, bool)) -> bool {
    truncate_media(enc, max, [(wrap_start, wrap_end), (false, false), (false, false)])
}

/// `truncate`, audio and video runs (with their own wrappers) kept whole as image runs
/// are; `wraps`: the (start, end) wrappers of image, audio and video runs.
pub fn truncate_media(enc: &mut Encoded, max: usize, wraps: [(bool, bool); 3]) -> bool {
    let [(wrap_start, wrap_end), audio_wrap, video_wrap] = wraps;
    let mut cut = max.min(enc.ids.len());
    let runs = enc
        .images
        .iter()
        .map(|r| (r, (wrap_start, wrap_end)))
        .chain(enc.audios.iter().map(|r| (r, audio_wrap)))
        .chain(enc.videos.iter().map(|r| (r, video_wrap)));
    let mut spans: Vec<(usize, usize)> =
        runs.map(|(run, (ws, we))| (run.pos as usize - ws as usize, (run.pos + run.len) as usize + we as usize)).collect();
    spans.sort_unstable();
    // The run with its start/end wrapper tokens is kept whole or not at all (from the
    // last run back: moving the cut before one run may move it into an earlier one).
    for &(s, e) in spans.iter().rev() {
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
    enc.audios.retain(|r| ((r.pos + r.len) as usize + audio_wrap.1 as usize) <= cut);
    enc.videos.retain(|r| ((r.pos + r.len) as usize + video_wrap.1 as usize) <= cut);
    true
}

/// Estimated weight of a message for predicting token counts: its bytes plus what a
/// template adds around each message.
const MESSAGE_OVERHEAD: usize = 16;
/// Probes at predicted ends before the search falls back to galloping and bisection.
const PREDICTIONS: usize = 3;

/// The conversation as several samples, each a run of whole rounds (a user turn and what
/// follows it) that fits in `max` tokens, each with the system prompt; `encode` tokenizes a
/// candidate part (and may add what every part needs, such as the images). A round that
/// alone does not fit is dropped, as is a part with nothing trained.
///
/// Each part is the longest run of rounds from where the last one ended that fits. Rather
/// than trying every longer run (which re-encodes growing prefixes: quadratic in the
/// conversation), the end is predicted from the bytes of the rounds and the tokens per byte
/// seen so far, checked with one more probe, and otherwise found by galloping and bisection;
/// every part costs a few encodes of about `max` tokens, so the whole is linear in the
/// conversation. The search assumes that a run's token count grows as rounds are appended
/// (true when the template renders earlier messages the same whatever follows); for a
/// template that rewrites history it still returns parts that fit, in order.
pub fn split_turns<E>(
    messages: &[Message],
    max: usize,
    encode: impl Fn(&[Message]) -> Result<Encoded, E>,
) -> Result<Vec<Encoded>, E> {
    let (system, rounds) = rounds_of(messages);
    let weight = |ms: &[Message]| ms.iter().map(|m| m.content.len() + MESSAGE_OVERHEAD).sum::<usize>();
    // prefix[k]: weight of rounds[..k].
    let mut prefix = vec![0usize];
    for r in &rounds {
        prefix.push(prefix.last().unwrap() + weight(r));
    }
    let mut search = Search { system: &system, rounds: &rounds, prefix, base: weight(&system), max, encode, ratio: None };
    let mut parts = Vec::new();
    let mut start = 0;
    while start < rounds.len() {
        match search.longest_fit(start)? {
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

/// The system messages, then the rounds: a user turn and what follows it (the first round
/// may open with another role).
fn rounds_of(messages: &[Message]) -> (Vec<Message>, Vec<Vec<Message>>) {
    let system: Vec<Message> = messages.iter().take_while(|m| m.role == Role::System).cloned().collect();
    let mut rounds: Vec<Vec<Message>> = Vec::new();
    for m in &messages[system.len()..] {
        if m.role == Role::User || rounds.is_empty() {
            rounds.push(Vec::new());
        }
        rounds.last_mut().unwrap().push(m.clone());
    }
    (system, rounds)
}

struct Search<'a, F> {
    system: &'a [Message],
    rounds: &'a [Vec<Message>],
    prefix: Vec<usize>,
    base: usize,
    max: usize,
    encode: F,
    /// Tokens per unit of weight in the last probe.
    ratio: Option<f64>,
}

impl<E, F: Fn(&[Message]) -> Result<Encoded, E>> Search<'_, F> {
    fn weight(&self, from: usize, to: usize) -> usize {
        self.base + self.prefix[to] - self.prefix[from]
    }

    /// Encodes rounds[from..to] after the system prompt, and learns its tokens per weight.
    fn probe(&mut self, from: usize, to: usize) -> Result<Encoded, E> {
        let mut chunk = self.system.to_vec();
        chunk.extend(self.rounds[from..to].iter().flatten().cloned());
        let enc = (self.encode)(&chunk)?;
        self.ratio = Some(enc.ids.len() as f64 / self.weight(from, to).max(1) as f64);
        Ok(enc)
    }

    /// The last end whose estimated token count fits (the first end when none does).
    fn predict(&self, start: usize) -> usize {
        let Some(ratio) = self.ratio else { return start + 1 };
        let fits = |end: usize| self.weight(start, end) as f64 * ratio <= self.max as f64;
        // Estimates grow with the end: bisect for the first end that does not fit.
        let (mut lo, mut hi) = (start + 1, self.rounds.len() + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo - 1).max(start + 1)
    }

    /// The largest end > start with rounds[start..end] within `max` tokens, and its
    /// encoding; None when round `start` alone does not fit.
    fn longest_fit(&mut self, start: usize) -> Result<Option<(usize, Encoded)>, E> {
        let n = self.rounds.len();
        // rounds[start..lo] fits (lo == start: nothing known), rounds[start..hi] does not
        // (hi == n + 1: nothing known).
        let (mut lo, mut hi) = (start, n + 1);
        let mut best: Option<Encoded> = None;
        let mut step = 1;
        let mut probes = 0;
        while hi - lo > 1 && lo < n {
            let end = if probes < PREDICTIONS {
                self.predict(start)
            } else if hi > n {
                step *= 2;
                lo + step / 2
            } else {
                lo + (hi - lo) / 2
            };
            let end = end.clamp(lo + 1, (hi - 1).min(n));
            probes += 1;
            let enc = self.probe(start, end)?;
            if enc.ids.len() <= self.max {
                lo = end;
                best = Some(enc);
            } else {
                hi = end;
            }
        }
        Ok(best.map(|enc| (lo, enc)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::ImageRun;
    use proptest::prelude::*;

    /// The first-fit scan `split_turns` replaced (it tries every longer run in turn), kept
    /// as the reference its output must equal.
    fn split_turns_scan<E>(
        messages: &[Message],
        max: usize,
        encode: impl Fn(&[Message]) -> Result<Encoded, E>,
    ) -> Result<Vec<Encoded>, E> {
        let (system, rounds) = rounds_of(messages);
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

    /// Stand-in tokenizers. `Chars`: one token per byte plus two per message (additive);
    /// `Packed`: the chunk's bytes three to a token, plus one per message (the count of a
    /// run is not the sum of its rounds'). Assistant tokens are trained; a message holding
    /// '!' fails to encode.
    #[derive(Debug, Clone, Copy)]
    enum Stand {
        Chars,
        Packed,
    }

    fn stand_in(kind: Stand, calls: &std::cell::Cell<usize>) -> impl Fn(&[Message]) -> Result<Encoded, String> + '_ {
        move |chunk: &[Message]| {
            calls.set(calls.get() + 1);
            if let Some(m) = chunk.iter().find(|m| m.content.contains('!')) {
                return Err(format!("cannot encode {:?}", m.content));
            }
            let mut ids = Vec::new();
            let mut mask = Vec::new();
            for m in chunk {
                let trained = (m.role == Role::Assistant) as u8;
                let n = match kind {
                    Stand::Chars => m.content.len() + 2,
                    Stand::Packed => 1,
                };
                ids.extend(m.content.bytes().map(u32::from).chain([7, 8]).take(n));
                mask.extend(std::iter::repeat_n(trained, n));
            }
            if let Stand::Packed = kind {
                let text: usize = chunk.iter().map(|m| m.content.len()).sum();
                ids.extend(std::iter::repeat_n(9, text.div_ceil(3)));
                mask.extend(std::iter::repeat_n(chunk.last().is_some_and(|m| m.role == Role::Assistant) as u8, text.div_ceil(3)));
            }
            let n = ids.len();
            Ok(Encoded { ids, mask, offsets: vec![(0, 0); n], images: vec![], ..Default::default() })
        }
    }

    fn conversation() -> impl Strategy<Value = Vec<Message>> {
        let content = prop_oneof![30 => "[a-z ]{0,24}", 1 => "[a-z]{0,3}!"];
        let message = (0u8..3, content).prop_map(|(r, content)| Message { role: Role::from_code(r).unwrap(), content });
        (prop::collection::vec("[a-z]{0,12}", 0..2), prop::collection::vec(message, 0..40)).prop_map(|(system, rest)| {
            let mut out: Vec<Message> = system.into_iter().map(|content| Message { role: Role::System, content }).collect();
            out.extend(rest);
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// The search finds exactly the parts of the first-fit scan, and the same errors.
        #[test]
        fn split_turns_equals_the_scan(messages in conversation(), max in 1usize..160, packed in any::<bool>()) {
            let kind = if packed { Stand::Packed } else { Stand::Chars };
            let (a, b) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
            let fast = split_turns(&messages, max, stand_in(kind, &a));
            let scan = split_turns_scan(&messages, max, stand_in(kind, &b));
            match (&fast, &scan) {
                (Ok(x), Ok(y)) => prop_assert_eq!(x, y),
                (Err(_), Err(_)) => {}
                _ => prop_assert!(false, "search {:?} but scan {:?}", fast.is_ok(), scan.is_ok()),
            }
        }
    }

    fn real_encoder(template: &str) -> impl Fn(&[Message]) -> Result<Encoded, String> + '_ {
        use crate::plan::TrainOn;
        use crate::render::{builtin, ChatRenderer};
        use crate::tokenize::TextTokenizer;
        const TOKENIZER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/models/smollm2/tokenizer.json");
        static TOKENIZER_ONCE: std::sync::OnceLock<TextTokenizer> = std::sync::OnceLock::new();
        let tokenizer = TOKENIZER_ONCE
            .get_or_init(|| TextTokenizer::new(TextTokenizer::from_file(TOKENIZER).unwrap(), None, Default::default()).unwrap());
        let renderer = ChatRenderer::new(builtin(template).unwrap(), Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        move |chunk: &[Message]| {
            let rendered = renderer.render(chunk).map_err(|e| e.to_string())?;
            let roles: Vec<Role> = chunk.iter().map(|m| m.role).collect();
            tokenizer.encode(&rendered, &roles, &[], TrainOn::Assistant, true)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// The same with the bundled tokenizer and every built-in chat template.
        #[test]
        fn split_turns_equals_the_scan_with_a_real_tokenizer(
            messages in conversation(),
            max in 8usize..400,
            template in prop::sample::select(crate::render::BUILTINS.to_vec()),
        ) {
            let encode = real_encoder(template);
            let fast = split_turns(&messages, max, &encode);
            let scan = split_turns_scan(&messages, max, &encode);
            prop_assert_eq!(fast, scan);
        }
    }

    /// Speed of one long conversation (MMRECIPE_SPLIT_ROUNDS rounds, 400 by default) with
    /// `max` just under its length and at 1024, with the bundled tokenizer and chatml:
    /// `cargo test --release --lib -- --ignored split_turns_speed --nocapture` prints the
    /// time of the search and of the scan.
    #[test]
    #[ignore]
    fn split_turns_speed() {
        let rounds = std::env::var("MMRECIPE_SPLIT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
        let mut messages = vec![Message { role: Role::System, content: "You are a helpful assistant.".into() }];
        for k in 0..rounds {
            messages.push(Message {
                role: Role::User,
                content: format!("What is item {k} of the list? {}", "Explain. ".repeat(k % 5)),
            });
            messages.push(Message {
                role: Role::Assistant,
                content: format!("Item {k} is {}.", "a long answer ".repeat(k % 13 + 3)),
            });
        }
        let encode = real_encoder("chatml");
        let whole = encode(&messages).unwrap().ids.len();
        for max in [whole - 1, 1024] {
            let t = std::time::Instant::now();
            let fast = split_turns(&messages, max, &encode).unwrap();
            let search = t.elapsed();
            let t = std::time::Instant::now();
            let scan = split_turns_scan(&messages, max, &encode).unwrap();
            let scanned = t.elapsed();
            assert_eq!(fast, scan);
            println!(
                "{whole} tokens, max {max}: search {search:.2?}, scan {scanned:.2?} ({:.1}x), {} parts",
                scanned.as_secs_f64() / search.as_secs_f64(),
                fast.len()
            );
        }
    }

    /// One long conversation with `max` just under its length: the scan encodes every
    /// prefix, the search a handful of runs.
    #[test]
    fn split_turns_encodes_few_runs() {
        let mut messages = vec![Message { role: Role::System, content: "be brief".into() }];
        for k in 0..400 {
            messages.push(Message { role: Role::User, content: format!("question {k} {}", "q".repeat(k % 17)) });
            messages.push(Message { role: Role::Assistant, content: format!("answer {k} {}", "a".repeat(k % 29)) });
        }
        let calls = std::cell::Cell::new(0);
        let whole = stand_in(Stand::Chars, &calls)(&messages).unwrap().ids.len();
        for max in [whole - 1, whole / 2, whole / 7, 200] {
            let (a, b) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
            let fast = split_turns(&messages, max, stand_in(Stand::Chars, &a)).unwrap();
            let scan = split_turns_scan(&messages, max, stand_in(Stand::Chars, &b)).unwrap();
            assert_eq!(fast, scan);
            // About two probes per part (the prediction and the one past it).
            assert!(a.get() <= 3 * fast.len() + 8, "max {max}: {} encodes for {} parts", a.get(), fast.len());
            assert!(b.get() > 10 * a.get() || max == 200, "max {max}: scan {} search {}", b.get(), a.get());
        }
    }

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
            Ok(Encoded { ids: vec![0; n], mask: vec![1; n], offsets: vec![(0, 0); n], images: vec![], ..Default::default() })
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
            let mut enc = Encoded { ids: vec![7; n], mask: mask.clone(), offsets: vec![(0, 0); n], images: images.clone(), ..Default::default() };
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

        /// Image and video runs mixed, video runs in start/end wrappers: no run is cut, its
        /// wrappers included, and each kind keeps exactly its runs before the cut.
        #[test]
        fn truncate_keeps_video_runs_whole_with_their_wrappers(
            mask in prop::collection::vec(0u8..2, 4..200),
            runs in prop::collection::vec((1u32..180, 1u32..20, any::<bool>()), 0..5),
            max in 1usize..200,
        ) {
            let n = mask.len() as u32;
            // Each run with one token of room either side (the wrappers), none overlapping.
            let mut spans: Vec<(u32, u32, bool)> = runs.into_iter()
                .map(|(p, l, video)| (p.min(n - 3) + 1, l.min(n - 2 - (p.min(n - 3) + 1)).max(1), video))
                .filter(|&(p, l, _)| p + l < n)
                .collect();
            spans.sort_by_key(|r| r.0);
            spans.dedup_by(|b, a| b.0 <= a.0 + a.1 + 1);
            let mut mask = mask;
            for &(p, l, _) in &spans { for k in p - 1..p + l + 1 { mask[k as usize] = 0; } }
            let run = |&(pos, len, _): &(u32, u32, bool)| ImageRun { pos, len };
            let images: Vec<ImageRun> = spans.iter().filter(|r| !r.2).map(run).collect();
            let videos: Vec<ImageRun> = spans.iter().filter(|r| r.2).map(run).collect();
            let mut enc = Encoded { ids: vec![7; n as usize], mask, offsets: vec![(0, 0); n as usize], images: images.clone(), videos: videos.clone(), ..Default::default() };
            if truncate_media(&mut enc, max, [(false, false), (false, false), (true, true)]) {
                let cut = enc.ids.len() as u32;
                prop_assert!(cut as usize <= max && enc.mask.contains(&1));
                for r in &videos {
                    prop_assert!(r.pos + r.len + 1 <= cut || r.pos - 1 >= cut, "cut {} inside video run {:?}", cut, r);
                }
                for r in &images {
                    prop_assert!(r.pos + r.len <= cut || r.pos >= cut, "cut {} inside image run {:?}", cut, r);
                }
                prop_assert_eq!(enc.videos.len(), videos.iter().filter(|r| r.pos + r.len < cut).count());
                prop_assert_eq!(enc.images.len(), images.iter().filter(|r| r.pos + r.len <= cut).count());
            }
        }
    }
}
