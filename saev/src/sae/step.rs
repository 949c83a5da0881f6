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
use serde::{Deserialize, Serialize};

use super::linalg::{
    axpy, dot, gemm, select_above, select_above_biased, select_above_each, select_batch_topk,
    select_topk, select_topk_biased, select_topk_masked, sparse_rows_times, Csr, Mat, Transposed,
};
use super::screen;
use crate::error::{Error, Result};

/// The sparsifying non-linearity being trained.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TrainActivation {
    /// ReLU with an L1 penalty λ.
    Relu,
    /// Per-row top `k`.
    TopK {
        /// Latents kept per row.
        k: usize,
    },
    /// Batch top `k · n`; the inference threshold is an EMA of the smallest kept value.
    BatchTopK {
        /// Mean latents kept per row.
        k: usize,
    },
    /// JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"): `f = pre · H(pre − θ)` with a
    /// learned threshold θ per latent, trained against an L0 penalty `λ · ‖f‖₀ / d_model` (the
    /// paper's λ, whose MSE is summed over the d_model dimensions where saev's is averaged).
    /// H has no gradient; θ learns through the paper's straight-through estimator, a rectangle
    /// kernel of width `bandwidth` around it.
    JumpRelu {
        /// Width ε of the straight-through rectangle. Default 0.1 (see [`TrainActivation::jump_relu`]).
        #[serde(default = "default_bandwidth")]
        bandwidth: f32,
        /// θ of every latent at the start, when `init_density` is None. Default 0.1.
        #[serde(default = "default_init_threshold")]
        init_threshold: f32,
        /// Start each latent's θ where it fires on this fraction of the first batch (its
        /// `(1 − density)` quantile). Default 0.01 (L0 ≈ 1% of d_sae at the start); None =
        /// `init_threshold` for every latent, as the paper.
        #[serde(default = "default_init_density")]
        init_density: Option<f32>,
    },
}

// The paper's 0.001 suits its activations' scale; saev's inputs have mean norm √d_model
// (values O(1) per dimension, pre-activations O(1)), where a window of 0.001 catches so few
// pre-activations that θ barely moves: on the planted-dictionary test θ stayed at its start and
// L0 at 58 of 64 latents; 0.1 for both recovers every atom at the data's L0.
fn default_bandwidth() -> f32 {
    0.1
}

fn default_init_threshold() -> f32 {
    0.1
}

fn default_init_density() -> Option<f32> {
    Some(0.01)
}

impl TrainActivation {
    /// JumpReLU with saev's defaults for its normalised inputs: bandwidth ε = 0.1, initial
    /// θ = 0.1 (the paper's 0.001 for both is for its activations' scale).
    pub fn jump_relu() -> Self {
        TrainActivation::JumpRelu {
            bandwidth: default_bandwidth(),
            init_threshold: default_init_threshold(),
            init_density: default_init_density(),
        }
    }
}

/// Which kernels compute the decoder side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernels {
    /// Sparse when the code's density is ≤ the recipe's `dense_above`.
    Auto,
    /// Always sparse.
    Sparse,
    /// Always dense GEMMs.
    Dense,
}

/// Everything about one SAE's objective and update except lr and λ (which vary per step).
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// Non-linearity.
    pub activation: TrainActivation,
    /// Matryoshka prefix ends (ascending, last = d_sae); empty = one group.
    pub groups: Vec<usize>,
    /// AuxK latents per row (0 = off).
    pub aux_k: usize,
    /// AuxK coefficient α.
    pub aux_coef: f64,
    /// A latent silent for this many patches is dead (AuxK, history).
    pub dead_window_patches: u64,
    /// Unit-norm decoder rows before each step and parallel-gradient removal.
    pub unit_norm_decoder: bool,
    /// Clip the global gradient norm to this (None = no clipping).
    pub max_grad_norm: Option<f64>,
    /// Kernel choice.
    pub kernels: Kernels,
    /// Density above which `Auto` uses dense GEMMs.
    pub dense_above: f64,
    /// ReLU's data-driven start: at the first step each latent's `b_enc` is lowered by its
    /// `(1 − p)` quantile of pre-activations on that batch, so it starts firing on a fraction
    /// `p` of the patches (None: the paper's zero bias, half of the latents firing at first).
    pub relu_init_density: Option<f32>,
}

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
    /// ReLU early in training: measured 9% slower screened).
    last_density: f64,
}

