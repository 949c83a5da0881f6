//! A seeded pseudo-random permutation of `0..n` in O(1) memory: a 4-round Feistel network on the
//! smallest even-bit domain ≥ n, with cycle-walking to stay inside `0..n`.
//!
//! The shuffled loader uses it so that every vector is visited exactly once per epoch, in an
//! order fixed by the seed, whatever the store size — no index array of `n` entries.
//!
//! ```text
//! let p = Permutation::new(10, 42);
//! let order: Vec<u64> = (0..10).map(|i| p.apply(i)).collect(); // a shuffle of 0..10
//! ```

use crate::util::rng::splitmix64;

/// A bijection on `0..n`.
#[derive(Debug, Clone)]
pub(crate) struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    /// A permutation of `0..n` determined by `seed`.
    pub(crate) fn new(n: u64, seed: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let mut s = seed;
        let keys = [0; 4].map(|_| {
            s = splitmix64(s);
            s
        });
        Self { n, half_bits, keys }
    }

    fn round(&self, x: u64, k: u64) -> u64 {
        splitmix64(x ^ k) & ((1u64 << self.half_bits) - 1)
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for &k in &self.keys {
            let t = l ^ self.round(r, k);
            l = r;
            r = t;
        }
        (l << self.half_bits) | r
    }

    /// `n`.
    pub(crate) fn len(&self) -> u64 {
        self.n
    }

    /// The image of `i` (`i < n`).
    pub(crate) fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        // The Feistel domain is at most 4n, so the expected walk is short.
        let mut x = self.feistel(i);
        while x >= self.n {
            x = self.feistel(x);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_permutation() {
        for n in [1u64, 2, 3, 10, 255, 256, 1000, 4097] {
            let p = Permutation::new(n, 7);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i) as usize;
                assert!(!seen[j], "n={n}: {j} twice");
                seen[j] = true;
            }
        }
    }

    #[test]
    fn seeds_differ_and_order_is_mixed() {
        let a: Vec<u64> = (0..1000)
            .map(|i| Permutation::new(1000, 1).apply(i))
            .collect();
        let b: Vec<u64> = (0..1000)
            .map(|i| Permutation::new(1000, 2).apply(i))
            .collect();
        assert_ne!(a, b);
        // Not close to the identity: few fixed points, and the first 100 outputs spread out.
        assert!(
            a.iter()
                .enumerate()
                .filter(|(i, &v)| *i as u64 == v)
                .count()
                < 10
        );
        let mean = a[..100].iter().sum::<u64>() as f64 / 100.0;
        assert!((mean - 500.0).abs() < 100.0, "{mean}");
    }
}
