//! Best-fit-decreasing packing over the whole build: items sorted longest first, each
//! placed in the bin whose remaining room fits it most tightly, found in O(log L) through
//! an ordered map from remaining room to bins.

use std::collections::BTreeMap;

/// Bins of item indices; no bin's total exceeds `capacity`. Items longer than the
/// capacity must be removed beforehand. Deterministic: ties break by item index and by
/// the most recently opened bin.
pub fn best_fit_decreasing(lengths: &[u32], capacity: u32) -> Vec<Vec<u32>> {
    let mut order: Vec<u32> = (0..lengths.len() as u32).collect();
    order.sort_by(|&a, &b| lengths[b as usize].cmp(&lengths[a as usize]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<u32>> = Vec::new();
    let mut by_room: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for item in order {
        let len = lengths[item as usize];
        assert!(len <= capacity, "item {item} of length {len} exceeds the bin capacity {capacity}");
        let fit = by_room.range_mut(len..).next().map(|(&room, ids)| (room, ids.pop().unwrap(), ids.is_empty()));
        let (bin, room) = match fit {
            Some((room, bin, emptied)) => {
                if emptied {
                    by_room.remove(&room);
                }
                (bin, room)
            }
            None => {
                bins.push(Vec::new());
                ((bins.len() - 1) as u32, capacity)
            }
        };
        bins[bin as usize].push(item);
        let left = room - len;
        if left > 0 {
            by_room.entry(left).or_default().push(bin);
        }
    }
    bins
}

/// The fewest bins any packing could use: ⌈Σ lengths / capacity⌉.
pub fn lower_bound(lengths: &[u32], capacity: u32) -> u64 {
    let total: u64 = lengths.iter().map(|&l| l as u64).sum();
    total.div_ceil(capacity as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_item_once_and_no_bin_overflows(lengths in prop::collection::vec(1u32..=100, 0..400), cap in 100u32..300) {
            let bins = best_fit_decreasing(&lengths, cap);
            let mut seen = vec![0u32; lengths.len()];
            for b in &bins {
                let sum: u32 = b.iter().map(|&i| lengths[i as usize]).sum();
                prop_assert!(sum <= cap);
                prop_assert!(!b.is_empty());
                for &i in b { seen[i as usize] += 1; }
            }
            prop_assert!(seen.iter().all(|&c| c == 1));
            // BFD never uses more than 11/9·OPT + 6/9 bins.
            let lb = lower_bound(&lengths, cap);
            prop_assert!(bins.len() as f64 <= 11.0 / 9.0 * lb as f64 + 1.0);
        }
    }

    #[test]
    fn fills_tightly() {
        let bins = best_fit_decreasing(&[6, 4, 5, 5, 3, 7], 10);
        assert_eq!(bins.len(), 3);
        assert_eq!(bins, vec![vec![5, 4], vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn deterministic() {
        let l: Vec<u32> = (0..1000).map(|i| (i * 7919 % 500 + 1) as u32).collect();
        assert_eq!(best_fit_decreasing(&l, 1024), best_fit_decreasing(&l, 1024));
    }
}
