//! The backward half of a training step: `∂L/∂pre` at the active entries and the gradients of
//! `W_enc`, `b_enc`, `W_dec` (sparse kernels or dense GEMMs), JumpReLU's thresholds, AuxK's
//! dead latents and `b_dec`.

use rayon::prelude::*;

use super::{chunk_rows, DeadBlock, Grads, Kernels, Scratch, TrainState};
use crate::sae::linalg::{axpy, dot, gemm, Csr, Mat, Transposed};

impl TrainState {
    /// The latents' gradients: `∂L/∂pre` at the active entries and from it `W_enc`, `b_enc`,
    /// `W_dec` — dense GEMMs or the sparse kernels.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn latent_grads(
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

    /// `∂L/∂ln θ` by the paper's straight-through estimator: with `K` the rectangle of width
    /// ε (`bandwidth`) around θ, each (row, latent) whose pre-activation falls in it adds
    /// `−(θ/ε) ∂L/∂f` (the jump of `f` at θ) and `−(1/ε) · l0_coef / n` (the jump of `H`);
    /// then `× θ` for the log parameterisation. `gs` holds `∂L/∂x̂` per group (suffix sums), so
    /// `∂L/∂f_bi = W_dec[i] · gs[b, group(i)]`.
    pub(super) fn threshold_grads(
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
    pub(super) fn dead_block(&self, z: &Csr, n: usize) -> Option<DeadBlock> {
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
    pub(super) fn aux_grads_dense(
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
    pub(super) fn aux_grads(&self, z: &Csr, g_aux: &[f32], xc: &[f32], grads: &mut Grads) {
        let (d, s) = (self.d, self.s);
        let t = z.transpose(s);
        let vec_of = |b: usize, _: usize| &g_aux[b * d..(b + 1) * d];
        self.add_latent_grads(&t, &z.val, xc, grads, vec_of, dot);
    }

    /// `∂L/∂b_dec = Σ_b ∂L/∂x̂ − Σ_s ∂L/∂b_enc[s] · W_enc[s]` (x is centred by b_dec), then the
    /// decoder's parallel-gradient removal (unit-norm rows).
    pub(super) fn b_dec_grad(&self, gs: &[f32], n: usize, grads: &mut Grads) {
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

    /// Per latent `s` (parallel, each row of the gradients written by one task):
    /// `∂W_dec[s] += Σ f · v(b, s)`, `∂W_enc[s] += Σ ∂pre · xc[b]`, `∂b_enc[s] += Σ ∂pre`, with
    /// `∂pre = dpre_of(W_dec[s], v(b, s))` computed here, where both are in cache (a
    /// batch-major pass would fetch a random decoder row per active entry).
    ///
    /// The batch is taken in chunks of rows whose `v` and `xc` rows fit in L2 together: each
    /// pass over the latents reads only that chunk's rows, each latent resuming its (row-sorted)
    /// entries where the last pass stopped — the sums run in the same order, so the result is
    /// the one-pass result bit for bit, with random row fetches from L2 instead of L3.
    pub(super) fn add_latent_grads<'a, V, P>(
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
}
