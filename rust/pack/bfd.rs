//! Best-fit decreasing: items sorted longest first, each placed in the bin whose
//! remaining room fits it most tightly, found in O(log n) through an ordered map from
//! remaining room to bins. Under an image budget there is one such map per remaining
//! image room, and an item looks only in those with room for its images.

use super::Budget;
use std::collections::BTreeMap;

/// Bins of item indices under `budget`. Items that do not fit an empty bin must be
/// removed beforehand. Deterministic: ties break by item index and by the most recently
/// opened bin.
pub fn best_fit_decreasing(lengths: &[u32], images: &[u32], budget: Budget) -> Vec<Vec<u32>> {
    let capacity = budget.tokens;
    let image_cap = budget.images.unwrap_or(0);
    let classes = if budget.images.is_some() { image_cap as usize + 1 } else { 1 };
    let mut order: Vec<u32> = (0..lengths.len() as u32).collect();
    order.sort_by(|&a, &b| lengths[b as usize].cmp(&lengths[a as usize]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<u32>> = Vec::new();
    // by_room[m][room]: the open bins with `room` tokens and `m` images left.
    let mut by_room: Vec<BTreeMap<u32, Vec<u32>>> = vec![BTreeMap::new(); classes];
    for item in order {
        let len = lengths[item as usize];
        let k = if budget.images.is_some() { images[item as usize] } else { 0 };
        assert!(len <= capacity && k <= image_cap, "item {item} ({len} tokens, {k} images) does not fit an empty bin");
        // The tightest room ≥ len over image rooms ≥ k; ties go to the tighter image room.
        let mut fit: Option<(u32, usize)> = None;
        for (m, map) in by_room.iter().enumerate().skip(k as usize) {
            if let Some((&room, _)) = map.range(len..).next() {
                if fit.is_none_or(|(best, _)| room < best) {
                    fit = Some((room, m));
                }
            }
        }
        let (bin, room, image_room) = match fit {
            Some((room, m)) => {
                let ids = by_room[m].get_mut(&room).unwrap();
                let bin = ids.pop().unwrap();
                if ids.is_empty() {
                    by_room[m].remove(&room);
                }
                (bin, room, m as u32)
            }
            None => {
                bins.push(Vec::new());
                ((bins.len() - 1) as u32, capacity, image_cap)
            }
        };
        bins[bin as usize].push(item);
        let left = room - len;
        if left > 0 {
            by_room[(image_room - k) as usize].entry(left).or_default().push(bin);
        }
    }
    bins
}
