//! One SAE under training on the CPU: forward, explicit gradients that exploit the sparsity of
//! the code `f`, and Adam. ReLU + L1 (the paper), TopK and BatchTopK (Gao et al. 2024;
//! Bussmann et al. 2024) with AuxK on dead latents, and Matryoshka prefix losses (Bussmann et
//! al. 2025) over any of them.
//!
//! Model (training form): `pre = (x − b_dec) W_encᵀ + b_enc`, `f = act(pre)`,
//! `x̂_j = f[:, <e_j] W_dec + b_dec` for Matryoshka prefix ends `e_1 < … < e_G = d_sae` (G = 1:
//! plain SAE). Loss = (1/G) Σ_j mean((x̂_j − x)²) + λ · mean_b Σ_s f (ReLU) + α · AuxK.
//! AuxK: `e = x − x̂_G` (no gradient), `ê = z W_dec` with `z` the top `aux_k` pre-activations
//! among dead latents, loss `Σ‖ê − e‖² / Σ‖e − ē‖²` (an NMSE, as in Gao et al.).
//!
//! Only `x · W_encᵀ` is dense. When `f` is sparse (density ≤ `dense_above`), the decoder, its
//! gradient, `∂L/∂f` and the encoder weight-gradient touch only active latents (`O(nnz · d)`);
//! otherwise the same quantities come from dense GEMMs. Both give the same gradients (tested).
//!
//! ```text
//! let mut st = TrainState::new(w_enc_sd, b_enc, w_dec_sd, b_dec, recipe)?;
//! let out = st.step(&x_nd, n, lr, lambda, &mut scratch)?;   // loss terms before the update
//! ```

use rayon::prelude::*;

use super::linalg::{dot, Csr};
use crate::error::{Error, Result};

mod backward;
mod forward;
mod recipe;
#[cfg(test)]
mod tests;

pub use recipe::{Kernels, Recipe, TrainActivation};

/// Loss terms and statistics of one step (before the update).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepStats {
    /// Total loss.
    pub loss: f64,
    /// MSE of the full reconstruction (mean over elements).
    pub mse: f64,
    /// Σ‖x̂ − x‖² / Σ‖x − x̄‖² over the batch.
    pub nmse: f64,
    /// Mean active latents per row.
    pub l0: f64,
    /// Mean Σ f per row.
    pub l1: f64,
    /// AuxK loss (before α).
    pub aux: f64,
    /// Learning rate used.
    pub lr: f64,
    /// λ used.
    pub lambda: f64,
    /// Whether the dense kernels ran.
    pub dense: bool,
}

/// Gradients of the four parameters, in the training layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    /// `[d_sae, d]` (encoder rows).
    pub w_enc: Vec<f32>,
    /// `[d_sae]`.
    pub b_enc: Vec<f32>,
    /// `[d_sae, d]`.
    pub w_dec: Vec<f32>,
    /// `[d]`.
    pub b_dec: Vec<f32>,
    /// `[d_sae]`: JumpReLU's log thresholds (empty for the other activations).
    pub log_threshold: Vec<f32>,
}

/// Reusable big buffers, shared by all SAEs of a sweep.
#[derive(Default)]
pub struct Scratch {
    pre: Vec<f32>,
    dense: Vec<f32>,
}

/// What the encode phase of a step hands on.
struct Encoded {
    /// The batch centred by `b_dec`, `[n, d]`.
    xc: Vec<f32>,
    /// The active latents and their values.
    f: Csr,
    /// BatchTopK's smallest kept pre-activation.
    min_kept: Option<f32>,
    /// AuxK's selection among the dead latents.
    aux: Option<Csr>,
    /// Whether this batch uses the dense kernels.
    dense: bool,
}

/// AuxK's selection densified over the dead latents (see `TrainState::dead_block`).
struct DeadBlock {
    /// The dead latents, ascending.
    ids: Vec<usize>,
    /// `[n, n_dead]`: the selected pre-activations, 0 elsewhere.
    z: Vec<f32>,
    /// `[n_dead, d]`: their decoder rows.
    w: Vec<f32>,
}

