//! Exact mixtures: weights become integer counts by the largest-remainder method; each
//! source contributes whole passes over its rows plus a deterministic subset; sources are
//! interleaved by the greedy deficit rule so every prefix tracks the target shares.

use crate::rng;

/// Integer counts summing to `total`, proportional to `weights` (largest remainder;
/// ties go to the earlier source).
pub fn largest_remainder(weights: &[f64], total: u64) -> Vec<u64> {
    let sum: f64 = weights.iter().sum();
    if weights.is_empty() || sum <= 0.0 {
        return vec![0; weights.len()];
    }
    let quotas: Vec<f64> = weights.iter().map(|w| w / sum * total as f64).collect();
    let mut counts: Vec<u64> = quotas.iter().map(|q| q.floor() as u64).collect();
    let assigned: u64 = counts.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = quotas[a] - quotas[a].floor();
        let rb = quotas[b] - quotas[b].floor();
        rb.partial_cmp(&ra).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
    });
    for &i in order.iter().cycle().take(total.saturating_sub(assigned) as usize) {
        counts[i] += 1;
    }
    counts
}

/// One selected sample: its index among the source's usable samples and its repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: u32,
    pub repeat: u32,
}

/// (keyed hash, index) per row: sorting by it gives the row order partial passes take,
/// a pure function of (seed, source, row id).
fn subset_keys(row_ids: &[u64], seed: u64, source: u64) -> Vec<(u64, u32)> {
    row_ids.iter().enumerate().map(|(i, &row)| (rng::keyed(seed, source, row, rng::PURPOSE_SUBSET), i as u32)).collect()
}

/// `count` picks from `n` samples: whole passes in order, then a subset chosen by a keyed
/// hash of (seed, source, row id), so no row appears twice within one pass.
pub fn select(row_ids: &[u64], count: u64, seed: u64, source: u64) -> Vec<Pick> {
    let n = row_ids.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    let passes = count / n;
    let rest = (count % n) as usize;
    let mut picks = Vec::with_capacity(count as usize);
    for r in 0..passes {
        picks.extend((0..n as u32).map(|i| Pick { index: i, repeat: r as u32 }));
    }
    if rest > 0 {
        let mut order = subset_keys(row_ids, seed, source);
        order.select_nth_unstable(rest - 1);
        let mut chosen: Vec<u32> = order[..rest].iter().map(|&(_, i)| i).collect();
        chosen.sort_unstable();
        picks.extend(chosen.into_iter().map(|i| Pick { index: i, repeat: passes as u32 }));
    }
    picks
}

/// Shares for temperature sampling: weight × size^alpha (alpha = 0 keeps the weights).
pub fn effective_weights(weights: &[f64], sizes: &[u64], alpha: f64) -> Vec<f64> {
    weights.iter().zip(sizes).map(|(w, &n)| if alpha == 0.0 { *w } else { w * (n as f64).powf(alpha) }).collect()
}

/// Picks whose lengths add up to `target` tokens: whole passes while a pass fits, then
/// rows in keyed-hash order until the target is reached (the last pick may overshoot).
pub fn select_tokens(row_ids: &[u64], lengths: &[u32], target: u64, seed: u64, source: u64) -> Vec<Pick> {
    let pass: u64 = lengths.iter().map(|&l| l as u64).sum();
    if pass == 0 || target == 0 {
        return Vec::new();
    }
    let passes = target / pass;
    let mut picks = Vec::new();
    for r in 0..passes {
        picks.extend((0..row_ids.len() as u32).map(|i| Pick { index: i, repeat: r as u32 }));
    }
    let mut left = target - passes * pass;
    if left > 0 {
        let mut order = subset_keys(row_ids, seed, source);
        order.sort_unstable();
        let mut chosen = Vec::new();
        for (_, i) in order {
            if left == 0 {
                break;
            }
            chosen.push(i);
            left = left.saturating_sub(lengths[i as usize] as u64);
        }
        chosen.sort_unstable();
        picks.extend(chosen.into_iter().map(|i| Pick { index: i, repeat: passes as u32 }));
    }
    picks
}

