//! Cross-model comparison (the paper's CLIP-vs-DINOv2 features): two SAEs, each on its own
//! store of the same images in the same order, compared through every latent's per-image max
//! activation. One pass over both stores gives the whole latent-to-latent Pearson correlation
//! matrix (a GEMM of the standardised per-image maxima); from it each latent's best match and a
//! one-to-one matching that maximises the summed correlation (the Hungarian algorithm), whose
//! mean correlation is a model-to-model similarity figure.
//!
//! ```no_run
//! # let (sa, sb) = (saev::ActivationStore::open("acts/clip")?, saev::ActivationStore::open("acts/dino")?);
//! let a = saev::Explorer::open("runs/clip/0", &sa)?;
//! let b = saev::Explorer::open("runs/dino/0", &sb)?;
//! let m = a.match_latents(&b)?;
//! println!("{m}"); // mean matched correlation, the best pairs
//! # Ok::<(), saev::Error>(())
//! ```

use std::fmt;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::features::CodeEngine;
use super::Explorer;
use crate::error::{Error, Result};
use crate::sae::linalg::{gemm, Mat};
use crate::store::Tokens;
use crate::util::display::emit_text;

/// The result of [`Explorer::match_latents`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentMatching {
    /// Images compared.
    pub n_images: usize,
    /// Latents of each SAE that vary over the images (the others have no correlation).
    pub n_live: (usize, usize),
    /// For each live latent of the first SAE: (latent, its best match in the second, r).
    pub best: Vec<(usize, usize, f64)>,
    /// The one-to-one matching of live latents maximising Σ r: (first, second, r), by r.
    pub pairs: Vec<(usize, usize, f64)>,
    /// Mean r over `pairs`: the model-to-model similarity.
    pub mean_r: f64,
}

impl LatentMatching {
    /// Jupyter (evcxr) display: the summary and the best pairs as Markdown.
    pub fn evcxr_display(&self) {
        emit_text("text/markdown", &self.to_string());
    }
}

impl fmt::Display for LatentMatching {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} images; {} × {} live latents; one-to-one matching mean r {:.4}; mean best-match r {:.4}\n",
            self.n_images,
            self.n_live.0,
            self.n_live.1,
            self.mean_r,
            self.best.iter().map(|b| b.2).sum::<f64>() / self.best.len().max(1) as f64
        )?;
        writeln!(f, "| first | second | r |\n|---|---|---|")?;
        for &(a, b, r) in self.pairs.iter().take(20) {
            writeln!(f, "| {a} | {b} | {r:.4} |")?;
        }
        Ok(())
    }
}