/// One SAE's weights (training layout), Adam moments and dead-latent counters.
#[derive(Clone)]
pub struct TrainState {
    /// Input width.
    pub d: usize,
    /// Dictionary size.
    pub s: usize,
    /// Encoder rows `[d_sae, d]` (the transpose of the [`Sae`](super::model::Sae)'s `W_enc`).
    pub w_enc: Vec<f32>,
    /// `[d_sae]`.
    pub b_enc: Vec<f32>,
    /// `[d_sae, d]`.
    pub w_dec: Vec<f32>,
    /// `[d]`.
    pub b_dec: Vec<f32>,
    /// `[d_sae]`: JumpReLU's thresholds θ, as `ln θ` (so θ stays positive); empty for the other
    /// activations.
    pub log_threshold: Vec<f32>,
    /// Adam first and second moments, per parameter (w_enc, b_enc, w_dec, b_dec,
    /// log_threshold).
    pub adam_m: [Vec<f32>; 5],
    /// See `adam_m`.
    pub adam_v: [Vec<f32>; 5],
    /// Adam steps taken.
    pub t: u64,
    /// BatchTopK inference threshold (EMA of the smallest kept value; 0 before training).
    pub threshold: f32,
    /// Patches since each latent last fired.
    pub since_fired: Vec<u64>,
    /// The objective.
    pub recipe: Recipe,
    group_of: Vec<u16>,
    /// The last step's fraction of active entries (L0 / d_sae): above 1/16 the encoder skips
    /// the bf16 screen, whose candidates would then exceed its f32 fallback's 1/8 (a dense
    /// ReLU early in training: measured 9% slower screened). Checkpointed: the screen and the
    /// GEMM round differently, so a resumed step must choose as the uninterrupted one did.
    pub(in crate::sae) last_density: f64,
}

pub(crate) const BETA1: f64 = 0.9;
pub(crate) const BETA2: f64 = 0.999;
pub(crate) const EPS: f64 = 1e-8;
pub(crate) const THRESHOLD_RATE: f32 = 0.01;
/// Bytes of batch rows (`v` and `xc`) the latent-major gradient pass reads per pass: well inside
/// a core's L2 on an Intel Xeon (2 MiB), next to the gradient rows it streams. On a Zen 3 (L2
/// 512 KiB, a fast 32 MiB L3) 3/8 of its L2 (192 KiB) measured 5–10% slower than this, 320 KiB
/// no better: the size is not derived from the L2.
const CHUNK_BYTES: usize = 768 << 10;

/// Batch rows per pass of the latent-major gradient pass at width `d`.
fn chunk_rows(d: usize) -> usize {
    #[cfg(test)]
    if let Some(rows) = tests::CHUNK_ROWS.get() {
        return rows;
    }
    (CHUNK_BYTES / (2 * d * size_of::<f32>()).max(1)).max(1)
}

impl TrainState {
    /// The first parameter or Adam moment (name, flat index) holding NaN or ±∞, if any (a
    /// diverged update; an overflowing squared gradient freezes Adam without one in the weights).
    pub fn first_non_finite(&self) -> Option<(String, usize)> {
        const NAMES: [&str; 5] = ["W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"];
        let weights = [
            &self.w_enc,
            &self.b_enc,
            &self.w_dec,
            &self.b_dec,
            &self.log_threshold,
        ];
        let named = NAMES.iter().zip(weights).map(|(n, v)| (n.to_string(), v));
        let moments = NAMES
            .iter()
            .zip(&self.adam_m)
            .map(|(n, v)| (format!("Adam m of {n}"), v));
        let second = NAMES
            .iter()
            .zip(&self.adam_v)
            .map(|(n, v)| (format!("Adam v of {n}"), v));
        named
            .chain(moments)
            .chain(second)
            .find_map(|(name, v)| v.iter().position(|x| !x.is_finite()).map(|i| (name, i)))
    }

