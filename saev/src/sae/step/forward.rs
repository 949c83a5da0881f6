//! The forward half of a training step: the centred batch, the encoder GEMM and the selection
//! of the active latents (ReLU, TopK, BatchTopK, JumpReLU; from the bf16 screen where it pays),
//! AuxK's selection among the dead latents, the Matryoshka groups' errors and AuxK's residual.

use rayon::prelude::*;

use super::{
    det_sum, sum_sq, total_variance, DeadBlock, Encoded, Kernels, Scratch, TrainActivation,
    TrainState,
};
use crate::sae::linalg::{
    axpy, gemm, select_above, select_above_biased, select_above_each, select_batch_topk,
    select_topk, select_topk_biased, select_topk_masked, sparse_rows_times, Csr, Mat,
};
use crate::sae::screen;

impl TrainState {
    /// `pre = (x − b_dec) W_encᵀ (+ b_enc)` into `pre` (`[n, d_sae]`); returns the centred
    /// batch.
    pub(super) fn pre_activations(
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
    pub(super) fn centred(&self, x_nd: &[f32]) -> Vec<f32> {
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
    pub(super) fn quantiles_from_batch(
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

    /// Encoder and selection: `pre = (x − b_dec) W_encᵀ + b_enc` (kept in `scratch.pre`), the
    /// active latents `f`, the AuxK selection among dead latents, and the kernel choice.
    pub(super) fn encode(&self, x_nd: &[f32], n: usize, scratch: &mut Scratch) -> Encoded {
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
    pub(super) fn aux_among_dead(&self, xc: &[f32], n: usize, dead: &[bool]) -> Csr {
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
    pub(super) fn encoded(
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
    pub(super) fn group_errors(
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
    pub(super) fn aux_residual(
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
}
