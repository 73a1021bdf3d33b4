//! Counter-based randomness: every random choice is a pure function of
//! (recipe seed, stream name, index, purpose), so it does not depend on thread count,
//! batch boundaries or on any other source of the recipe.

/// Purposes keep independent decisions about the same row uncorrelated.
pub const PURPOSE_TEMPLATE: u64 = 0x7465_6d70;
pub const PURPOSE_SUBSET: u64 = 0x7375_6273;
pub const PURPOSE_SHUFFLE: u64 = 0x7368_7566;
pub const PURPOSE_LENGTHEN: u64 = 0x6c65_6e67;
pub const PURPOSE_EPOCH: u64 = 0x6570_6f63;
/// The samples the fast tokenizer engine's output is also checked against HF's.
pub const PURPOSE_SHADOW: u64 = 0x7368_6164;

/// The seed of `epoch`: the recipe's own for epoch 0 (so a one-epoch release is what it
/// was before epochs existed), a keyed derivation of it for every later epoch.
pub fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    if epoch == 0 {
        seed
    } else {
        keyed(seed, name_hash("mmrecipe/epoch"), epoch, PURPOSE_EPOCH)
    }
}

/// SplitMix64 finalizer: a bijective 64-bit mixer with full avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a: a stable hash of a stream name (source names, fixed labels).
pub fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// The random word for (seed, stream, index, purpose).
#[inline]
pub fn keyed(seed: u64, stream: u64, index: u64, purpose: u64) -> u64 {
    mix64(mix64(mix64(mix64(seed) ^ stream) ^ purpose) ^ index)
}

/// Maps a random word to 0..n without modulo bias worth noting (Lemire's multiply-shift).
#[inline]
pub fn below(word: u64, n: u64) -> u64 {
    ((word as u128 * n as u128) >> 64) as u64
}

/// A deterministic Fisher-Yates shuffle driven by `keyed`.
pub fn shuffle<T>(items: &mut [T], seed: u64, stream: u64) {
    for i in (1..items.len()).rev() {
        let j = below(keyed(seed, stream, i as u64, PURPOSE_SHUFFLE), i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_zero_keeps_the_seed_and_later_epochs_differ() {
        for seed in [0u64, 7, u64::MAX >> 1] {
            assert_eq!(epoch_seed(seed, 0), seed);
            let later: std::collections::HashSet<u64> = (1..50).map(|e| epoch_seed(seed, e)).collect();
            assert_eq!(later.len(), 49);
            assert!(!later.contains(&seed));
            assert_eq!(epoch_seed(seed, 3), epoch_seed(seed, 3));
        }
    }

    #[test]
    fn keyed_is_pure_and_sensitive() {
        assert_eq!(keyed(1, 2, 3, 4), keyed(1, 2, 3, 4));
        assert_ne!(keyed(1, 2, 3, 4), keyed(1, 2, 4, 4));
        assert_ne!(keyed(1, 2, 3, 4), keyed(2, 2, 3, 4));
        assert_ne!(keyed(1, 2, 3, 4), keyed(1, 2, 3, 5));
    }

    #[test]
    fn below_covers_range_roughly_uniformly() {
        let mut counts = [0u32; 7];
        for i in 0..70_000 {
            counts[below(keyed(9, 0, i, 0), 7) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..1000).collect();
        shuffle(&mut v, 5, name_hash("x"));
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
        assert_ne!(v, s);
    }
}