    /// Start from weights in the training layout (`w_enc`, `w_dec` both `[d_sae, d]`).
    pub fn new(
        w_enc: Vec<f32>,
        b_enc: Vec<f32>,
        w_dec: Vec<f32>,
        b_dec: Vec<f32>,
        recipe: Recipe,
    ) -> Result<Self> {
        let d = b_dec.len();
        let s = b_enc.len();
        for (name, len, want) in [("w_enc", w_enc.len(), s * d), ("w_dec", w_dec.len(), s * d)] {
            if len != want {
                return Err(Error::Shape {
                    what: format!("train state: {name}"),
                    expected: vec![s, d],
                    actual: vec![len],
                });
            }
        }
        let ends = if recipe.groups.is_empty() {
            vec![s]
        } else {
            recipe.groups.clone()
        };
        if ends.windows(2).any(|w| w[0] >= w[1]) || ends.last() != Some(&s) || ends[0] == 0 {
            return Err(Error::out_of_range(
                "matryoshka groups",
                format!("{:?}", recipe.groups),
                format!("ascending prefix ends above 0, the last = d_sae = {s}"),
            ));
        }
        if ends.len() > usize::from(u16::MAX) {
            return Err(Error::out_of_range(
                "matryoshka groups:",
                recipe.groups.len(),
                format!("≤ {}", u16::MAX),
            ));
        }
        let mut group_of = vec![0u16; s];
        let mut a = 0;
        for (j, &e) in ends.iter().enumerate() {
            group_of[a..e].fill(j as u16);
            a = e;
        }
        let log_threshold = match recipe.activation {
            TrainActivation::JumpRelu {
                init_threshold,
                bandwidth,
                init_density,
            } => {
                if init_density.is_some_and(|p| !(p > 0.0 && p < 1.0)) {
                    return Err(Error::out_of_range(
                        "activation.init_density",
                        format!("{init_density:?}"),
                        "a fraction in (0, 1), or null for init_threshold",
                    ));
                }
                if !(init_threshold.is_finite() && init_threshold > 0.0) {
                    return Err(Error::out_of_range(
                        "activation.init_threshold",
                        init_threshold,
                        "> 0 (JumpReLU learns ln θ)",
                    ));
                }
                if !(bandwidth.is_finite() && bandwidth > 0.0) {
                    return Err(Error::out_of_range(
                        "activation.bandwidth",
                        bandwidth,
                        "> 0",
                    ));
                }
                vec![init_threshold.ln(); s]
            }
            _ => Vec::new(),
        };
        let zeros = |n: usize| vec![0f32; n];
        let t_len = log_threshold.len();
        Ok(Self {
            d,
            s,
            adam_m: [zeros(s * d), zeros(s), zeros(s * d), zeros(d), zeros(t_len)],
            adam_v: [zeros(s * d), zeros(s), zeros(s * d), zeros(d), zeros(t_len)],
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            log_threshold,
            t: 0,
            threshold: 0.0,
            since_fired: vec![0; s],
            recipe,
            group_of,
            last_density: 0.0,
        })
    }

    fn n_groups(&self) -> usize {
        usize::from(self.group_of.last().copied().unwrap_or(0)) + 1
    }

    /// Latents silent for at least `dead_window_patches`.
    pub fn dead_mask(&self) -> Vec<bool> {
        self.since_fired
            .iter()
            .map(|&n| n >= self.recipe.dead_window_patches)
            .collect()
    }

    /// Set every decoder row to unit norm (rows of norm 0 are left as they are).
    pub fn normalise_decoder(&mut self) {
        let d = self.d;
        self.w_dec.par_chunks_mut(d).for_each(|r| {
            let n = dot(r, r).sqrt();
            if n > 0.0 {
                r.iter_mut().for_each(|v| *v /= n);
            }
        });
    }

    /// One training step on `x_nd` (`n` rows): normalise the decoder (if the recipe says so),
    /// compute gradients, clip, Adam with `lr`; returns the loss terms before the update and how
    /// many rows each latent fired on.
    pub fn step(
        &mut self,
        x_nd: &[f32],
        n: usize,
        lr: f64,
        lambda: f64,
        scratch: &mut Scratch,
    ) -> Result<(StepStats, Vec<u32>)> {
        if self.recipe.unit_norm_decoder {
            self.normalise_decoder();
        }
        if self.t == 0 && n > 0 && x_nd.len() == n * self.d {
            match (self.recipe.activation, self.recipe.relu_init_density) {
                (
                    TrainActivation::JumpRelu {
                        init_density: Some(density),
                        ..
                    },
                    _,
                ) => {
                    let q = self.quantiles_from_batch(x_nd, n, density, &mut scratch.pre);
                    self.log_threshold = q.into_iter().map(|v| v.max(1e-6).ln()).collect();
                }
                (TrainActivation::Relu, Some(density)) => {
                    let q = self.quantiles_from_batch(x_nd, n, density, &mut scratch.pre);
                    self.b_enc.iter_mut().zip(q).for_each(|(b, v)| *b -= v);
                }
                _ => {}
            }
        }
        let (mut stats, mut g, fired, min_kept) = self.gradients_inner(x_nd, n, lambda, scratch)?;
        stats.lr = lr;
        if let Some(max) = self.recipe.max_grad_norm {
            let sq: f64 = [&g.w_enc, &g.b_enc, &g.w_dec, &g.b_dec, &g.log_threshold]
                .iter()
                .map(|v| det_sum(v, 4096, sum_sq))
                .sum();
            let norm = sq.sqrt();
            if norm > max {
                let c = (max / norm) as f32;
                for v in [
                    &mut g.w_enc,
                    &mut g.b_enc,
                    &mut g.w_dec,
                    &mut g.b_dec,
                    &mut g.log_threshold,
                ] {
                    v.par_iter_mut().for_each(|x| *x *= c);
                }
            }
        }
        self.adam(&g, lr);
        if let (TrainActivation::BatchTopK { .. }, Some(m)) = (self.recipe.activation, min_kept) {
            self.threshold = if self.t == 1 {
                m
            } else {
                (1.0 - THRESHOLD_RATE) * self.threshold + THRESHOLD_RATE * m
            };
        }
        for (c, &k) in self.since_fired.iter_mut().zip(&fired) {
            *c = if k > 0 { 0 } else { c.saturating_add(n as u64) };
        }
        self.last_density = stats.l0 / self.s.max(1) as f64;
        Ok((stats, fired))
    }