/// The source of each position, so that at every prefix of length t each source's count
/// stays within 1 of its target share count × t / total (within C = 1 − 1/(2n − 2) for n
/// sources: Tijdeman's chairman assignment). With w = count / total, the k-th pick of a
/// source may not come before (k − C) / w and is due by (k − 1 + C) / w; each position
/// goes to the released source due first, ties to the earlier source. (Taking the source
/// furthest below its share, the plain greedy deficit rule, can drift past 1 with five
/// or more sources.)
pub fn interleave(counts: &[u64]) -> Vec<u16> {
    let total: u64 = counts.iter().sum();
    let n = counts.iter().filter(|&&c| c > 0).count().max(2) as u128;
    // In units of 1 / (2n − 2): C = (2n − 3) / (2n − 2).
    let unit = 2 * n - 2;
    let c_units = 2 * n - 3;
    let mut taken = vec![0u64; counts.len()];
    let mut order = Vec::with_capacity(total as usize);
    for t in 1..=total as u128 {
        let mut best: Option<(u128, u128, usize)> = None; // (deadline numerator, count, source)
        let mut fallback: Option<(u128, u128, usize)> = None;
        for (s, (&c, &k)) in counts.iter().zip(&taken).enumerate() {
            if k >= c {
                continue;
            }
            let (c, k) = (c as u128, k as u128 + 1);
            // Released: t ≥ (k − C)·total / c.
            let released = t * c * unit >= (k * unit - c_units) * total as u128;
            // Due: (k − 1 + C)·total / c, compared as numerator / c.
            let due = ((k - 1) * unit + c_units, c, s);
            let earlier = |b: &Option<(u128, u128, usize)>| b.is_none_or(|(num, den, _)| due.0 * den < num * due.1);
            if released && earlier(&best) {
                best = Some(due);
            }
            if earlier(&fallback) {
                fallback = Some(due);
            }
        }
        let (_, _, s) = best.or(fallback).expect("some source still has picks left");
        taken[s] += 1;
        order.push(s as u16);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_bound_holds_where_the_greedy_deficit_rule_fails() {
        let counts = [5u64, 15, 2, 142, 181];
        let order = interleave(&counts);
        let total: u64 = counts.iter().sum();
        let mut taken = [0u64; 5];
        for (t, &s) in order.iter().enumerate() {
            taken[s as usize] += 1;
            for (k, c) in taken.iter().zip(counts) {
                assert!((*k as f64 - (c * (t as u64 + 1)) as f64 / total as f64).abs() < 1.0);
            }
        }
    }

    proptest! {
        #[test]
        fn counts_are_exact(weights in prop::collection::vec(0.01f64..100.0, 1..8), total in 0u64..10_000) {
            let c = largest_remainder(&weights, total);
            prop_assert_eq!(c.iter().sum::<u64>(), total);
            let sum: f64 = weights.iter().sum();
            for (w, k) in weights.iter().zip(&c) {
                prop_assert!((*k as f64 - w / sum * total as f64).abs() < 1.0 + 1e-9);
            }
        }

        #[test]
        fn every_prefix_within_one(counts in prop::collection::vec(0u64..200, 1..9)) {
            let order = interleave(&counts);
            let total: u64 = counts.iter().sum();
            prop_assert_eq!(order.len() as u64, total);
            let mut taken = vec![0u64; counts.len()];
            for (t, &s) in order.iter().enumerate() {
                taken[s as usize] += 1;
                for (k, &c) in taken.iter().zip(&counts) {
                    let target = c as f64 * (t + 1) as f64 / total as f64;
                    prop_assert!((*k as f64 - target).abs() < 1.0 + 1e-9, "t={} taken={:?} counts={:?}", t, taken, counts);
                }
            }
            prop_assert_eq!(taken, counts);
        }

        #[test]
        fn selection_counts_and_passes(n in 1usize..50, count in 0u64..300, seed in 0u64..5) {
            let rows: Vec<u64> = (0..n as u64).map(|r| r * 3).collect();
            let picks = select(&rows, count, seed, 1);
            prop_assert_eq!(picks.len() as u64, count);
            let mut seen = std::collections::HashSet::new();
            for p in &picks {
                prop_assert!(seen.insert((p.index, p.repeat)), "row twice in one pass");
                prop_assert!((p.index as usize) < n);
            }
        }
    }

    #[test]
    fn token_selection_reaches_its_target_by_less_than_one_sample() {
        let rows: Vec<u64> = (0..50).collect();
        let lengths: Vec<u32> = (0..50).map(|i| 10 + (i * 37 % 90) as u32).collect();
        for target in [0u64, 1, 100, 2_999, 3_000, 10_000, 25_432] {
            let picks = select_tokens(&rows, &lengths, target, 1, 2);
            let sum: u64 = picks.iter().map(|p| lengths[p.index as usize] as u64).sum();
            assert!(sum >= target, "{target}");
            let last = picks.last().map(|p| lengths[p.index as usize] as u64).unwrap_or(0);
            assert!(sum < target + last.max(1) + 90, "{target}: {sum}");
        }
    }

    #[test]
    fn temperature_flattens_shares() {
        let w = effective_weights(&[1.0, 1.0], &[100, 10_000], 0.5);
        assert!((w[1] / w[0] - 10.0).abs() < 1e-9);
        assert_eq!(effective_weights(&[2.0, 1.0], &[5, 7], 0.0), vec![2.0, 1.0]);
    }

    #[test]
    fn subset_depends_only_on_its_own_source() {
        let rows: Vec<u64> = (0..100).collect();
        assert_eq!(select(&rows, 130, 7, 11), select(&rows, 130, 7, 11));
        assert_ne!(select(&rows, 130, 7, 11), select(&rows, 130, 7, 12));
    }
}
