//! Items put away by length (and, under an image budget, by image count) for the
//! refill packer: the longest item that fits a room, an item of exactly a given length,
//! or a pair that sums to one, each found by scanning bitsets over lengths rather than
//! items, so a query costs O(capacity / 64) whatever the number of items.

/// Items of lengths `1..=capacity` grouped by (image class, length); within a group they
/// are handed out in index order, so the packing is deterministic.
pub(super) struct Shelves {
    capacity: u32,
    /// The image count of each class, ascending (one class of 0 without an image budget).
    class_images: Vec<u32>,
    /// Group (class, length) holds `ids[next[g]..end[g]]` unused, in index order.
    end: Vec<u32>,
    next: Vec<u32>,
    ids: Vec<u32>,
    /// Items left per length, over all classes.
    left: Vec<u32>,
    /// Bit `l` set while an item of length `l` is left; `reversed` holds bit
    /// `capacity - l` for the same items, so pairs summing to a room are one AND.
    present: Vec<u64>,
    reversed: Vec<u64>,
    /// Bounds on the lengths left: they only shrink as items are taken.
    lo: u32,
    hi: u32,
    remaining: usize,
    /// Fenwick tree over `left`, for the length at a given rank.
    tree: Vec<u32>,
}

impl Shelves {
    /// `images[i]` is ignored (one class) when `by_images` is false. Every length must be
    /// in `1..=capacity`.
    pub(super) fn new(lengths: &[u32], images: &[u32], capacity: u32, by_images: bool) -> Self {
        let class_of_count = |k: u32| if by_images { k } else { 0 };
        let mut class_images: Vec<u32> = if by_images { images.to_vec() } else { vec![0] };
        class_images.sort_unstable();
        class_images.dedup();
        let span = capacity as usize + 1;
        let class_index = |k: u32| class_images.binary_search(&class_of_count(k)).unwrap();
        let group = |i: usize| class_index(images.get(i).copied().unwrap_or(0)) * span + lengths[i] as usize;
        let groups = class_images.len() * span;
        let mut end = vec![0u32; groups];
        let mut left = vec![0u32; span];
        for (i, &l) in lengths.iter().enumerate() {
            debug_assert!(l >= 1 && l <= capacity);
            end[group(i)] += 1;
            left[l as usize] += 1;
        }
        let mut start = vec![0u32; groups];
        let mut acc = 0u32;
        for g in 0..groups {
            start[g] = acc;
            acc += end[g];
            end[g] = start[g];
        }
        let mut ids = vec![0u32; lengths.len()];
        for i in 0..lengths.len() {
            let g = group(i);
            ids[end[g] as usize] = i as u32;
            end[g] += 1;
        }
        let words = span.div_ceil(64);
        let (mut present, mut reversed) = (vec![0u64; words], vec![0u64; words]);
        for l in 1..span {
            if left[l] > 0 {
                set(&mut present, l);
                set(&mut reversed, capacity as usize - l);
            }
        }
        let lo = (1..span).find(|&l| left[l] > 0).unwrap_or(span) as u32;
        let hi = (1..span).rev().find(|&l| left[l] > 0).unwrap_or(0) as u32;
        let next = start.clone();
        let mut tree = vec![0u32; span + 1];
        for l in 1..span {
            let mut i = l;
            while i <= span {
                tree[i] += left[l];
                i += i & i.wrapping_neg();
            }
        }
        Shelves { capacity, class_images, end, next, ids, left, present, reversed, lo, hi, remaining: lengths.len(), tree }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// Items of length `l` left.
    pub(super) fn count(&self, l: u32) -> u32 {
        self.left.get(l as usize).copied().unwrap_or(0)
    }

    /// The shortest length left (a room below it can take nothing more).
    pub(super) fn shortest(&self) -> Option<u32> {
        (self.remaining > 0).then_some(self.lo)
    }

    /// The length at rank ⌊q · items left⌋ of the items left, shortest first.
    pub(super) fn quantile(&self, q: f64) -> Option<u32> {
        if self.remaining == 0 {
            return None;
        }
        // The smallest l with (items of length ≤ l) > rank.
        let rank = ((q * self.remaining as f64) as usize).min(self.remaining - 1) as u32;
        let (mut pos, mut acc) = (0usize, 0u32);
        let mut step = self.tree.len().next_power_of_two();
        while step > 0 {
            let next = pos + step;
            if next < self.tree.len() && acc + self.tree[next] <= rank {
                pos = next;
                acc += self.tree[next];
            }
            step /= 2;
        }
        Some(pos as u32 + 1)
    }

    /// The fewest images an item of length `l` left has, if any is left.
    fn fewest_images(&self, l: u32) -> Option<u32> {
        self.first_class(l).map(|c| self.class_images[c])
    }

    /// The class with the fewest images that still has an item of length `l`.
    fn first_class(&self, l: u32) -> Option<usize> {
        let span = self.capacity as usize + 1;
        (0..self.class_images.len()).find(|&c| self.next[c * span + l as usize] < self.end[c * span + l as usize])
    }

    /// The fewest images two items of length `l` left have together.
    fn fewest_images_of_two(&self, l: u32) -> Option<u32> {
        let span = self.capacity as usize + 1;
        let mut total = 0;
        let mut found = 0;
        for c in 0..self.class_images.len() {
            let g = c * span + l as usize;
            let n = (self.end[g] - self.next[g]).min(2 - found);
            total += n * self.class_images[c];
            found += n;
            if found == 2 {
                return Some(total);
            }
        }
        None
    }

    /// Whether an item of exactly length `l` with at most `images` images is left.
    pub(super) fn has(&self, l: u32, images: u32) -> bool {
        l >= 1 && l <= self.capacity && self.left[l as usize] > 0 && self.fewest_images(l).is_some_and(|k| k <= images)
    }

    /// The longest length `≤ room` left with an item of at most `images` images.
    pub(super) fn longest_at_most(&self, room: u32, images: u32) -> Option<u32> {
        let top = room.min(self.hi);
        if self.remaining == 0 || top < self.lo {
            return None;
        }
        let mut w = top as usize / 64;
        let mut word = self.present[w] & mask_upto(top as usize % 64);
        loop {
            while word != 0 {
                let l = (w * 64 + 63 - word.leading_zeros() as usize) as u32;
                if l < self.lo {
                    return None;
                }
                if self.fewest_images(l).is_some_and(|k| k <= images) {
                    return Some(l);
                }
                word &= !(1u64 << (l % 64));
            }
            if w == 0 || (w * 64) as u32 <= self.lo {
                return None;
            }
            w -= 1;
            word = self.present[w];
        }
    }

    /// Two lengths `a ≤ b` left with `a + b = room` whose items have at most `images`
    /// images together; of several pairs, the one with the longest `b`.
    pub(super) fn pair_summing_to(&self, room: u32, images: u32) -> Option<(u32, u32)> {
        if room < 2 || room > 2 * self.capacity || self.remaining < 2 {
            return None;
        }
        // bit a of `present` AND bit (capacity - room + a) of `reversed` ⇔ a and room - a left.
        let shift = self.capacity as i64 - room as i64;
        let a_lo = self.lo.max(room.saturating_sub(self.hi));
        let a_hi = room / 2;
        if a_lo > a_hi {
            return None;
        }
        for w in (a_lo as usize / 64)..=(a_hi as usize / 64) {
            let mut word = self.present[w] & bits_at(&self.reversed, w as i64 * 64 + shift);
            if w == a_lo as usize / 64 {
                word &= !mask_upto(a_lo as usize % 64) | (1u64 << (a_lo % 64));
            }
            if w == a_hi as usize / 64 {
                word &= mask_upto(a_hi as usize % 64);
            }
            while word != 0 {
                let a = (w * 64 + word.trailing_zeros() as usize) as u32;
                word &= word - 1;
                let b = room - a;
                let fits = if a == b {
                    self.fewest_images_of_two(a).is_some_and(|k| k <= images)
                } else {
                    match (self.fewest_images(a), self.fewest_images(b)) {
                        (Some(ka), Some(kb)) => ka + kb <= images,
                        _ => false,
                    }
                };
                if fits {
                    return Some((a, b));
                }
            }
        }
        None
    }

    /// Takes an item of length `l` with at most `images` images (the fewest there are):
    /// its index and image count. The caller checked that one is left.
    pub(super) fn take(&mut self, l: u32, images: u32) -> (u32, u32) {
        let c = self.first_class(l).expect("an item of this length is left");
        debug_assert!(self.class_images[c] <= images);
        let g = c * (self.capacity as usize + 1) + l as usize;
        let id = self.ids[self.next[g] as usize];
        self.next[g] += 1;
        self.remaining -= 1;
        self.left[l as usize] -= 1;
        let mut i = l as usize;
        while i < self.tree.len() {
            self.tree[i] -= 1;
            i += i & i.wrapping_neg();
        }
        if self.left[l as usize] == 0 {
            clear(&mut self.present, l as usize);
            clear(&mut self.reversed, (self.capacity - l) as usize);
            while self.lo <= self.capacity && self.left[self.lo as usize] == 0 {
                self.lo += 1;
            }
            while self.hi > 0 && self.left[self.hi as usize] == 0 {
                self.hi -= 1;
            }
        }
        (id, self.class_images[c])
    }
}

fn set(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

fn clear(bits: &mut [u64], i: usize) {
    bits[i / 64] &= !(1 << (i % 64));
}

/// Bits 0..=b of a word.
pub(super) fn mask_upto(b: usize) -> u64 {
    if b >= 63 {
        u64::MAX
    } else {
        (1u64 << (b + 1)) - 1
    }
}

/// The 64 bits of `bits` starting at bit `at` (bits outside the array read as 0).
pub(super) fn bits_at(bits: &[u64], at: i64) -> u64 {
    let word = |i: i64| if i >= 0 && (i as usize) < bits.len() { bits[i as usize] } else { 0 };
    let (w, b) = (at.div_euclid(64), at.rem_euclid(64) as u32);
    if b == 0 {
        word(w)
    } else {
        (word(w) >> b) | (word(w + 1) << (64 - b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn queries_agree_with_a_scan(lengths in prop::collection::vec(1u32..=300, 1..200), images in prop::collection::vec(0u32..4, 200), cap in 300u32..700, room in 0u32..800, budget in 0u32..8, by_images: bool) {
            let images = &images[..lengths.len()];
            let mut shelves = Shelves::new(&lengths, images, cap, by_images);
            let k = |i: usize| if by_images { images[i] } else { 0 };
            let mut left: Vec<bool> = vec![true; lengths.len()];
            // Take a few items, then compare every query with a scan of what is left.
            for step in 0..lengths.len() / 2 {
                let l = lengths[(step * 7) % lengths.len()];
                if shelves.has(l, u32::MAX) {
                    let (id, _) = shelves.take(l, u32::MAX);
                    prop_assert!(left[id as usize] && lengths[id as usize] == l);
                    left[id as usize] = false;
                }
            }
            let fewest = |l: u32| (0..lengths.len()).filter(|&i| left[i] && lengths[i] == l).map(k).min();
            let longest = (1..=room.min(cap)).rev().find(|&l| fewest(l).is_some_and(|f| f <= budget));
            prop_assert_eq!(shelves.longest_at_most(room, budget), longest);
            // Of several pairs the one with the longest b, i.e. the shortest a.
            let first = (1..=room / 2).map(|a| (a, room - a)).filter(|&(_, b)| b <= cap).find(|&(a, b)| {
                let na = (0..lengths.len()).filter(|&i| left[i] && lengths[i] == a).count();
                let nb = (0..lengths.len()).filter(|&i| left[i] && lengths[i] == b).count();
                if a == b {
                    let mut ks: Vec<u32> = (0..lengths.len()).filter(|&i| left[i] && lengths[i] == a).map(k).collect();
                    ks.sort();
                    na >= 2 && ks[0] + ks[1] <= budget
                } else { na >= 1 && nb >= 1 && fewest(a).unwrap() + fewest(b).unwrap() <= budget }
            });
            prop_assert_eq!(shelves.pair_summing_to(room, budget), first);
            let mut sorted: Vec<u32> = (0..lengths.len()).filter(|&i| left[i]).map(|i| lengths[i]).collect();
            sorted.sort_unstable();
            prop_assert_eq!(shelves.shortest(), sorted.first().copied());
            for q in [0.0, 0.3, 0.6, 0.999] {
                let rank = ((q * sorted.len() as f64) as usize).min(sorted.len().saturating_sub(1));
                prop_assert_eq!(shelves.quantile(q), sorted.get(rank).copied(), "quantile {}", q);
            }
        }
    }
}