    /// Loss terms and gradients at the current weights (no update, no decoder normalisation).
    pub fn gradients(
        &self,
        x_nd: &[f32],
        n: usize,
        lambda: f64,
        scratch: &mut Scratch,
    ) -> Result<(StepStats, Grads)> {
        let (stats, g, _, _) = self.gradients_inner(x_nd, n, lambda, scratch)?;
        Ok((stats, g))
    }

    fn adam(&mut self, g: &Grads, lr: f64) {
        self.t += 1;
        let bc1 = 1.0 - BETA1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - BETA2.powi(self.t as i32)).sqrt();
        let (b1, b2) = (BETA1 as f32, BETA2 as f32);
        let step = (lr / bc1) as f32;
        let (bc2_sqrt, eps) = (bc2_sqrt as f32, EPS as f32);
        let params = [
            &mut self.w_enc,
            &mut self.b_enc,
            &mut self.w_dec,
            &mut self.b_dec,
            &mut self.log_threshold,
        ];
        let grads = [&g.w_enc, &g.b_enc, &g.w_dec, &g.b_dec, &g.log_threshold];
        for (((p, gr), m), v) in params
            .into_iter()
            .zip(grads)
            .zip(self.adam_m.iter_mut())
            .zip(self.adam_v.iter_mut())
        {
            p.par_chunks_mut(4096)
                .zip(gr.par_chunks(4096))
                .zip(m.par_chunks_mut(4096))
                .zip(v.par_chunks_mut(4096))
                .for_each(|(((p, g), m), v)| {
                    adam_chunk(p, g, m, v, [b1, b2, step, bc2_sqrt, eps]);
                });
        }
    }

    #[allow(clippy::type_complexity)]
    /// Loss terms, gradients, per-latent fire counts and (BatchTopK) the smallest kept
    /// pre-activation of one batch, phase by phase: encode and select, decode the groups'
    /// errors, AuxK, the loss, then the gradients of the latents, of AuxK and of `b_dec`.
    fn gradients_inner(
        &self,
        x_nd: &[f32],
        n: usize,
        lambda: f64,
        scratch: &mut Scratch,
    ) -> Result<(StepStats, Grads, Vec<u32>, Option<f32>)> {
        let (d, s, gn) = (self.d, self.s, self.n_groups());
        if x_nd.len() != n * d || n == 0 {
            return Err(Error::Shape {
                what: "training batch".into(),
                expected: vec![n.max(1), d],
                actual: vec![x_nd.len() / d.max(1), d],
            });
        }
        let Encoded {
            xc,
            f,
            min_kept,
            aux,
            dense,
        } = self.encode(x_nd, n, scratch);
        let mut gs = self.group_errors(x_nd, n, &f, dense, scratch);
        // Loss terms (f64 sums).
        let sq_groups: Vec<f64> = (0..gn)
            .map(|j| det_sum(&gs, gn * d, |g| sum_sq(&g[j * d..(j + 1) * d])))
            .collect();
        let n_el = (n * d) as f64;
        let mse = sq_groups[gn - 1] / n_el;
        let var = total_variance(x_nd, n, d);
        let l1 = f.val.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let l0 = f.nnz() as f64 / n as f64;
        let uses_l1 = matches!(self.recipe.activation, TrainActivation::Relu);
        let jump = matches!(self.recipe.activation, TrainActivation::JumpRelu { .. });
        let lambda = if uses_l1 || jump { lambda } else { 0.0 };
        // JumpReLU's penalty is on L0 (its λ is the paper's: per d_model dimensions of MSE).
        let l0_coef = if jump { lambda / d as f64 } else { 0.0 };
        let l1_coef = if uses_l1 { lambda } else { 0.0 };

        let dead_block = aux.as_ref().and_then(|z| self.dead_block(z, n));
        let (aux_loss, g_aux) = match &aux {
            Some(z) => self.aux_residual(z, dead_block.as_ref(), &gs, n),
            None => (0.0, Vec::new()),
        };
        let loss = sq_groups.iter().sum::<f64>() / (gn as f64 * n_el)
            + l1_coef * l1
            + l0_coef * l0
            + self.recipe.aux_coef * aux_loss;

        // dL/dx̂_j = 2 e_j / (G n d); suffix sums: gs[b, j] ← Σ_{j' ≥ j} dL/dx̂_j'.
        let c = (2.0 / (gn as f64 * n_el)) as f32;
        gs.par_chunks_mut(gn * d).for_each(|g| {
            for j in (0..gn).rev() {
                for t in 0..d {
                    let above = if j + 1 < gn { g[(j + 1) * d + t] } else { 0.0 };
                    g[j * d + t] = g[j * d + t] * c + above;
                }
            }
        });

        // θ's straight-through gradient reads the pre-activations, which the dense kernels of
        // `latent_grads` overwrite: first.
        let g_threshold = match self.recipe.activation {
            TrainActivation::JumpRelu { bandwidth, .. } => {
                self.threshold_grads(&scratch.pre, &gs, n, l0_coef, bandwidth)
            }
            _ => Vec::new(),
        };
        let mut grads = self.latent_grads(&f, &gs, &xc, n, l1_coef, dense, scratch);
        grads.log_threshold = g_threshold;
        if let Some(z) = &aux {
            match &dead_block {
                Some(blk) => self.aux_grads_dense(blk, &g_aux, &xc, n, &mut grads),
                None => self.aux_grads(z, &g_aux, &xc, &mut grads),
            }
        }
        self.b_dec_grad(&gs, n, &mut grads);
        let mut fired = vec![0u32; s];
        for &i in &f.idx {
            fired[i as usize] += 1;
        }
        let stats = StepStats {
            loss,
            mse,
            nmse: sq_groups[gn - 1] / var.max(1e-30),
            l0,
            l1,
            aux: aux_loss,
            lr: 0.0,
            lambda,
            dense,
        };
        Ok((stats, grads, fired, min_kept))
    }

    /// JumpReLU's thresholds θ = exp(ln θ), `[d_sae]`.
    pub fn thresholds(&self) -> Vec<f32> {
        self.log_threshold.iter().map(|v| v.exp()).collect()
    }

    fn group_ends(&self) -> Vec<usize> {
        if self.recipe.groups.is_empty() {
            vec![self.s]
        } else {
            self.recipe.groups.clone()
        }
    }
}

