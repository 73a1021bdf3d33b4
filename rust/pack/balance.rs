//! Images spread evenly over sequences (`[output] balance = "images"`): a rank whose
//! sequence holds 20 images waits on the vision tower while the others, with 2, idle. The
//! packing is redone under the tightest image cap that costs at most `TOLERANCE` more
//! sequences than the packing without it; with each sequence at most that cap and the
//! images' total fixed, counts cannot stray far below it either.

use super::{tight, Budget, Packer};

/// More sequences than the unbalanced packing that balancing may cost, as a share.
pub const TOLERANCE: f64 = 0.005;

/// The packing under `budget` with images balanced, and the image cap it used (`None`
/// when no cap was within the tolerance, or there are no images).
pub fn balanced(lengths: &[u32], images: &[u32], budget: Budget) -> (Vec<Vec<u32>>, Packer, Option<u32>) {
    let (bins, packer) = tight(lengths, images, budget);
    let total: u64 = images.iter().map(|&k| k as u64).sum();
    if total == 0 || bins.is_empty() {
        return (bins, packer, budget.images);
    }
    let per_bin = |bins: &[Vec<u32>]| bins.iter().map(|b| b.iter().map(|&i| images[i as usize]).sum::<u32>()).max().unwrap_or(0);
    let widest = images.iter().copied().max().unwrap_or(0);
    let lo = widest.max(total.div_ceil(bins.len() as u64) as u32);
    let hi = budget.images.unwrap_or(u32::MAX).min(per_bin(&bins));
    let allowed = bins.len() + (bins.len() as f64 * TOLERANCE).floor() as usize;
    // The smallest cap in lo..=hi whose packing stays within `allowed` (searched as if
    // the count of sequences only fell as the cap rises, which the packers nearly keep).
    let (mut lo, mut hi) = (lo, hi);
    let mut found: Option<(Vec<Vec<u32>>, Packer, u32)> = None;
    while lo <= hi {
        let cap = lo + (hi - lo) / 2;
        let (b, p) = tight(lengths, images, Budget { tokens: budget.tokens, images: Some(cap) });
        if b.len() <= allowed {
            found = Some((b, p, cap));
            match cap.checked_sub(1) {
                Some(below) => hi = below,
                None => break,
            }
        } else {
            lo = cap + 1;
        }
    }
    match found {
        Some((b, p, cap)) => (b, p, Some(cap)),
        None => (bins, packer, budget.images),
    }
}
