//! Lower bounds on the number of sequences any packing needs, to measure a packing by.
//! All are computed from the length histogram in O(n + capacity).

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Bounds {
    /// ⌈Σ lengths / capacity⌉.
    pub l1: u64,
    /// Martello & Toth's L2 ("Lower bounds and reduction procedures for the bin packing
    /// problem", Discrete Applied Mathematics 28, 1990): items longer than half a bin
    /// each need their own, and the shorter ones must fit in what those leave.
    pub l2: u64,
    /// Counting: a bin holds at most t items longer than capacity / (t + 1).
    pub count: u64,
    /// Fekete & Schepers' dual feasible functions u⁽ᵏ⁾ ("New classes of fast lower bounds
    /// for bin packing problems", Math. Programming 91, 2001): each item's length rounded
    /// up to a multiple of C/k by how many of its size fit a bin, for k = 1..=64.
    pub dff: u64,
    /// ⌈Σ images / max_images⌉ under an image budget (else 0).
    pub images: u64,
    /// The largest of the above: no packing uses fewer bins.
    pub best: u64,
}

/// The bounds for `lengths` (each in 1..=capacity) in bins of `capacity` tokens, and
/// `max_images` images per bin when given.
pub fn bounds(lengths: &[u32], images: &[u32], capacity: u32, max_images: Option<u32>) -> Bounds {
    let c = capacity as usize;
    let mut count = vec![0u64; c + 1];
    for &l in lengths {
        count[l as usize] += 1;
    }
    let total: u64 = lengths.iter().map(|&l| l as u64).sum();
    let l1 = total.div_ceil(capacity as u64);
    let l2 = martello_toth_l2(&count, capacity);
    let by_count = counting(&count, capacity);
    let dff = fekete_schepers(&count, capacity);
    let images = match max_images {
        Some(m) if m > 0 => images.iter().map(|&k| k as u64).sum::<u64>().div_ceil(m as u64),
        _ => 0,
    };
    Bounds { l1, l2, count: by_count, dff, images, best: l1.max(l2).max(by_count).max(dff).max(images) }
}

/// L2 = max over α ∈ [0, C/2] of |J1| + |J2| + max(0, ⌈(Σ J3 − (|J2|·C − Σ J2)) / C⌉), with
/// J1 = items > C − α, J2 = items in (C/2, C − α], J3 = items in [α, C/2].
fn martello_toth_l2(count: &[u64], capacity: u32) -> u64 {
    let c = capacity as u64;
    // Suffix counts and sums: n_ge[l] = items of length ≥ l, s_ge[l] their total.
    let n = count.len();
    let (mut n_ge, mut s_ge) = (vec![0u64; n + 1], vec![0u64; n + 1]);
    for l in (0..n).rev() {
        n_ge[l] = n_ge[l + 1] + count[l];
        s_ge[l] = s_ge[l + 1] + count[l] * l as u64;
    }
    let range = |lo: u64, hi: u64| -> (u64, u64) {
        // Items with lo ≤ length ≤ hi.
        if lo > hi || lo as usize >= n {
            return (0, 0);
        }
        let hi = (hi as usize).min(n - 1);
        (n_ge[lo as usize] - n_ge[hi + 1], s_ge[lo as usize] - s_ge[hi + 1])
    };
    let half = c / 2;
    let mut best = 0;
    for alpha in 0..=half {
        let (j1, _) = range(c - alpha + 1, c);
        let (j2, s2) = range(half + 1, c - alpha);
        let (_, s3) = range(alpha.max(1), half);
        let room = j2 * c - s2;
        let rest = s3.saturating_sub(room).div_ceil(c);
        best = best.max(j1 + j2 + rest);
    }
    best
}

/// max over k of ⌈Σ u⁽ᵏ⁾(x) / C⌉ with u⁽ᵏ⁾(x) = x when (k+1)·x/C is whole, else
/// ⌊(k+1)·x/C⌋·C/k; summed as k·u⁽ᵏ⁾ to stay in integers.
fn fekete_schepers(count: &[u64], capacity: u32) -> u64 {
    let c = capacity as u64;
    let mut best = 0;
    for k in 1..=64u64 {
        let mut total = 0u64; // Σ k·u(x)
        for (x, &n) in count.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let x = x as u64;
            let ku = if ((k + 1) * x) % c == 0 { k * x } else { ((k + 1) * x / c) * c };
            total += n * ku;
        }
        best = best.max(total.div_ceil(k * c));
    }
    best
}

/// max over t ≥ 1 of ⌈|{items > C/(t+1)}| / t⌉.
fn counting(count: &[u64], capacity: u32) -> u64 {
    let c = capacity as u64;
    let n = count.len();
    let mut n_gt = vec![0u64; n + 1];
    for l in (0..n).rev() {
        n_gt[l] = n_gt[l + 1] + count[l];
    }
    let mut best = 0;
    for t in 1..=c {
        // Items of length > C/(t+1): length ≥ ⌊C/(t+1)⌋ + 1.
        let lo = (c / (t + 1) + 1) as usize;
        if lo >= n {
            continue;
        }
        best = best.max(n_gt[lo].div_ceil(t));
        if lo <= 1 {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bound_on_a_case_it_is_made_for() {
        // Three items of 6 in bins of 10: L1 = 2, but no two share a bin.
        let b = bounds(&[6, 6, 6], &[0; 3], 10, None);
        assert_eq!((b.l1, b.l2, b.best), (2, 3, 3));
        // Seven items of 4 in bins of 10: at most two per bin, so 4 bins; L1 = 3.
        let b = bounds(&[4; 7], &[0; 7], 10, None);
        assert_eq!((b.l1, b.count, b.best), (3, 4, 4));
        // Nine images, at most four per bin.
        let b = bounds(&[1, 1, 1], &[3, 3, 3], 10, Some(4));
        assert_eq!((b.l1, b.images, b.best), (1, 3, 3));
    }
}