/// Per-image max activation of every latent: `[n_images, d_sae]`, row-major, computed where
/// `ex` computes.
fn image_maxima(ex: &Explorer) -> Result<Vec<f32>> {
    let store = ex.store();
    let engine = CodeEngine::new(ex.sae(), ex.compute())?;
    let (p, s) = (store.n_patches(), ex.sae().d_sae());
    let mut out = Vec::with_capacity(store.n_examples() * s);
    let bar = crate::util::progress::bar(store.n_examples() as u64, "image maxima");
    for (_, x) in store.ordered(ex.features().layer(), Tokens::Patches, 16)? {
        let m = engine.example_maxima(x, p)?;
        bar.inc((m.len() / s.max(1)) as u64);
        out.extend(m);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// The columns of `x` (`[n, s]`) that vary, standardised (mean 0, unit norm), as rows
/// `[live, n]`; and which columns they are.
fn standardised_columns(x: &[f32], n: usize, s: usize) -> (Vec<f32>, Vec<usize>) {
    let cols: Vec<(usize, Vec<f32>)> = (0..s)
        .into_par_iter()
        .filter_map(|j| {
            let col: Vec<f64> = (0..n).map(|i| f64::from(x[i * s + j])).collect();
            let mean = col.iter().sum::<f64>() / n as f64;
            let ss: f64 = col.iter().map(|v| (v - mean) * (v - mean)).sum();
            (ss > 1e-12 * n as f64).then(|| {
                let norm = ss.sqrt();
                (j, col.iter().map(|v| ((v - mean) / norm) as f32).collect())
            })
        })
        .collect();
    let ids = cols.iter().map(|c| c.0).collect();
    (cols.into_iter().flat_map(|c| c.1).collect(), ids)
}

/// A maximum-weight one-to-one assignment of the rows of `w` (`[r, c]`, `r ≤ c`) to distinct
/// columns: the Hungarian algorithm with potentials (Kuhn–Munkres, O(r²c)), on costs `−w`.
/// Returns the column of each row.
pub fn max_weight_assignment(w: &[f64], r: usize, c: usize) -> Vec<usize> {
    assert!(r <= c && w.len() == r * c, "rows ≤ columns, w is [r, c]");
    // 1-based potentials u (rows), v (columns); p[j] = row matched to column j (0 = none).
    let (mut u, mut v) = (vec![0f64; r + 1], vec![0f64; c + 1]);
    let (mut p, mut way) = (vec![0usize; c + 1], vec![0usize; c + 1]);
    let cost = |i: usize, j: usize| -w[(i - 1) * c + (j - 1)];
    for i in 1..=r {
        p[0] = i;
        let mut j0 = 0usize;
        let mut minv = vec![f64::INFINITY; c + 1];
        let mut used = vec![false; c + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let (mut delta, mut j1) = (f64::INFINITY, 0usize);
            for j in 1..=c {
                if !used[j] {
                    let cur = cost(i0, j) - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=c {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut col_of = vec![0usize; r];
    for j in 1..=c {
        if p[j] > 0 {
            col_of[p[j] - 1] = j - 1;
        }
    }
    col_of
}

impl Explorer {
    /// Compare every latent of this SAE with every latent of `other` (module docs): the two
    /// stores must hold the same images in the same order.
    pub fn match_latents(&self, other: &Explorer) -> Result<LatentMatching> {
        let (sa, sb) = (self.store(), other.store());
        if sa.n_examples() != sb.n_examples() {
            return Err(Error::mismatch(
                "match_latents",
                format!("{} examples in the first store", sa.n_examples()),
                format!("{} in the second", sb.n_examples()),
                "the stores must hold the same images in the same order",
            ));
        }
        // Where both stores say where their examples came from, those must agree: a store of
        // other images of the same count would give correlations that mean nothing.
        if let (Some(pa), Some(pb)) = (sa.provenance(), sb.provenance()) {
            if let Some(e) = (0..sa.n_examples()).find(|&e| pa.sources.get(e) != pb.sources.get(e))
            {
                let src = |p: &crate::store::Provenance| {
                    p.sources.get(e).cloned().unwrap_or_else(|| "(none)".into())
                };
                return Err(Error::mismatch(
                    "match_latents",
                    format!("example {e} of {}: {}", sa.dir().display(), src(pa)),
                    format!("{} in {}", src(pb), sb.dir().display()),
                    "the stores must hold the same images in the same order",
                ));
            }
        }
        let n = sa.n_examples();
        let (s1, s2) = (self.sae().d_sae(), other.sae().d_sae());
        let (za, ia) = standardised_columns(&image_maxima(self)?, n, s1);
        let (zb, ib) = standardised_columns(&image_maxima(other)?, n, s2);
        let (la, lb) = (ia.len(), ib.len());
        if la == 0 || lb == 0 {
            return Err(Error::missing(
                "match_latents",
                "no latent varies over the images in one of the SAEs",
                "",
            ));
        }
        // r = Z_a Z_bᵀ: [la, n] × [n, lb].
        let mut corr = vec![0f32; la * lb];
        gemm(
            la,
            lb,
            n,
            &mut corr,
            0,
            lb,
            Mat::rows(&za, n),
            Mat::t(&zb, n),
            false,
        );
        let best = (0..la)
            .map(|i| {
                let row = &corr[i * lb..(i + 1) * lb];
                let (j, r) = row
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (j, &r)| if r > b.1 { (j, r) } else { b },
                    );
                (ia[i], ib[j], f64::from(r))
            })
            .collect();
        // One-to-one: the smaller side's latents each to a distinct latent of the other.
        let transpose = la > lb;
        let (r, c) = if transpose { (lb, la) } else { (la, lb) };
        let w: Vec<f64> = (0..r * c)
            .map(|k| {
                let (i, j) = (k / c, k % c);
                f64::from(if transpose {
                    corr[j * lb + i]
                } else {
                    corr[i * lb + j]
                })
            })
            .collect();
        let col_of = max_weight_assignment(&w, r, c);
        let mut pairs: Vec<(usize, usize, f64)> = col_of
            .iter()
            .enumerate()
            .map(|(i, &j)| {
                let r = w[i * c + j];
                if transpose {
                    (ia[j], ib[i], r)
                } else {
                    (ia[i], ib[j], r)
                }
            })
            .collect();
        pairs.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        let mean_r = pairs.iter().map(|p| p.2).sum::<f64>() / pairs.len() as f64;
        Ok(LatentMatching {
            n_images: n,
            n_live: (la, lb),
            best,
            pairs,
            mean_r,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Hungarian assignment equals the best of all permutations (brute force) on seeded
    /// random 6×6 and 4×7 weights.
    #[test]
    fn assignment_is_the_brute_force_optimum() {
        fn perms(
            k: usize,
            c: usize,
            used: &mut Vec<bool>,
            cur: &mut Vec<usize>,
            f: &mut dyn FnMut(&[usize]),
        ) {
            if cur.len() == k {
                f(cur);
                return;
            }
            for j in 0..c {
                if !used[j] {
                    used[j] = true;
                    cur.push(j);
                    perms(k, c, used, cur, f);
                    cur.pop();
                    used[j] = false;
                }
            }
        }
        for (seed, r, c) in [(1u64, 6usize, 6usize), (2, 4, 7), (3, 5, 5)] {
            let w: Vec<f64> = (0..r * c)
                .map(|k| {
                    (crate::util::rng::splitmix64(seed * 1000 + k as u64) >> 11) as f64
                        / (1u64 << 53) as f64
                        * 2.0
                        - 1.0
                })
                .collect();
            let mut best = f64::NEG_INFINITY;
            perms(r, c, &mut vec![false; c], &mut Vec::new(), &mut |a| {
                best = best.max(a.iter().enumerate().map(|(i, &j)| w[i * c + j]).sum());
            });
            let got = max_weight_assignment(&w, r, c);
            let mut seen = got.clone();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), r, "distinct columns");
            let total: f64 = got.iter().enumerate().map(|(i, &j)| w[i * c + j]).sum();
            assert!((total - best).abs() < 1e-12, "{total} vs {best}");
        }
    }
}
