//! Held-out evaluation of an [`Sae`] on a store: reconstruction (MSE, NMSE, explained
//! variance, in the SAE's normalised space, f64 sums), sparsity (L0), and per-latent firing
//! frequency and mean value, with dead (never fired), almost dead (frequency < 1e-7) and dense
//! (frequency > 1e-2) counts.
//!
//! ```no_run
//! # use saev::{ActivationStore, store::Examples, Sae, store::Tokens};
//! let store = ActivationStore::open("acts/1a2b3c4d")?;
//! let sae = Sae::load("runs/a/0")?;
//! // The trainer's held-out examples (5% of the store, split seed = the config's seed 0).
//! let held_out = Examples::held_out(store.n_examples() / 20, 0);
//! let ev = sae.evaluate(&store, -2, Tokens::Patches, held_out)?;
//! println!("{ev}");
//! # Ok::<(), saev::Error>(())
//! ```

use std::fmt;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::model::Sae;
use crate::error::{CandleContext, Computing, Error, Result};
use crate::store::{ActivationStore, Examples, Tokens};

/// Frequency below which a latent that fired at least once is "almost dead".
pub const ALMOST_DEAD_FREQ: f64 = 1e-7;
/// Frequency above which a latent is "dense".
pub const DENSE_FREQ: f64 = 1e-2;

/// The result of [`Sae::evaluate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Which store examples were evaluated.
    pub examples: Examples,
    /// How many.
    pub n_examples: usize,
    /// Vectors evaluated.
    pub n_vectors: u64,
    /// Mean squared error per element.
    pub mse: f64,
    /// Σ‖x̂ − x‖² / Σ‖x − x̄‖².
    pub nmse: f64,
    /// 1 − Var(x − x̂) / Var(x) (per-dimension variances, summed).
    pub explained_variance: f64,
    /// Mean active latents per vector.
    pub l0: f64,
    /// Per latent: fraction of vectors it fired on.
    pub freq: Vec<f64>,
    /// Per latent: mean value when firing (0 if never).
    pub mean_value: Vec<f64>,
    /// Latents that never fired.
    pub n_dead: usize,
    /// Latents with 0 < frequency < [`ALMOST_DEAD_FREQ`].
    pub n_almost_dead: usize,
    /// Latents with frequency > [`DENSE_FREQ`].
    pub n_dense: usize,
}

impl fmt::Display for Evaluation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| metric | value |\n|---|---|")?;
        writeln!(
            f,
            "| vectors ({} examples: {}) | {} |",
            self.n_examples, self.examples, self.n_vectors
        )?;
        writeln!(f, "| MSE | {:.5} |", self.mse)?;
        writeln!(f, "| NMSE | {:.4} |", self.nmse)?;
        writeln!(f, "| explained variance | {:.4} |", self.explained_variance)?;
        writeln!(f, "| L0 | {:.1} |", self.l0)?;
        writeln!(
            f,
            "| dead / almost dead / dense | {} / {} / {} of {} |",
            self.n_dead,
            self.n_almost_dead,
            self.n_dense,
            self.freq.len()
        )
    }
}

impl Sae {
    /// Evaluate on some examples of `store` (a range `(start, end)` or an [`Examples`] split;
    /// layer, tokens as recorded).
    pub fn evaluate(
        &self,
        store: &ActivationStore,
        layer: i64,
        tokens: Tokens,
        examples: impl Into<Examples>,
    ) -> Result<Evaluation> {
        let examples = examples.into();
        let (d, s) = (self.d_model(), self.d_sae());
        if store.d_model() != d {
            return Err(Error::Shape {
                what: format!("SAE d_model vs store {} (d_model)", store.dir().display()),
                expected: vec![d],
                actual: vec![store.d_model()],
            });
        }
        let per = (4096 / store.tokens_per_example().max(1)).max(1);
        let (mut sq, mut n_vec, mut l0) = (0f64, 0u64, 0f64);
        let (mut sum_x, mut sum_x2) = (vec![0f64; d], vec![0f64; d]);
        let (mut sum_e, mut sum_e2) = (vec![0f64; d], vec![0f64; d]);
        let (mut count, mut total) = (vec![0u64; s], vec![0f64; s]);
        let n_ex = examples.ids(store.n_examples())?.len();
        let bar = crate::util::progress::bar(n_ex as u64, "evaluating");
        for (ids, x) in store.ordered_examples(layer, tokens, per, examples.clone())? {
            let n = x.len() / d;
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                let per_ex = n / ids.len().max(1);
                return Err(Error::Store {
                    path: store.dir().to_path_buf(),
                    msg: format!(
                        "non-finite value {} in held-out example {}, token {} of layer {layer} ({tokens:?}), dimension {}",
                        x[i],
                        ids[i / d / per_ex.max(1)],
                        (i / d) % per_ex.max(1),
                        i % d
                    ),
                });
            }
            let xt = Tensor::from_vec(x, (n, d), &Device::Cpu)?;
            let xn = self.normalize(&xt)?;
            let f = self.encode(&xt)?;
            let xh = self.decode(&f)?;
            let to_host = || -> Result<(Vec<f32>, Vec<f32>)> {
                Ok((
                    (&xh - &xn)?.flatten_all()?.to_vec1()?,
                    xn.flatten_all()?.to_vec1()?,
                ))
            };
            let (err, xv) = to_host().computing(|| {
                format!("SAE evaluation errors of examples {}.. [{n}, {d}]", ids[0])
            })?;
            for (er, xr) in err.chunks_exact(d).zip(xv.chunks_exact(d)) {
                for t in 0..d {
                    let (e, x) = (f64::from(er[t]), f64::from(xr[t]));
                    sq += e * e;
                    sum_e[t] += e;
                    sum_e2[t] += e * e;
                    sum_x[t] += x;
                    sum_x2[t] += x * x;
                }
            }
            let fv: Vec<f32> = (|| f.to_dtype(DType::F32)?.flatten_all()?.to_vec1())()
                .context("copying SAE codes to the host")?;
            for row in fv.chunks_exact(s) {
                for (i, &v) in row.iter().enumerate() {
                    // != 0: imported Python TopK codes can be negative and still fire.
                    if v != 0.0 {
                        count[i] += 1;
                        total[i] += f64::from(v);
                        l0 += 1.0;
                    }
                }
            }
            n_vec += n as u64;
            bar.inc(ids.len() as u64);
        }
        bar.finish_and_clear();
        let nf = n_vec as f64;
        let var_x: f64 = (0..d).map(|t| sum_x2[t] - sum_x[t] * sum_x[t] / nf).sum();
        let var_e: f64 = (0..d).map(|t| sum_e2[t] - sum_e[t] * sum_e[t] / nf).sum();
        let freq: Vec<f64> = count.iter().map(|&c| c as f64 / nf).collect();
        let mean_value = count
            .iter()
            .zip(&total)
            .map(|(&c, &t)| if c > 0 { t / c as f64 } else { 0.0 })
            .collect();
        Ok(Evaluation {
            examples,
            n_examples: n_ex,
            n_vectors: n_vec,
            mse: sq / (nf * d as f64),
            nmse: sq / var_x.max(1e-30),
            explained_variance: 1.0 - var_e / var_x.max(1e-30),
            l0: l0 / nf,
            n_dead: count.iter().filter(|&&c| c == 0).count(),
            n_almost_dead: freq
                .iter()
                .filter(|&&q| q > 0.0 && q < ALMOST_DEAD_FREQ)
                .count(),
            n_dense: freq.iter().filter(|&&q| q > DENSE_FREQ).count(),
            freq,
            mean_value,
        })
    }
}
