//! The BPE model with HF's merge-rank semantics: a word starts as one symbol per byte and
//! the adjacent pair with the lowest merge rank is merged (the leftmost among equals) until
//! no pair has a merge — what `tokenizers`' `Word::merge_all` computes with its heap.
//! tiktoken-style token-rank encoders give other ids wherever a vocabulary's id order and
//! merge order disagree, so they are not used here.

use rustc_hash::FxHashMap;

/// Words longer than this use the heap (HF's own algorithm); shorter ones a linear scan.
const LINEAR_MAX: usize = 48;

/// `byte_id` of a byte whose char is not in the vocabulary: it becomes the unk token.
pub const MISSING: u32 = u32::MAX;

pub struct Bpe {
    /// The token of each single byte (its byte-level char), or MISSING.
    byte_id: [u32; 256],
    /// The unk token and whether consecutive unknown bytes fuse into one (`fuse_unk`);
    /// set whenever a byte is MISSING.
    unk: Option<(u32, bool)>,
    /// (left id, right id) → (rank, merged id).
    merges: FxHashMap<u64, (u32, u32)>,
    /// `ignore_merges`: a word that is itself a token is that token (keys are raw bytes).
    whole: Option<FxHashMap<Box<[u8]>, u32>>,
}

#[inline]
fn key(a: u32, b: u32) -> u64 {
    (a as u64) << 32 | b as u64
}

impl Bpe {
    pub fn new(
        byte_id: [u32; 256],
        unk: Option<(u32, bool)>,
        merges: FxHashMap<u64, (u32, u32)>,
        whole: Option<FxHashMap<Box<[u8]>, u32>>,
    ) -> Self {
        assert!(unk.is_some() || !byte_id.contains(&MISSING));
        Bpe { byte_id, unk, merges, whole }
    }

    /// The word's first symbols as HF's `merge_word` makes them: one per byte, unknown
    /// bytes as the unk token (fused when `fuse_unk`). Returns the count written.
    #[inline]
    fn initial(&self, word: &[u8], mut push: impl FnMut(u32, u32)) -> usize {
        let mut n = 0;
        let mut pending: Option<u32> = None; // fused unk length
        for &b in word {
            let id = self.byte_id[b as usize];
            if id != MISSING {
                if let Some(len) = pending.take() {
                    push(self.unk.unwrap().0, len);
                    n += 1;
                }
                push(id, 1);
                n += 1;
                continue;
            }
            let (_, fuse) = self.unk.unwrap();
            match pending {
                Some(len) if fuse => pending = Some(len + 1),
                Some(len) => {
                    push(self.unk.unwrap().0, len);
                    n += 1;
                    pending = Some(1);
                }
                None => pending = Some(1),
            }
        }
        if let Some(len) = pending {
            push(self.unk.unwrap().0, len);
            n += 1;
        }
        n
    }

    pub fn pair_key(a: u32, b: u32) -> u64 {
        key(a, b)
    }

    #[inline]
    fn merge_of(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.merges.get(&key(a, b)).copied()
    }

    /// Appends the word's tokens as (id, byte length).
    pub fn encode(&self, word: &[u8], out: &mut Vec<(u32, u32)>) {
        if let Some(whole) = &self.whole {
            if let Some(&id) = whole.get(word) {
                out.push((id, word.len() as u32));
                return;
            }
        }
        match word.len() {
            0 => {}
            1 if self.byte_id[word[0] as usize] != MISSING => out.push((self.byte_id[word[0] as usize], 1)),
            n if n <= LINEAR_MAX => self.encode_linear(word, out),
            _ => self.encode_heap(word, out),
        }
    }

    fn encode_linear(&self, word: &[u8], out: &mut Vec<(u32, u32)>) {
        let mut syms: [(u32, u32); LINEAR_MAX] = [(0, 0); LINEAR_MAX];
        let mut n = 0;
        self.initial(word, |id, len| {
            syms[n] = (id, len);
            n += 1;
        });
        if n == 1 {
            out.push(syms[0]);
            return;
        }
        // ranks[i]: the merge of (syms[i], syms[i+1]), kept up to date after each merge.
        let mut ranks: [(u32, u32); LINEAR_MAX] = [(u32::MAX, 0); LINEAR_MAX];
        for i in 0..n - 1 {
            ranks[i] = self.merge_of(syms[i].0, syms[i + 1].0).unwrap_or((u32::MAX, 0));
        }
        loop {
            let mut best = u32::MAX;
            let mut at = usize::MAX;
            for (i, r) in ranks[..n - 1].iter().enumerate() {
                if r.0 < best {
                    best = r.0;
                    at = i;
                }
            }
            if at == usize::MAX {
                break;
            }
            syms[at] = (ranks[at].1, syms[at].1 + syms[at + 1].1);
            syms.copy_within(at + 2..n, at + 1);
            ranks.copy_within(at + 1..n - 1, at);
            n -= 1;
            if at > 0 {
                ranks[at - 1] = self.merge_of(syms[at - 1].0, syms[at].0).unwrap_or((u32::MAX, 0));
            }
            if at + 1 < n {
                ranks[at] = self.merge_of(syms[at].0, syms[at + 1].0).unwrap_or((u32::MAX, 0));
            }
            if n == 1 {
                break;
            }
        }
        out.extend_from_slice(&syms[..n]);
    }

    /// HF's algorithm: a min-heap of (rank, position) over a linked list of symbols, stale
    /// entries skipped. Linear in practice on long runs where the scan would be quadratic.
    fn encode_heap(&self, word: &[u8], out: &mut Vec<(u32, u32)>) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        struct Sym {
            id: u32,
            len: u32,
            prev: usize,
            next: usize,
        }
        const NONE: usize = usize::MAX;
        let mut syms: Vec<Sym> = Vec::with_capacity(word.len());
        let n = self.initial(word, |id, len| {
            let i = syms.len();
            syms.push(Sym { id, len, prev: i.wrapping_sub(1), next: i + 1 });
        });
        syms[n - 1].next = NONE;
        let mut heap: BinaryHeap<Reverse<(u32, usize, u32)>> = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some((rank, new)) = self.merge_of(syms[i].id, syms[i + 1].id) {
                heap.push(Reverse((rank, i, new)));
            }
        }
        while let Some(Reverse((_, pos, new))) = heap.pop() {
            let next = syms[pos].next;
            if syms[pos].len == 0 || next == NONE {
                continue;
            }
            // Stale: the pair at `pos` changed since it was pushed (a merged id determines
            // its bytes, so equal ids mean the same pair).
            if self.merge_of(syms[pos].id, syms[next].id).map(|m| m.1) != Some(new) {
                continue;
            }
            let after = syms[next].next;
            syms[pos].id = new;
            syms[pos].len += syms[next].len;
            syms[pos].next = after;
            syms[next].len = 0;
            if after != NONE {
                syms[after].prev = pos;
                if let Some((rank, m)) = self.merge_of(new, syms[after].id) {
                    heap.push(Reverse((rank, pos, m)));
                }
            }
            let prev = syms[pos].prev;
            if prev != NONE {
                if let Some((rank, m)) = self.merge_of(syms[prev].id, new) {
                    heap.push(Reverse((rank, prev, m)));
                }
            }
        }
        out.extend(syms.iter().filter(|s| s.len != 0).map(|s| (s.id, s.len)));
    }
}
