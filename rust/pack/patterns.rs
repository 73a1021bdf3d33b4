//! The pattern packer for token budgets alone: like cutting-stock's sequential heuristic
//! (Haessler, "Controlling cutting pattern changes in one-dimensional trim problems",
//! Operations Research 23, 1975), each bin is opened by the longest item left and
//! completed by the subset of items left whose total comes closest to the room (a
//! bounded subset sum over the length histogram, as a bitset); the pattern found is then
//! repeated while the items it uses last. Costs follow the number of distinct lengths,
//! not of items.

use super::shelves::{bits_at, mask_upto, Shelves};

pub fn patterns(lengths: &[u32], capacity: u32) -> Vec<Vec<u32>> {
    let mut shelves = Shelves::new(lengths, &[], capacity, false);
    let mut bins = Vec::new();
    let words = capacity as usize / 64 + 1;
    let mut reach = vec![0u64; words];
    let mut snapshot = vec![0u64; words];
    let mut parent = vec![u32::MAX; capacity as usize + 1]; // chunk that first reached a sum
    let mut chunks: Vec<(u32, u32)> = Vec::new(); // (length, copies)
    while !shelves.is_empty() {
        let first = shelves.longest_at_most(capacity, u32::MAX).unwrap();
        let room = capacity - first;
        // Subset sum over what is left besides the opener.
        chunks.clear();
        reach.iter_mut().for_each(|w| *w = 0);
        reach[0] = 1;
        parent.iter_mut().take(room as usize + 1).for_each(|p| *p = u32::MAX);
        let mut l = shelves.longest_at_most(room, u32::MAX);
        let mut best = 0u32;
        'outer: while let Some(len) = l {
            let avail = shelves.count(len) - u32::from(len == first);
            let mut copies = avail.min(room / len);
            let mut size = 1;
            while copies > 0 {
                let take = size.min(copies);
                copies -= take;
                size *= 2;
                let w = len * take;
                let id = chunks.len() as u32;
                chunks.push((len, take));
                // reach |= reach << w for sums ≤ room, recording first reaches.
                snapshot.copy_from_slice(&reach);
                for i in (w as usize / 64)..=(room as usize / 64) {
                    let mut new = bits_at(&snapshot, i as i64 * 64 - w as i64) & !reach[i];
                    if i == room as usize / 64 {
                        new &= mask_upto(room as usize % 64);
                    }
                    reach[i] |= new;
                    while new != 0 {
                        let s = i * 64 + new.trailing_zeros() as usize;
                        new &= new - 1;
                        parent[s] = id;
                        best = best.max(s as u32);
                    }
                }
                if best == room {
                    break 'outer;
                }
            }
            l = if len > 1 { shelves.longest_at_most(len - 1, u32::MAX) } else { None };
        }
        // The pattern: opener plus the chunks on the path to `best`.
        let mut pattern: Vec<(u32, u32)> = vec![(first, 1)];
        let mut s = best;
        while s > 0 {
            let (len, take) = chunks[parent[s as usize] as usize];
            match pattern.iter_mut().find(|(l, _)| *l == len) {
                Some(p) => p.1 += take,
                None => pattern.push((len, take)),
            }
            s -= len * take;
        }
        let repeat = pattern.iter().map(|&(len, k)| shelves.count(len) / k).min().unwrap().max(1);
        for _ in 0..repeat {
            let mut bin = Vec::new();
            for &(len, k) in &pattern {
                for _ in 0..k {
                    bin.push(shelves.take(len, u32::MAX).0);
                }
            }
            bins.push(bin);
        }
    }
    bins
}