pub(crate) const BETA1: f64 = 0.9;
pub(crate) const BETA2: f64 = 0.999;
pub(crate) const EPS: f64 = 1e-8;
pub(crate) const THRESHOLD_RATE: f32 = 0.01;
/// Bytes of batch rows (`v` and `xc`) the latent-major gradient pass reads per pass: well inside
/// a core's L2 (1–2 MiB), next to the gradient rows it streams.
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

    /// The latents' gradients: `∂L/∂pre` at the active entries and from it `W_enc`, `b_enc`,
    /// `W_dec` — dense GEMMs or the sparse kernels.
    #[allow(clippy::too_many_arguments)]
    fn latent_grads(
        &self,
        f: &Csr,
        gs: &[f32],
        xc: &[f32],
        n: usize,
        lambda: f64,
        dense: bool,
        scratch: &mut Scratch,
    ) -> Grads {
        let (d, s, gn) = (self.d, self.s, self.n_groups());
        let ends = self.group_ends();
        let pre = &mut scratch.pre;
        // ∂L/∂pre at the active entries.
        let l1_grad = (lambda / n as f64) as f32;
        let mut grads = Grads {
            w_enc: vec![0f32; s * d],
            b_enc: vec![0f32; s],
            w_dec: vec![0f32; s * d],
            b_dec: vec![0f32; d],
            log_threshold: Vec::new(),
        };
        if dense {
            // ∂L/∂f per group block: gs_j · W_dec[block]ᵀ into `pre` (no longer needed; sized
            // here when the screen, which needs none, selected).
            pre.resize(n * s, 0.0);
            let mut a = 0;
            for (j, &e) in ends.iter().enumerate() {
                gemm(
                    n,
                    e - a,
                    d,
                    pre,
                    a,
                    s,
                    Mat::rows(gs, gn * d).at(j * d),
                    Mat::t(&self.w_dec, d).at(a * d),
                    false,
                );
                // W_dec grad block: f[:, block]ᵀ · gs_j.
                gemm(
                    e - a,
                    d,
                    n,
                    &mut grads.w_dec,
                    a * d,
                    d,
                    Mat::t(&scratch.dense, s).at(a),
                    Mat::rows(gs, gn * d).at(j * d),
                    false,
                );
                a = e;
            }
            let pre_r: &[f32] = pre;
            let dp = (0..f.n_rows())
                .into_par_iter()
                .flat_map_iter(|b| {
                    let (ix, _) = f.row(b);
                    let row = &pre_r[b * s..(b + 1) * s];
                    ix.iter()
                        .map(move |&i| row[i as usize] + l1_grad)
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<f32>>();
            // Encoder weight grad: dHᵀ · xc with dH the dense ∂L/∂pre.
            let dh = Csr {
                ptr: f.ptr.clone(),
                idx: f.idx.clone(),
                val: dp.clone(),
            };
            scratch.dense.clear();
            scratch.dense.extend(dh.to_dense(s));
            gemm(
                s,
                d,
                n,
                &mut grads.w_enc,
                0,
                d,
                Mat::t(&scratch.dense, s),
                Mat::rows(xc, d),
                false,
            );
            for row in scratch.dense.chunks_exact(s) {
                axpy(1.0, row, &mut grads.b_enc);
            }
        } else {
            // Latent by latent: ∂L/∂pre = W_dec[i] · gs_b (+ λ/n) computed where it is used,
            // with W_dec[i] and the two gradient rows in cache across the latent's patches
            // (a batch-major pass would fetch a random decoder row per active entry).
            let t = f.transpose(s);
            let vec_of = |b: usize, i: usize| {
                let j = usize::from(self.group_of[i]);
                &gs[(b * gn + j) * d..(b * gn + j + 1) * d]
            };
            self.add_latent_grads(&t, &f.val, xc, &mut grads, vec_of, |w, v| {
                dot(w, v) + l1_grad
            });
        }
        grads
    }

    /// `pre = (x − b_dec) W_encᵀ (+ b_enc)` into `pre` (`[n, d_sae]`); returns the centred
    /// batch.
    fn pre_activations(
        &self,
        x_nd: &[f32],
        n: usize,
        pre: &mut Vec<f32>,
        with_bias: bool,
    ) -> Vec<f32> {
        let (d, s) = (self.d, self.s);
        let xc = self.centred(x_nd);
        pre.resize(n * s, 0.0);
        if with_bias {
            pre.par_chunks_mut(s)
                .for_each(|r| r.copy_from_slice(&self.b_enc));
        }
        gemm(
            n,
            s,
            d,
            pre,
            0,
            s,
            Mat::rows(&xc, d),
            Mat::t(&self.w_enc, d),
            with_bias,
        );
        xc
    }

    /// `x − b_dec`, `[n, d]`.
    fn centred(&self, x_nd: &[f32]) -> Vec<f32> {
        let mut xc = x_nd.to_vec();
        xc.par_chunks_mut(self.d)
            .for_each(|r| r.iter_mut().zip(&self.b_dec).for_each(|(v, b)| *v -= b));
        xc
    }

    /// Each latent's `(1 − density)` quantile of its pre-activations on this batch: the data-driven
    /// start of JumpReLU's θ (and of ReLU's `b_enc`, lowered by it), so every latent starts
    /// firing on about `density` of the patches (L0 ≈ density · d_sae) instead of on half of
    /// them (dense codes, slow steps, and a sparsity penalty that takes thousands of steps to
    /// bring L0 down). JumpReLU's θ stays ≥ 1e-6 (it is learned as ln θ).
    fn quantiles_from_batch(
        &self,
        x_nd: &[f32],
        n: usize,
        density: f32,
        pre: &mut Vec<f32>,
    ) -> Vec<f32> {
        let s = self.s;
        self.pre_activations(x_nd, n, pre, true);
        let rank = ((1.0 - f64::from(density).clamp(0.0, 1.0)) * (n - 1) as f64).round() as usize;
        let pre_r: &[f32] = pre;
        (0..s)
            .into_par_iter()
            .map(|i| {
                let mut col: Vec<f32> = (0..n).map(|b| pre_r[b * s + i]).collect();
                let (_, q, _) = col.select_nth_unstable_by(rank, f32::total_cmp);
                *q
            })
            .collect()
    }

    /// JumpReLU's thresholds θ = exp(ln θ), `[d_sae]`.
    pub fn thresholds(&self) -> Vec<f32> {
        self.log_threshold.iter().map(|v| v.exp()).collect()
    }

    /// `∂L/∂ln θ` by the paper's straight-through estimator: with `K` the rectangle of width
    /// ε (`bandwidth`) around θ, each (row, latent) whose pre-activation falls in it adds
    /// `−(θ/ε) ∂L/∂f` (the jump of `f` at θ) and `−(1/ε) · l0_coef / n` (the jump of `H`);
    /// then `× θ` for the log parameterisation. `gs` holds `∂L/∂x̂` per group (suffix sums), so
    /// `∂L/∂f_bi = W_dec[i] · gs[b, group(i)]`.
    fn threshold_grads(
        &self,
        pre: &[f32],
        gs: &[f32],
        n: usize,
        l0_coef: f64,
        bandwidth: f32,
    ) -> Vec<f32> {
        let (d, s, gn) = (self.d, self.s, self.n_groups());
        let theta = self.thresholds();
        let half = bandwidth / 2.0;
        let l0_jump = (l0_coef / n as f64) as f32;
        // Per row, the window entries' contributions; reduced over rows in a fixed order
        // (deterministic).
        let per_row: Vec<Vec<(u32, f32)>> = pre
            .par_chunks(s)
            .enumerate()
            .map(|(b, row)| {
                let g = &gs[b * gn * d..(b + 1) * gn * d];
                row.iter()
                    .zip(&theta)
                    .enumerate()
                    .filter(|(_, (&p, &t))| (p - t).abs() < half)
                    .map(|(i, (_, &t))| {
                        let j = usize::from(self.group_of[i]);
                        let df = dot(&self.w_dec[i * d..(i + 1) * d], &g[j * d..(j + 1) * d]);
                        (i as u32, -(t * df + l0_jump) / bandwidth)
                    })
                    .collect()
            })
            .collect();
        let mut g_theta = vec![0f32; s];
        for (i, v) in per_row.into_iter().flatten() {
            g_theta[i as usize] += v;
        }
        g_theta.iter_mut().zip(&theta).for_each(|(g, t)| *g *= t);
        g_theta
    }

    /// AuxK's selection as a dense `[n, n_dead]` block over the dead latents, and their decoder
    /// rows `[n_dead, d]`, when the kernels say dense: AuxK picks `aux_k` of the dead latents per
    /// row (often a large share of them), and the sparse kernels then gather a row of
    /// `d` floats per entry from all over memory, where four GEMMs stream.
    fn dead_block(&self, z: &Csr, n: usize) -> Option<DeadBlock> {
        let (d, s) = (self.d, self.s);
        let dead = self.dead_mask();
        let ids: Vec<usize> = (0..s).filter(|&i| dead[i]).collect();
        let nd = ids.len();
        let density = z.nnz() as f64 / (n * nd).max(1) as f64;
        let dense = match self.recipe.kernels {
            Kernels::Auto => density > self.recipe.dense_above,
            Kernels::Sparse => false,
            Kernels::Dense => true,
        };
        if !dense || nd == 0 {
            return None;
        }
        let mut col = vec![usize::MAX; s];
        for (c, &i) in ids.iter().enumerate() {
            col[i] = c;
        }
        let mut zd = vec![0f32; n * nd];
        zd.par_chunks_mut(nd).enumerate().for_each(|(b, row)| {
            let (ix, vs) = z.row(b);
            for (&i, &v) in ix.iter().zip(vs) {
                row[col[i as usize]] = v;
            }
        });
        let mut w = Vec::with_capacity(nd * d);
        for &i in &ids {
            w.extend_from_slice(&self.w_dec[i * d..(i + 1) * d]);
        }
        Some(DeadBlock { ids, z: zd, w })
    }

    /// [`TrainState::aux_grads`] with dense GEMMs over the dead latents' block.
    fn aux_grads_dense(
        &self,
        blk: &DeadBlock,
        g_aux: &[f32],
        xc: &[f32],
        n: usize,
        grads: &mut Grads,
    ) {
        let (d, nd) = (self.d, blk.ids.len());
        // ∂L/∂z = g_aux · W_deadᵀ at the selected entries.
        let mut dz = vec![0f32; n * nd];
        gemm(
            n,
            nd,
            d,
            &mut dz,
            0,
            nd,
            Mat::rows(g_aux, d),
            Mat::t(&blk.w, d),
            false,
        );
        dz.par_iter_mut().zip(&blk.z).for_each(|(g, &v)| {
            if v == 0.0 {
                *g = 0.0;
            }
        });
        let mut gw = vec![0f32; nd * d];
        gemm(
            nd,
            d,
            n,
            &mut gw,
            0,
            d,
            Mat::t(&blk.z, nd),
            Mat::rows(g_aux, d),
            false,
        );
        let mut ge = vec![0f32; nd * d];
        gemm(
            nd,
            d,
            n,
            &mut ge,
            0,
            d,
            Mat::t(&dz, nd),
            Mat::rows(xc, d),
            false,
        );
        let mut gb = vec![0f32; nd];
        for row in dz.chunks_exact(nd) {
            axpy(1.0, row, &mut gb);
        }
        for (c, &i) in blk.ids.iter().enumerate() {
            axpy(
                1.0,
                &gw[c * d..(c + 1) * d],
                &mut grads.w_dec[i * d..(i + 1) * d],
            );
            axpy(
                1.0,
                &ge[c * d..(c + 1) * d],
                &mut grads.w_enc[i * d..(i + 1) * d],
            );
            grads.b_enc[i] += gb[c];
        }
    }

    /// AuxK's gradients through the dead latents it selected (`z`), into `grads`.
    fn aux_grads(&self, z: &Csr, g_aux: &[f32], xc: &[f32], grads: &mut Grads) {
        let (d, s) = (self.d, self.s);
        let t = z.transpose(s);
        let vec_of = |b: usize, _: usize| &g_aux[b * d..(b + 1) * d];
        self.add_latent_grads(&t, &z.val, xc, grads, vec_of, dot);
    }

    /// `∂L/∂b_dec = Σ_b ∂L/∂x̂ − Σ_s ∂L/∂b_enc[s] · W_enc[s]` (x is centred by b_dec), then the
    /// decoder's parallel-gradient removal (unit-norm rows).
    fn b_dec_grad(&self, gs: &[f32], n: usize, grads: &mut Grads) {
        let (d, gn) = (self.d, self.n_groups());
        for b in 0..n {
            axpy(1.0, &gs[b * gn * d..b * gn * d + d], &mut grads.b_dec);
        }
        // Fixed chunks reduced in order: deterministic.
        let enc_part: Vec<f32> = grads
            .b_enc
            .par_chunks(256)
            .zip(self.w_enc.par_chunks(256 * d))
            .map(|(cs, ws)| {
                let mut acc = vec![0f32; d];
                for (&c, w) in cs.iter().zip(ws.chunks_exact(d)) {
                    if c != 0.0 {
                        axpy(c, w, &mut acc);
                    }
                }
                acc
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold(vec![0f32; d], |mut a, p| {
                axpy(1.0, &p, &mut a);
                a
            });
        axpy(-1.0, &enc_part, &mut grads.b_dec);
        if self.recipe.unit_norm_decoder {
            grads
                .w_dec
                .par_chunks_mut(d)
                .zip(self.w_dec.par_chunks(d))
                .for_each(|(g, w)| {
                    let par = dot(g, w);
                    axpy(-par, w, g);
                });
        }
    }

    /// Encoder and selection: `pre = (x − b_dec) W_encᵀ + b_enc` (kept in `scratch.pre`), the
    /// active latents `f`, the AuxK selection among dead latents, and the kernel choice.
    fn encode(&self, x_nd: &[f32], n: usize, scratch: &mut Scratch) -> Encoded {
        let s = self.s;
        let dead = self.dead_mask();
        let n_dead = dead.iter().filter(|&&x| x).count();
        let with_aux = self.recipe.aux_k > 0 && n_dead > 0;
        // ReLU and TopK (without AuxK, which reads the pre-activations again) add b_enc while
        // they scan the rows: the GEMM then neither fills nor reads its output first (200 MB
        // less memory traffic a step at d_sae 6144, batch 4096).
        let bias_in_selection = !with_aux
            && matches!(
                self.recipe.activation,
                TrainActivation::Relu | TrainActivation::TopK { .. }
            );
        // TopK's and ReLU's selections from a bf16 screen where that is faster (exact:
        // `screen`); AuxK's then from the f32 pre-activations of the dead latents only.
        let rule = match self.recipe.activation {
            TrainActivation::Relu => Some(screen::Rule::Positive),
            TrainActivation::TopK { k } => Some(screen::Rule::TopK(k)),
            _ => None,
        };
        let screen = self.recipe.kernels != Kernels::Dense
            && self.last_density <= 1.0 / 16.0
            && screen::pays(n, self.d, s);
        if let Some(rule) = rule.filter(|_| screen) {
            let xc = self.centred(x_nd);
            if let Some(f) = screen::select(&xc, n, &self.w_enc, &self.b_enc, rule) {
                let aux = with_aux.then(|| self.aux_among_dead(&xc, n, &dead));
                return self.encoded(xc, f, None, aux, n);
            }
        }
        let xc = self.pre_activations(x_nd, n, &mut scratch.pre, !bias_in_selection);
        let pre = &mut scratch.pre;
        let (f, min_kept) = match self.recipe.activation {
            TrainActivation::Relu if bias_in_selection => {
                (select_above_biased(pre, s, &self.b_enc), None)
            }
            TrainActivation::TopK { k } if bias_in_selection => {
                (select_topk_biased(pre, s, k, &self.b_enc), None)
            }
            TrainActivation::Relu => (select_above(pre, s, 0.0), None),
            TrainActivation::TopK { k } => (select_topk(pre, s, k), None),
            TrainActivation::BatchTopK { k } => {
                let (f, m) = select_batch_topk(pre, s, k * n);
                (f, Some(m))
            }
            TrainActivation::JumpRelu { .. } => {
                (select_above_each(pre, s, &self.thresholds()), None)
            }
        };
        let aux = if with_aux {
            Some(select_topk_masked(pre, s, self.recipe.aux_k, &dead))
        } else {
            None
        };
        self.encoded(xc, f, min_kept, aux, n)
    }

    /// AuxK's selection (the top `aux_k` positive pre-activations of the dead latents) from
    /// the f32 GEMM of the dead latents' columns alone: what `select_topk_masked` keeps of the
    /// whole pre-activations (the dead latents in id order, so ties resolve the same way).
    fn aux_among_dead(&self, xc: &[f32], n: usize, dead: &[bool]) -> Csr {
        let d = self.d;
        let ids: Vec<u32> = (0..self.s as u32).filter(|&i| dead[i as usize]).collect();
        let nd = ids.len();
        let mut w = Vec::with_capacity(nd * d);
        for &i in &ids {
            w.extend_from_slice(&self.w_enc[i as usize * d..(i as usize + 1) * d]);
        }
        let mut pre = vec![0f32; n * nd];
        pre.par_chunks_mut(nd.max(1)).for_each(|r| {
            for (v, &i) in r.iter_mut().zip(&ids) {
                *v = self.b_enc[i as usize];
            }
        });
        gemm(
            n,
            nd,
            d,
            &mut pre,
            0,
            nd,
            Mat::rows(xc, d),
            Mat::t(&w, d),
            true,
        );
        let mut z = select_topk(&pre, nd.max(1), self.recipe.aux_k);
        for j in z.idx.iter_mut() {
            *j = ids[*j as usize];
        }
        z
    }

    /// The kernel choice for a selection `f`, with the rest of [`Self::encode`]'s result.
    fn encoded(
        &self,
        xc: Vec<f32>,
        f: Csr,
        min_kept: Option<f32>,
        aux: Option<Csr>,
        n: usize,
    ) -> Encoded {
        let s = self.s;
        let density = f.nnz() as f64 / (n * s) as f64;
        let dense = match self.recipe.kernels {
            Kernels::Auto => density > self.recipe.dense_above,
            Kernels::Sparse => false,
            Kernels::Dense => true,
        };
        Encoded {
            xc,
            f,
            min_kept,
            aux,
            dense,
        }
    }

    /// Forward: raw errors `e_j = x̂_j − x` of every Matryoshka group, `[n, G, d]`.
    fn group_errors(
        &self,
        x_nd: &[f32],
        n: usize,
        f: &Csr,
        dense: bool,
        scratch: &mut Scratch,
    ) -> Vec<f32> {
        let (d, s, gn) = (self.d, self.s, self.n_groups());
        let ends = self.group_ends();
        let mut gs = vec![0f32; n * gn * d];
        if dense {
            scratch.dense.clear();
            scratch.dense.extend(f.to_dense(s));
            let fd = &scratch.dense;
            let mut acc = vec![0f32; n * d];
            acc.par_chunks_mut(d)
                .for_each(|r| r.copy_from_slice(&self.b_dec));
            let mut a = 0;
            for (j, &e) in ends.iter().enumerate() {
                gemm(
                    n,
                    d,
                    e - a,
                    &mut acc,
                    0,
                    d,
                    Mat::rows(fd, s).at(a),
                    Mat::rows(&self.w_dec, d).at(a * d),
                    true,
                );
                gs.par_chunks_mut(gn * d)
                    .zip(acc.par_chunks(d))
                    .zip(x_nd.par_chunks(d))
                    .for_each(|((g, r), x)| {
                        for t in 0..d {
                            g[j * d + t] = r[t] - x[t];
                        }
                    });
                a = e;
            }
        } else {
            gs.par_chunks_mut(gn * d)
                .zip(x_nd.par_chunks(d))
                .enumerate()
                .for_each(|(b, (g, x))| {
                    let mut acc = self.b_dec.clone();
                    let (ix, vs) = f.row(b);
                    let mut p = 0;
                    for j in 0..gn {
                        while p < ix.len() && usize::from(self.group_of[ix[p] as usize]) == j {
                            let i = ix[p] as usize;
                            axpy(vs[p], &self.w_dec[i * d..(i + 1) * d], &mut acc);
                            p += 1;
                        }
                        for t in 0..d {
                            g[j * d + t] = acc[t] - x[t];
                        }
                    }
                });
        }
        gs
    }

    /// AuxK: the residual `e = x − x̂_G` against `ê = z W_dec`; returns the normalised loss and
    /// its gradient `∂L/∂ê` (scaled by `aux_coef`), `[n, d]`.
    fn aux_residual(
        &self,
        z: &Csr,
        blk: Option<&DeadBlock>,
        gs: &[f32],
        n: usize,
    ) -> (f64, Vec<f32>) {
        let (d, gn) = (self.d, self.n_groups());
        let mut resid = vec![0f32; n * d];
        resid
            .par_chunks_mut(d)
            .zip(gs.par_chunks(gn * d))
            .for_each(|(r, g)| {
                for t in 0..d {
                    r[t] = -g[(gn - 1) * d + t];
                }
            });
        let z_var = total_variance(&resid, n, d).max(1e-30);
        let mut e_hat = vec![0f32; n * d];
        match blk {
            Some(b) => {
                let nd = b.ids.len();
                gemm(
                    n,
                    d,
                    nd,
                    &mut e_hat,
                    0,
                    d,
                    Mat::rows(&b.z, nd),
                    Mat::rows(&b.w, d),
                    false,
                );
            }
            None => sparse_rows_times(z, &z.val, &self.w_dec, d, &mut e_hat),
        }
        // e_hat ← ê − e.
        e_hat.par_iter_mut().zip(&resid).for_each(|(h, r)| *h -= r);
        let sq = det_sum(&e_hat, 4096, sum_sq);
        let aux_loss = sq / z_var;
        let c = (self.recipe.aux_coef * 2.0 / z_var) as f32;
        e_hat.par_iter_mut().for_each(|v| *v *= c);
        (aux_loss, e_hat)
    }

    /// Per latent `s` (parallel, each row of the gradients written by one task):
    /// `∂W_dec[s] += Σ f · v(b, s)`, `∂W_enc[s] += Σ ∂pre · xc[b]`, `∂b_enc[s] += Σ ∂pre`, with
    /// `∂pre = dpre_of(W_dec[s], v(b, s))` computed here, where both are in cache (a
    /// batch-major pass would fetch a random decoder row per active entry).
    ///
    /// The batch is taken in chunks of rows whose `v` and `xc` rows fit in L2 together: each
    /// pass over the latents reads only that chunk's rows, each latent resuming its (row-sorted)
    /// entries where the last pass stopped — the sums run in the same order, so the result is
    /// the one-pass result bit for bit, with random row fetches from L2 instead of L3.
    fn add_latent_grads<'a, V, P>(
        &self,
        t: &Transposed,
        vals: &[f32],
        xc: &[f32],
        grads: &mut Grads,
        vec_of: V,
        dpre_of: P,
    ) where
        V: Fn(usize, usize) -> &'a [f32] + Sync,
        P: Fn(&[f32], &[f32]) -> f32 + Sync,
    {
        let d = self.d;
        let n = xc.len() / d.max(1);
        let chunk = chunk_rows(d);
        let mut next: Vec<usize> = t.cptr[..t.cptr.len() - 1].to_vec();
        for r1 in (1..=n.div_ceil(chunk)).map(|c| (c * chunk).min(n)) {
            grads
                .w_dec
                .par_chunks_mut(d)
                .zip(grads.w_enc.par_chunks_mut(d))
                .zip(grads.b_enc.par_iter_mut())
                .zip(next.par_iter_mut())
                .enumerate()
                .for_each(|(i, (((gd, ge), gb), q))| {
                    let end = t.cptr[i + 1];
                    let w = &self.w_dec[i * d..(i + 1) * d];
                    while *q < end && (t.rows[*q] as usize) < r1 {
                        let (b, p) = (t.rows[*q] as usize, t.pos[*q] as usize);
                        let v = vec_of(b, i);
                        let dp = dpre_of(w, v);
                        axpy(vals[p], v, gd);
                        axpy(dp, &xc[b * d..(b + 1) * d], ge);
                        *gb += dp;
                        *q += 1;
                    }
                });
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let z = crate::util::rng::splitmix64(seed.wrapping_mul(1_000_003) + i as u64);
                ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
            })
            .collect()
    }

    /// Indices (row-major flat) kept by a plain sort: per row top k (or over the whole batch),
    /// positive only, optionally among `allowed` latents — an independent restatement.
    fn chosen(pre: &[f32], s: usize, k: usize, batch: bool, allowed: Option<&[bool]>) -> Vec<bool> {
        let mut keep = vec![false; pre.len()];
        let ok = |i: usize| pre[i] > 0.0 && allowed.is_none_or(|a| a[i % s]);
        let mut take = |mut ids: Vec<usize>, k: usize| {
            ids.retain(|&i| ok(i));
            ids.sort_by(|&a, &b| pre[b].total_cmp(&pre[a]).then(a.cmp(&b)));
            for &i in ids.iter().take(k) {
                keep[i] = true;
            }
        };
        if batch {
            take((0..pre.len()).collect(), k * pre.len() / s);
        } else {
            for r in 0..pre.len() / s {
                take((r * s..(r + 1) * s).collect(), k);
            }
        }
        keep
    }

    fn reference(st: &TrainState, x: &[f32], n: usize, lambda: f64) -> Grads {
        let (d, s) = (st.d, st.s);
        let dev = Device::Cpu;
        let t = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &dev).unwrap();
        let we = Var::from_tensor(&t(&st.w_enc, &[s, d])).unwrap();
        let be = Var::from_tensor(&t(&st.b_enc, &[s])).unwrap();
        let wd = Var::from_tensor(&t(&st.w_dec, &[s, d])).unwrap();
        let bd = Var::from_tensor(&t(&st.b_dec, &[d])).unwrap();
        let xt = t(x, &[n, d]);
        let pre = xt
            .broadcast_sub(bd.as_tensor())
            .unwrap()
            .matmul(&we.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(be.as_tensor())
            .unwrap();
        let pre_v: Vec<f32> = pre.flatten_all().unwrap().to_vec1().unwrap();
        // JumpReLU: θ = exp(ln θ) as a variable; the paper's straight-through estimator written
        // as a surrogate, (θ − sg(θ)) · c, whose value is 0 and whose θ-gradient is c.
        let lt = Var::from_tensor(&t(&st.log_threshold, &[st.log_threshold.len()])).unwrap();
        let theta_v = st.thresholds();
        let mask: Vec<bool> = match st.recipe.activation {
            TrainActivation::Relu => pre_v.iter().map(|&v| v > 0.0).collect(),
            TrainActivation::TopK { k } => chosen(&pre_v, s, k, false, None),
            TrainActivation::BatchTopK { k } => chosen(&pre_v, s, k, true, None),
            TrainActivation::JumpRelu { .. } => pre_v
                .iter()
                .enumerate()
                .map(|(i, &v)| v > theta_v[i % s])
                .collect(),
        };
        let as_t = |m: &[bool]| {
            t(
                &m.iter()
                    .map(|&b| f32::from(u8::from(b)))
                    .collect::<Vec<_>>(),
                &[n, s],
            )
        };
        let mut f = (&pre * as_t(&mask)).unwrap();
        let mut l0_surrogate = None;
        if let TrainActivation::JumpRelu { bandwidth, .. } = st.recipe.activation {
            // K((pre − θ)/ε)/ε: the rectangle of width ε around θ.
            let k_v: Vec<f32> = pre_v
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if (v - theta_v[i % s]).abs() < bandwidth / 2.0 {
                        1.0 / bandwidth
                    } else {
                        0.0
                    }
                })
                .collect();
            let theta = lt.as_tensor().exp().unwrap();
            let zero_with_grad = (&theta - theta.detach())
                .unwrap()
                .broadcast_as((n, s))
                .unwrap();
            let theta_b: Vec<f32> = (0..n * s).map(|i| theta_v[i % s]).collect();
            // ∂f/∂θ = −θ K/ε; ∂H/∂θ = −K/ε.
            let df_dtheta = (t(&k_v, &[n, s]) * t(&theta_b, &[n, s]))
                .unwrap()
                .neg()
                .unwrap();
            f = (f + (&zero_with_grad * df_dtheta).unwrap()).unwrap();
            let dh_dtheta = t(&k_v, &[n, s]).neg().unwrap();
            let count = mask.iter().filter(|&&m| m).count() as f64;
            let l0 = ((zero_with_grad * dh_dtheta).unwrap().sum_all().unwrap() + count).unwrap();
            l0_surrogate = Some((l0 / n as f64).unwrap());
        }
        let ends = st.group_ends();
        let g = ends.len() as f64;
        let mut loss = Tensor::zeros((), candle_core::DType::F32, &dev).unwrap();
        let mut last = None;
        for &e in &ends {
            let xh = f
                .narrow(1, 0, e)
                .unwrap()
                .matmul(&wd.as_tensor().narrow(0, 0, e).unwrap())
                .unwrap()
                .broadcast_add(bd.as_tensor())
                .unwrap();
            let mse = (&xh - &xt).unwrap().sqr().unwrap().mean_all().unwrap();
            loss = (loss + (mse / g).unwrap()).unwrap();
            last = Some(xh);
        }
        if matches!(st.recipe.activation, TrainActivation::Relu) {
            let l1 = (f.sum_all().unwrap() / n as f64).unwrap();
            loss = (loss + (l1 * lambda).unwrap()).unwrap();
        }
        if let Some(l0) = l0_surrogate {
            // The paper's λ: L0 against MSE summed over d, so λ/d against saev's mean MSE.
            loss = (loss + (l0 * (lambda / d as f64)).unwrap()).unwrap();
        }
        if st.recipe.aux_k > 0 {
            let resid = (&xt - last.unwrap()).unwrap().detach();
            let rv: Vec<f32> = resid.flatten_all().unwrap().to_vec1().unwrap();
            let z_var = total_variance(&rv, n, d);
            let am = chosen(&pre_v, s, st.recipe.aux_k, false, Some(&st.dead_mask()));
            let z = (&pre * as_t(&am)).unwrap();
            let eh = z.matmul(wd.as_tensor()).unwrap();
            let a = ((eh - resid).unwrap().sqr().unwrap().sum_all().unwrap() / z_var).unwrap();
            loss = (loss + (a * st.recipe.aux_coef).unwrap()).unwrap();
        }
        let gr = loss.backward().unwrap();
        let get = |v: &Var| -> Vec<f32> {
            gr.get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let mut w_dec = get(&wd);
        if st.recipe.unit_norm_decoder {
            for (g, w) in w_dec.chunks_mut(d).zip(st.w_dec.chunks(d)) {
                let p: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
                g.iter_mut().zip(w).for_each(|(g, w)| *g -= p * w);
            }
        }
        Grads {
            w_enc: get(&we),
            b_enc: get(&be),
            w_dec,
            b_dec: get(&bd),
            log_threshold: if st.log_threshold.is_empty() {
                Vec::new()
            } else {
                get(&lt)
            },
        }
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let m = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        a.iter().zip(b).fold(0f32, |x, (p, q)| x.max((p - q).abs())) / m
    }

    /// A sparse-kernel state of `(d, s)` with random weights (`seed` for the encoder, fixed
    /// seeds for the rest) and every third latent dead, so AuxK has work.
    fn test_state(
        activation: TrainActivation,
        groups: Vec<usize>,
        aux_k: usize,
        unit_norm_decoder: bool,
        (d, s): (usize, usize),
        seed: u64,
    ) -> TrainState {
        let recipe = Recipe {
            activation,
            groups,
            aux_k,
            aux_coef: 1.0 / 32.0,
            dead_window_patches: 100,
            unit_norm_decoder,
            max_grad_norm: None,
            kernels: Kernels::Sparse,
            dense_above: 0.05,
            relu_init_density: None,
        };
        let mut st = TrainState::new(
            rnd(s * d, seed, 0.4),
            rnd(s, 2, 0.1),
            rnd(s * d, 3, 0.4),
            rnd(d, 4, 0.2),
            recipe,
        )
        .unwrap();
        for i in (0..s).step_by(3) {
            st.since_fired[i] = 1000;
        }
        st
    }

    thread_local! {
        /// Rows per pass of the latent-major gradient pass, for tests on small batches.
        pub(super) static CHUNK_ROWS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    /// The latent-major gradient pass taken in chunks of rows gives the one-pass gradients bit
    /// for bit (the sums per latent keep their order), for chunk sizes that do and do not
    /// divide the batch — with AuxK and groups, whose passes share the code.
    #[test]
    fn chunked_gradient_passes_give_the_one_pass_result() {
        let (n, d, s) = (23, 8, 24);
        for (ci, (act, groups, aux_k)) in [
            (TrainActivation::Relu, vec![], 0),
            (TrainActivation::TopK { k: 4 }, vec![8, 24], 2),
        ]
        .into_iter()
        .enumerate()
        {
            let st = test_state(act, groups, aux_k, true, (d, s), 11 + ci as u64);
            let x = rnd(n * d, 15 + ci as u64, 1.5);
            let mut scratch = Scratch::default();
            let (_, one) = st.gradients(&x, n, 0.05, &mut scratch).unwrap();
            assert!(
                chunk_rows(d) >= n,
                "the default takes this batch in one pass"
            );
            for rows in [1, 5, 22] {
                CHUNK_ROWS.set(Some(rows));
                let (_, g) = st.gradients(&x, n, 0.05, &mut scratch).unwrap();
                CHUNK_ROWS.set(None);
                for (name, a, b) in [
                    ("w_enc", &g.w_enc, &one.w_enc),
                    ("b_enc", &g.b_enc, &one.b_enc),
                    ("w_dec", &g.w_dec, &one.w_dec),
                ] {
                    assert!(a.iter().any(|&v| v != 0.0), "case {ci} {name}: all zero");
                    assert_eq!(a, b, "case {ci} {name}, chunks of {rows} rows");
                }
            }
        }
    }

    #[test]
    fn sparse_dense_and_autograd_gradients_agree() {
        let (n, d, s) = (16, 8, 24);
        let cases = [
            (TrainActivation::Relu, vec![], 0),
            (TrainActivation::Relu, vec![6, 12, 24], 0),
            (TrainActivation::TopK { k: 3 }, vec![], 4),
            (TrainActivation::TopK { k: 4 }, vec![8, 24], 2),
            (TrainActivation::BatchTopK { k: 3 }, vec![], 0),
            (TrainActivation::BatchTopK { k: 2 }, vec![4, 10, 24], 3),
            (
                TrainActivation::JumpRelu {
                    bandwidth: 0.4,
                    init_threshold: 0.1,
                    init_density: None,
                },
                vec![],
                0,
            ),
            (
                TrainActivation::JumpRelu {
                    bandwidth: 0.3,
                    init_threshold: 0.2,
                    init_density: None,
                },
                vec![6, 12, 24],
                2,
            ),
        ];
        for (ci, (act, groups, aux_k)) in cases.into_iter().enumerate() {
            let mut st = test_state(act, groups, aux_k, ci % 2 == 0, (d, s), 1 + ci as u64);
            st.normalise_decoder();
            // Thresholds spread over 0.05..0.65, so the STE window catches some entries.
            for (i, lt) in st.log_threshold.iter_mut().enumerate() {
                *lt = (0.05 + 0.6 * ((i * 7) % s) as f32 / s as f32).ln();
            }
            let x = rnd(n * d, 5 + ci as u64, 1.5);
            let mut scratch = Scratch::default();
            let (ss, gs) = st.gradients(&x, n, 0.05, &mut scratch).unwrap();
            st.recipe.kernels = Kernels::Dense;
            let (sd, gd) = st.gradients(&x, n, 0.05, &mut scratch).unwrap();
            assert!(!ss.dense && sd.dense);
            assert!(
                (ss.loss - sd.loss).abs() <= 1e-6 * ss.loss.abs(),
                "case {ci}: loss"
            );
            let gr = reference(&st, &x, n, 0.05);
            for (name, a, b, r) in [
                ("w_enc", &gs.w_enc, &gd.w_enc, &gr.w_enc),
                ("b_enc", &gs.b_enc, &gd.b_enc, &gr.b_enc),
                ("w_dec", &gs.w_dec, &gd.w_dec, &gr.w_dec),
                ("b_dec", &gs.b_dec, &gd.b_dec, &gr.b_dec),
                (
                    "log_threshold",
                    &gs.log_threshold,
                    &gd.log_threshold,
                    &gr.log_threshold,
                ),
            ] {
                assert_eq!((a.len(), b.len()), (r.len(), r.len()), "case {ci} {name}");
                assert!(
                    rel(a, b) <= 1e-5,
                    "case {ci} {name}: sparse vs dense {}",
                    rel(a, b)
                );
                assert!(
                    rel(a, r) <= 1e-5,
                    "case {ci} {name}: sparse vs autograd {}",
                    rel(a, r)
                );
            }
            if aux_k > 0 {
                assert!(ss.aux > 0.0, "case {ci}: AuxK had dead latents to use");
            }
            if !st.log_threshold.is_empty() {
                assert!(
                    gs.log_threshold.iter().filter(|&&g| g != 0.0).count() >= s / 4,
                    "case {ci}: the STE window caught too few latents to test"
                );
            }
        }
    }

    /// The encoder of a TopK / ReLU / TopK + AuxK step at sizes where the bf16 screen runs (on
    /// AMX; elsewhere both sides are the f32 path) selects what the f32 GEMM's pre-activations
    /// select, with their values up to f32 rounding.
    #[test]
    fn the_screened_encoder_selects_what_the_f32_encoder_selects() {
        let (n, d, s) = (600, 64, 1024);
        let x = rnd(n * d, 7, 1.0);
        let cases = [
            (TrainActivation::TopK { k: 16 }, 0),
            (TrainActivation::Relu, 0),
            (TrainActivation::TopK { k: 16 }, 4),
        ];
        for (act, aux_k) in cases {
            let recipe = Recipe {
                activation: act,
                groups: vec![],
                aux_k,
                aux_coef: 1.0 / 32.0,
                dead_window_patches: 100,
                unit_norm_decoder: true,
                max_grad_norm: None,
                kernels: Kernels::Auto,
                dense_above: 0.05,
                relu_init_density: None,
            };
            // b_enc −0.7: a ReLU keeps about 2% (pre-activations have std ≈ 0.33).
            let mut st = TrainState::new(
                rnd(s * d, 1, 0.125),
                vec![-0.7; s],
                rnd(s * d, 3, 0.125),
                rnd(d, 4, 0.1),
                recipe,
            )
            .unwrap();
            // A third of the latents dead, for AuxK.
            for c in st.since_fired.iter_mut().step_by(3) {
                *c = 1000;
            }
            let mut scratch = Scratch::default();
            let enc = st.encode(&x, n, &mut scratch);
            let got = enc.f;
            let mut pre = Vec::new();
            st.pre_activations(&x, n, &mut pre, true);
            let keep = match act {
                TrainActivation::TopK { k } => chosen(&pre, s, k, false, None),
                _ => pre.iter().map(|&v| v > 0.0).collect(),
            };
            let want: Vec<usize> = (0..n * s).filter(|&i| keep[i]).collect();
            let got_at: Vec<usize> = (0..n)
                .flat_map(|r| got.row(r).0.iter().map(move |&j| r * s + j as usize))
                .collect();
            assert_eq!(got_at, want, "{act:?}");
            assert!(want.len() > n, "{act:?}: {} selected", want.len());
            for (&at, &v) in got_at.iter().zip(&got.val) {
                assert!(
                    (v - pre[at]).abs() <= 1e-5,
                    "{act:?} at {at}: {v} vs {}",
                    pre[at]
                );
            }
            let dead = st.dead_mask();
            assert_eq!(enc.aux.is_some(), aux_k > 0);
            if let Some(aux) = enc.aux {
                let want = select_topk_masked(&pre, s, aux_k, &dead);
                assert_eq!((&aux.ptr, &aux.idx), (&want.ptr, &want.idx), "AuxK");
                assert!(aux.idx.iter().all(|&j| dead[j as usize]) && aux.nnz() > n);
                for (a, b) in aux.val.iter().zip(&want.val) {
                    assert!((a - b).abs() <= 1e-5, "AuxK: {a} vs {b}");
                }
            }
        }
    }

    /// ReLU's first-batch start: with `b_enc` lowered by each latent's `(1 − p)` quantile (rank
    /// `round((1 − p)(n − 1))` of `n` pre-activations), exactly the `n − 1 − rank` rows above it
    /// fire on that batch — 20 of 201 at p = 0.1 — whatever the weights (21 when rounding leaves
    /// the quantile's own row, now at 0, a hair above); without it, about half.
    #[test]
    fn relu_first_batch_start_fires_each_latent_on_its_density() {
        let (d, s, n) = (6, 16, 201);
        let recipe = |p: Option<f32>| Recipe {
            activation: TrainActivation::Relu,
            groups: vec![],
            aux_k: 0,
            aux_coef: 0.0,
            dead_window_patches: 1 << 20,
            unit_norm_decoder: true,
            max_grad_norm: None,
            kernels: Kernels::Auto,
            dense_above: 0.05,
            relu_init_density: p,
        };
        let x = rnd(n * d, 9, 1.0);
        let mk = |p| {
            TrainState::new(
                rnd(s * d, 5, 0.5),
                rnd(s, 6, 0.3),
                rnd(s * d, 7, 0.5),
                rnd(d, 8, 0.1),
                recipe(p),
            )
            .unwrap()
        };
        let mut sc = Scratch::default();
        let (_, fired) = mk(Some(0.1)).step(&x, n, 0.0, 0.0, &mut sc).unwrap();
        assert!(fired.iter().all(|&c| c == 20 || c == 21), "{fired:?}");
        assert!(
            fired.iter().filter(|&&c| c == 20).count() > s / 2,
            "{fired:?}"
        );
        let (_, fired) = mk(None).step(&x, n, 0.0, 0.0, &mut sc).unwrap();
        let mean = fired.iter().sum::<u32>() as f64 / s as f64;
        assert!(mean > 40.0, "{fired:?}");
    }

    #[test]
    fn bad_groups_and_shapes_are_errors() {
        let recipe = Recipe {
            activation: TrainActivation::Relu,
            groups: vec![8, 4],
            aux_k: 0,
            aux_coef: 0.0,
            dead_window_patches: 1,
            unit_norm_decoder: true,
            max_grad_norm: None,
            kernels: Kernels::Auto,
            dense_above: 0.05,
            relu_init_density: None,
        };
        let mk = |r: Recipe| {
            TrainState::new(vec![0.0; 16], vec![0.0; 8], vec![0.0; 16], vec![0.0; 2], r)
        };
        assert!(mk(recipe.clone()).is_err());
        let ok = mk(Recipe {
            groups: vec![],
            ..recipe
        })
        .unwrap();
        let mut sc = Scratch::default();
        assert!(matches!(
            ok.gradients(&[0.0; 5], 2, 0.0, &mut sc),
            Err(Error::Shape { .. })
        ));
    }
}
