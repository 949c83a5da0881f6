//! The one seeded generator every module uses (splitmix64, Steele et al. 2014): seeds for
//! permutations, initialisation, held-out splits, control latents and directions, composites.
//! Deterministic across machines and versions, so runs reproduce from their seeds.
//!
//! ```text
//! let a = splitmix64(42);          // a well-mixed 64-bit value
//! let b = splitmix64(a);           // the next one in the stream
//! ```

/// The splitmix64 output function of `z` (advance `z` by the golden-ratio increment, then mix).
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values() {
        // splitmix64 with state 0: first output of the reference C implementation.
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }
}