/// One chunk of Adam's update; `h` = [β1, β2, lr / (1 − β1^t), √(1 − β2^t), ε].
fn adam_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: [f32; 5]) {
    #[cfg(target_arch = "x86_64")]
    if crate::util::simd::has_avx512() {
        // SAFETY: the processor has AVX-512F (checked at run time).
        return unsafe { adam_chunk_avx512(p, g, m, v, h) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::util::simd::has_avx2_fma() {
        // SAFETY: the processor has AVX2 and FMA (checked at run time).
        return unsafe { adam_chunk_avx2(p, g, m, v, h) };
    }
    adam_chunk_plain(p, g, m, v, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn adam_chunk_avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: [f32; 5]) {
    adam_chunk_plain(p, g, m, v, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn adam_chunk_avx512(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: [f32; 5]) {
    adam_chunk_plain(p, g, m, v, h)
}

#[inline(always)]
fn adam_chunk_plain(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: [f32; 5]) {
    let [b1, b2, step, bc2_sqrt, eps] = h;
    let n = p.len().min(g.len()).min(m.len()).min(v.len());
    let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        p[i] -= step * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
    }
}

/// Σ_b ‖x_b − x̄‖² (f64), x̄ the batch mean.
pub(crate) fn total_variance(x_nd: &[f32], n: usize, d: usize) -> f64 {
    let mut mean = vec![0f64; d];
    for r in x_nd.chunks_exact(d) {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    det_sum(x_nd, d, |r| {
        r.iter()
            .zip(&mean)
            .map(|(&v, m)| (f64::from(v) - m).powi(2))
            .sum::<f64>()
    })
}

/// Σ over fixed chunks, computed in parallel and added in order (deterministic, unlike a
/// rayon `sum`, whose reduction tree follows work stealing).
fn det_sum(x: &[f32], chunk: usize, f: impl Fn(&[f32]) -> f64 + Sync + Send) -> f64 {
    x.par_chunks(chunk.max(1))
        .map(f)
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}

fn sum_sq(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}
