//! One SAE under training on any candle device (CUDA, or the CPU for equivalence tests): the
//! same objective, gradients and Adam as [`super::step`]'s CPU kernels, written as dense candle
//! ops — dense encode, selection by exact top-k, dense decode, explicit gradients (no autograd
//! graph: the gradients are the closed forms `step` documents), Adam, unit-norm decoder
//! rows and parallel-gradient removal. Every recipe: ReLU + L1 (with the data-driven start),
//! TopK, BatchTopK (with its inference-threshold EMA), JumpReLU (straight-through θ), AuxK over
//! dead latents, Matryoshka prefixes, gradient clipping.
//!
//! The weights and Adam moments live on the device as tensors; the host [`TrainState`] keeps the
//! recipe, the step count, the dead-latent counters and the BatchTopK threshold, and receives
//! the tensors on [`DeviceState::write_back`] (before a checkpoint or an export), so checkpoints
//! are the same files whichever device trained them.
//!
//! Selection on a GPU: candle's CUDA sort holds a row in shared memory, so per-row top-k sorts
//! chunks of [`SORT_CHUNK`] columns and then the chunks' winners (exact); BatchTopK finds the
//! batch's `k·n`-th largest value by bisection on the bit patterns of positive floats (≤ 32
//! counting passes, exact; ties at the boundary are all kept, where the CPU keeps exactly
//! `k·n`).
//!
//! ```text
//! let mut dev = DeviceState::new(&state, &Device::new_cuda(0)?)?;
//! let (stats, fired) = dev.step(&mut state, &x_nd, lr, lambda)?;   // x_nd on the device
//! dev.write_back(&mut state)?;                                      // before saving
//! ```

use candle_core::{DType, Device, Tensor, D};

use super::step::{StepStats, TrainActivation, TrainState, BETA1, BETA2, EPS, THRESHOLD_RATE};
use crate::error::{CandleContext, Computing, Error, Result};

/// Columns sorted at once by the per-row top-k (candle's CUDA bitonic sort keeps a padded row of
/// u32 indices in shared memory: 4096 columns = 16 KiB, within every GPU's 48 KiB).
pub const SORT_CHUNK: usize = 4096;

/// The device copy of one [`TrainState`]'s weights and Adam moments.
pub struct DeviceState {
    device: Device,
    /// `[d_sae, d]`, `[d_sae]`, `[d_sae, d]`, `[d]`, `[d_sae]` or empty (JumpReLU's ln θ).
    params: [Tensor; 5],
    adam_m: [Tensor; 5],
    adam_v: [Tensor; 5],
}

impl std::fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (s, d) = self.params[0].dims2().unwrap_or((0, 0));
        write!(f, "DeviceState(d={d}, d_sae={s} on {:?})", self.device)
    }
}

/// What one step's forward hands to its backward.
struct Forward {
    xc: Tensor,
    pre: Tensor,
    /// The code `[n, s]` and its 0/1 mask.
    f: Tensor,
    mask: Tensor,
    /// Raw errors `x̂_j − x` per Matryoshka group.
    errs: Vec<Tensor>,
    /// AuxK's code among dead latents and its mask.
    aux: Option<(Tensor, Tensor)>,
    min_kept: Option<f32>,
}

impl DeviceState {
    /// Copy `st`'s weights and moments to `device`.
    pub fn new(st: &TrainState, device: &Device) -> Result<Self> {
        let (s, d) = (st.s, st.d);
        let put = |v: &[f32], shape: &[usize]| -> Result<Tensor> {
            let shape = if v.is_empty() {
                vec![0]
            } else {
                shape.to_vec()
            };
            Tensor::from_slice(v, shape, device).context("copying SAE weights to the device")
        };
        let shapes: [&[usize]; 5] = [&[s, d], &[s], &[s, d], &[d], &[s]];
        let host = [
            &st.w_enc,
            &st.b_enc,
            &st.w_dec,
            &st.b_dec,
            &st.log_threshold,
        ];
        let mut params = Vec::new();
        let mut m = Vec::new();
        let mut v = Vec::new();
        for i in 0..5 {
            params.push(put(host[i], shapes[i])?);
            m.push(put(&st.adam_m[i], shapes[i])?);
            v.push(put(&st.adam_v[i], shapes[i])?);
        }
        let arr = |v: Vec<Tensor>| -> [Tensor; 5] {
            // Five pushed above.
            v.try_into().unwrap_or_else(|_| unreachable!())
        };
        Ok(Self {
            device: device.clone(),
            params: arr(params),
            adam_m: arr(m),
            adam_v: arr(v),
        })
    }

    /// Where the tensors live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Copy the device's weights and moments into `st` (its counters are already current).
    pub fn write_back(&self, st: &mut TrainState) -> Result<()> {
        let get = |t: &Tensor| -> Result<Vec<f32>> {
            t.flatten_all()?
                .to_vec1::<f32>()
                .context("copying SAE weights from the device")
        };
        let dst = [
            &mut st.w_enc,
            &mut st.b_enc,
            &mut st.w_dec,
            &mut st.b_dec,
            &mut st.log_threshold,
        ];
        for (d, t) in dst.into_iter().zip(&self.params) {
            *d = get(t)?;
        }
        for i in 0..5 {
            st.adam_m[i] = get(&self.adam_m[i])?;
            st.adam_v[i] = get(&self.adam_v[i])?;
        }
        Ok(())
    }

    /// Whether every weight and moment is finite (one reduction; [`DeviceState::write_back`]
    /// then [`TrainState::first_non_finite`] names the culprit).
    pub fn all_finite(&self) -> Result<bool> {
        // A NaN or ±∞ anywhere makes the sum of |·| non-finite (so may an overflow: the
        // caller's exact check on the host decides). One reduction, one transfer.
        let sums = self
            .params
            .iter()
            .chain(&self.adam_m)
            .chain(&self.adam_v)
            .filter(|t| t.elem_count() > 0)
            .map(|t| t.abs()?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?;
        Ok(total.is_finite())
    }

    /// [`TrainState::step`] on the device: `x_nd` `[n, d]` on this device. Updates the tensors
    /// and `st`'s counters (steps, dead-latent counters, BatchTopK threshold).
    pub fn step(
        &mut self,
        st: &mut TrainState,
        x_nd: &Tensor,
        lr: f64,
        lambda: f64,
    ) -> Result<(StepStats, Vec<u32>)> {
        self.step_inner(st, x_nd, lr, lambda)
            .computing(|| format!("device SAE step on {:?}", x_nd.dims()))
    }

    fn step_inner(
        &mut self,
        st: &mut TrainState,
        x: &Tensor,
        lr: f64,
        lambda: f64,
    ) -> Result<(StepStats, Vec<u32>)> {
        let (n, d) = x.dims2()?;
        if d != st.d || n == 0 {
            return Err(Error::Shape {
                what: "training batch".into(),
                expected: vec![n.max(1), st.d],
                actual: vec![n, d],
            });
        }
        if st.recipe.unit_norm_decoder {
            let w = &self.params[2];
            let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
            let safe = norm.gt(0.0)?.where_cond(&norm, &norm.ones_like()?)?;
            self.params[2] = w.broadcast_div(&safe)?;
        }
        if st.t == 0 {
            self.data_driven_start(st, x)?;
        }
        let fw = self.forward(st, x)?;
        let (mut stats, grads) = self.backward(st, x, &fw, lambda)?;
        stats.lr = lr;
        let grads = self.clip(st, grads)?;
        self.adam(st, &grads, lr)?;
        if let (TrainActivation::BatchTopK { .. }, Some(m)) = (st.recipe.activation, fw.min_kept) {
            st.threshold = if st.t == 1 {
                m
            } else {
                (1.0 - THRESHOLD_RATE) * st.threshold + THRESHOLD_RATE * m
            };
        }
        let fired: Vec<u32> = fw
            .mask
            .sum(0)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|c| c.round() as u32)
            .collect();
        for (c, &k) in st.since_fired.iter_mut().zip(&fired) {
            *c = if k > 0 { 0 } else { c.saturating_add(n as u64) };
        }
        Ok((stats, fired))
    }

    /// `(x − b_dec) W_encᵀ + b_enc` and the centred batch.
    fn pre_activations(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let xc = x.broadcast_sub(&self.params[3])?;
        let pre = xc
            .matmul(&self.params[0].t()?)?
            .broadcast_add(&self.params[1])?;
        Ok((xc, pre))
    }

    /// The first step's data-driven start (see `TrainState::quantiles_from_batch`): JumpReLU's θ
    /// or ReLU's lowered `b_enc` from each latent's `(1 − density)` quantile on this batch.
    fn data_driven_start(&mut self, st: &TrainState, x: &Tensor) -> Result<()> {
        let density = match (st.recipe.activation, st.recipe.relu_init_density) {
            (
                TrainActivation::JumpRelu {
                    init_density: Some(p),
                    ..
                },
                _,
            ) => p,
            (TrainActivation::Relu, Some(p)) => p,
            _ => return Ok(()),
        };
        let n = x.dim(0)?;
        let (_, pre) = self.pre_activations(x)?;
        let rank = ((1.0 - f64::from(density).clamp(0.0, 1.0)) * (n - 1) as f64).round() as usize;
        // The rank-th smallest of each column = the (n − rank)-th largest.
        let k = n - rank;
        let (vals, _) = topk_rows(&pre.t()?.contiguous()?, k)?;
        let q = vals.narrow(1, k - 1, 1)?.squeeze(1)?;
        if matches!(st.recipe.activation, TrainActivation::JumpRelu { .. }) {
            self.params[4] = q.maximum(1e-6)?.log()?;
        } else {
            self.params[1] = (&self.params[1] - q)?;
        }
        Ok(())
    }

    /// Encode, select, decode every group, and AuxK's selection.
    fn forward(&self, st: &TrainState, x: &Tensor) -> Result<Forward> {
        let (n, s) = (x.dim(0)?, st.s);
        let (xc, pre) = self.pre_activations(x)?;
        let mut min_kept = None;
        let mask = match st.recipe.activation {
            TrainActivation::Relu => pre.gt(0.0)?,
            TrainActivation::JumpRelu { .. } => {
                pre.broadcast_gt(&self.params[4].exp()?.unsqueeze(0)?)?
            }
            TrainActivation::TopK { k } => topk_mask(&pre, k.min(s))?,
            TrainActivation::BatchTopK { k } => {
                let (m, t) = batch_topk_mask(&pre, k * n)?;
                min_kept = Some(t);
                m
            }
        }
        .to_dtype(DType::F32)?;
        let f = (&pre * &mask)?;
        let mut errs = Vec::new();
        let mut acc = self.params[3].unsqueeze(0)?.broadcast_as((n, st.d))?;
        let mut a = 0;
        for e in group_ends(st) {
            let part = f
                .narrow(1, a, e - a)?
                .matmul(&self.params[2].narrow(0, a, e - a)?)?;
            acc = (acc + part)?;
            errs.push((&acc - x)?);
            a = e;
        }
        let dead: Vec<f32> = st
            .dead_mask()
            .iter()
            .map(|&b| if b { 1.0 } else { 0.0 })
            .collect();
        let aux = if st.recipe.aux_k > 0 && dead.iter().any(|&v| v > 0.0) {
            let dead = Tensor::from_vec(dead, (1, s), &self.device)?;
            let ninf = Tensor::full(f32::NEG_INFINITY, (n, s), &self.device)?;
            let masked = dead
                .broadcast_as((n, s))?
                .gt(0.0)?
                .where_cond(&pre, &ninf)?;
            let zmask = topk_mask(&masked, st.recipe.aux_k.min(s))?.to_dtype(DType::F32)?;
            Some(((&pre * &zmask)?, zmask))
        } else {
            None
        };
        Ok(Forward {
            xc,
            pre,
            f,
            mask,
            errs,
            aux,
            min_kept,
        })
    }

    /// Loss terms and the gradients of the five parameters (see `TrainState::gradients_inner`).
    fn backward(
        &self,
        st: &TrainState,
        x: &Tensor,
        fw: &Forward,
        lambda: f64,
    ) -> Result<(StepStats, [Tensor; 5])> {
        let (n, d) = x.dims2()?;
        let gn = fw.errs.len();
        let n_el = (n * d) as f64;
        let scalar = |t: Tensor| -> Result<f64> { Ok(f64::from(t.to_scalar::<f32>()?)) };
        let sq: Vec<f64> = fw
            .errs
            .iter()
            .map(|e| scalar(e.sqr()?.sum_all()?))
            .collect::<Result<_>>()?;
        let var = scalar(total_variance(x)?)?;
        let l1 = scalar(fw.f.sum_all()?)? / n as f64;
        let l0 = scalar(fw.mask.sum_all()?)? / n as f64;
        let uses_l1 = matches!(st.recipe.activation, TrainActivation::Relu);
        let jump = matches!(st.recipe.activation, TrainActivation::JumpRelu { .. });
        let lambda = if uses_l1 || jump { lambda } else { 0.0 };
        let l0_coef = if jump { lambda / d as f64 } else { 0.0 };
        let l1_coef = if uses_l1 { lambda } else { 0.0 };
        let w_dec = &self.params[2];

        // AuxK: e = x − x̂_G (no gradient), ê = z W_dec.
        let (aux_loss, g_aux) = match &fw.aux {
            Some((z, _)) => {
                let resid = fw.errs[gn - 1].neg()?;
                let z_var = scalar(total_variance(&resid)?)?.max(1e-30);
                let diff = (z.matmul(w_dec)? - resid)?;
                let aux_loss = scalar(diff.sqr()?.sum_all()?)? / z_var;
                let g = diff.affine(st.recipe.aux_coef * 2.0 / z_var, 0.0)?;
                (aux_loss, Some(g))
            }
            None => (0.0, None),
        };
        let loss = sq.iter().sum::<f64>() / (gn as f64 * n_el)
            + l1_coef * l1
            + l0_coef * l0
            + st.recipe.aux_coef * aux_loss;

        // dL/dx̂_j = 2 e_j / (G n d), suffix-summed over the groups.
        let c = 2.0 / (gn as f64 * n_el);
        let mut gs: Vec<Tensor> = Vec::with_capacity(gn);
        for e in fw.errs.iter().rev() {
            let g = e.affine(c, 0.0)?;
            let g = match gs.last() {
                Some(above) => (g + above)?,
                None => g,
            };
            gs.push(g);
        }
        gs.reverse();
        // ∂L/∂f and ∂L/∂W_dec per group block.
        let mut df_parts = Vec::with_capacity(gn);
        let mut gw_parts = Vec::with_capacity(gn);
        let mut a = 0;
        for (g, e) in gs.iter().zip(group_ends(st)) {
            let w = w_dec.narrow(0, a, e - a)?;
            df_parts.push(g.matmul(&w.t()?)?);
            gw_parts.push(fw.f.narrow(1, a, e - a)?.t()?.matmul(g)?);
            a = e;
        }
        let df = Tensor::cat(&df_parts, 1)?;
        let mut g_w_dec = Tensor::cat(&gw_parts, 0)?;
        let dpre = ((&df + l1_coef / n as f64)? * &fw.mask)?;
        let mut g_w_enc = dpre.t()?.matmul(&fw.xc)?;
        let mut g_b_enc = dpre.sum(0)?;
        let g_log_threshold = match st.recipe.activation {
            TrainActivation::JumpRelu { bandwidth, .. } => {
                let theta = self.params[4].exp()?.unsqueeze(0)?;
                let window = fw
                    .pre
                    .broadcast_sub(&theta)?
                    .abs()?
                    .lt(f64::from(bandwidth) / 2.0)?
                    .to_dtype(DType::F32)?;
                let jump = df
                    .broadcast_mul(&theta)?
                    .affine(1.0, l0_coef / n as f64)?
                    .affine(-1.0 / f64::from(bandwidth), 0.0)?;
                (jump * window)?.sum(0)?.mul(&theta.squeeze(0)?)?
            }
            _ => self.params[4].clone(),
        };
        if let (Some((z, zmask)), Some(g_aux)) = (&fw.aux, &g_aux) {
            let dz = (g_aux.matmul(&w_dec.t()?)? * zmask)?;
            g_w_dec = (g_w_dec + z.t()?.matmul(g_aux)?)?;
            g_w_enc = (g_w_enc + dz.t()?.matmul(&fw.xc)?)?;
            g_b_enc = (g_b_enc + dz.sum(0)?)?;
        }
        // ∂L/∂b_dec = Σ_b ∂L/∂x̂ − ∂L/∂b_enc · W_enc (x is centred by b_dec).
        let g_b_dec =
            (gs[0].sum(0)? - g_b_enc.unsqueeze(0)?.matmul(&self.params[0])?.squeeze(0)?)?;
        if st.recipe.unit_norm_decoder {
            let par = (&g_w_dec * w_dec)?.sum_keepdim(1)?;
            g_w_dec = (g_w_dec - w_dec.broadcast_mul(&par)?)?;
        }
        let fired_rows = l0;
        let stats = StepStats {
            loss,
            mse: sq[gn - 1] / n_el,
            nmse: sq[gn - 1] / var.max(1e-30),
            l0: fired_rows,
            l1,
            aux: aux_loss,
            lr: 0.0,
            lambda,
            dense: true,
        };
        Ok((stats, [g_w_enc, g_b_enc, g_w_dec, g_b_dec, g_log_threshold]))
    }

    /// Global gradient-norm clipping (the recipe's `max_grad_norm`).
    fn clip(&self, st: &TrainState, grads: [Tensor; 5]) -> Result<[Tensor; 5]> {
        let Some(max) = st.recipe.max_grad_norm else {
            return Ok(grads);
        };
        let mut sq = 0f64;
        for g in grads.iter().filter(|g| g.elem_count() > 0) {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        let norm = sq.sqrt();
        if norm <= max {
            return Ok(grads);
        }
        let c = max / norm;
        let scaled: Vec<Tensor> = grads
            .iter()
            .map(|g| g.affine(c, 0.0))
            .collect::<candle_core::Result<_>>()?;
        Ok(scaled.try_into().unwrap_or_else(|_| unreachable!()))
    }

    /// Adam with bias correction, as the CPU step.
    fn adam(&mut self, st: &mut TrainState, grads: &[Tensor; 5], lr: f64) -> Result<()> {
        st.t += 1;
        let bc1 = 1.0 - BETA1.powi(st.t as i32);
        let bc2_sqrt = (1.0 - BETA2.powi(st.t as i32)).sqrt();
        let step = lr / bc1;
        for (i, g) in grads.iter().enumerate() {
            if g.elem_count() == 0 {
                continue;
            }
            let m = ((&self.adam_m[i] * BETA1)? + (g * (1.0 - BETA1))?)?;
            let v = ((&self.adam_v[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, EPS)?;
            self.params[i] = (&self.params[i] - (m.affine(step, 0.0)? / denom)?)?;
            self.adam_m[i] = m;
            self.adam_v[i] = v;
        }
        Ok(())
    }
}

fn group_ends(st: &TrainState) -> Vec<usize> {
    if st.recipe.groups.is_empty() {
        vec![st.s]
    } else {
        st.recipe.groups.clone()
    }
}

/// Σ_b ‖x_b − x̄‖² as a 0-d tensor.
fn total_variance(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_sub(&x.mean_keepdim(0)?)?.sqr()?.sum_all()
}

/// Per-row top `k` of a `[n, s]` tensor: values (descending) and their column ids, both `[n, k]`.
/// Exact; sorts at most [`SORT_CHUNK`] columns (or `k`'s next power of two) at once, then the
/// chunks' winners.
pub fn topk_rows(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let (n, s) = x.dims2()?;
    if k == 0 || k > s {
        return Err(Error::out_of_range(
            "top-k: k",
            k,
            format!("1..={s} (the row width)"),
        ));
    }
    let chunk = SORT_CHUNK.max(k.next_power_of_two());
    if s <= chunk {
        let idx = x.arg_sort_last_dim(false)?.narrow(1, 0, k)?.contiguous()?;
        let vals = x.contiguous()?.gather(&idx, 1)?;
        return Ok((vals, idx));
    }
    let dev = x.device();
    let nc = s.div_ceil(chunk);
    let padded = if nc * chunk > s {
        let pad = Tensor::full(f32::NEG_INFINITY, (n, nc * chunk - s), dev)?.to_dtype(x.dtype())?;
        Tensor::cat(&[x, &pad], 1)?
    } else {
        x.contiguous()?
    };
    let rows = padded.reshape((n * nc, chunk))?;
    let local = rows
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .contiguous()?;
    let vals = rows.gather(&local, 1)?.reshape((n, nc * k))?;
    let offs =
        Tensor::arange_step(0u32, (nc * chunk) as u32, chunk as u32, dev)?.reshape((1, nc, 1))?;
    let global = local
        .reshape((n, nc, k))?
        .broadcast_add(&offs)?
        .reshape((n, nc * k))?;
    let (top, pos) = topk_rows(&vals, k)?;
    Ok((top, global.gather(&pos, 1)?))
}

/// The 0/1 (u8) mask of each row's top `k` positive entries.
fn topk_mask(pre: &Tensor, k: usize) -> Result<Tensor> {
    let (vals, idx) = topk_rows(pre, k)?;
    let keep = vals.gt(0.0)?.to_dtype(DType::F32)?;
    let mask = pre.zeros_like()?.scatter_add(&idx, &keep, D::Minus1)?;
    Ok(mask.gt(0.0)?)
}

/// BatchTopK's selection: the mask of the `k_total` largest positive entries of `pre` (all the
/// positive ones when fewer) and the smallest kept value, found by bisection on the bit patterns
/// of positive floats (monotone in value).
fn batch_topk_mask(pre: &Tensor, k_total: usize) -> Result<(Tensor, f32)> {
    let count_ge = |t: f32| -> Result<u64> {
        let c = pre
            .ge(t)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()?;
        Ok(u64::from(c))
    };
    let pos = pre.gt(0.0)?;
    let n_pos = u64::from(pos.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()?);
    if n_pos == 0 || k_total == 0 {
        return Ok((pre.zeros_like()?.gt(0.0)?, 0.0));
    }
    if n_pos as usize <= k_total {
        let min_pos = pos
            .where_cond(pre, &pre.ones_like()?.affine(0.0, f64::from(f32::MAX))?)?
            .min_all()?
            .to_scalar::<f32>()?;
        return Ok((pos, min_pos));
    }
    // Invariant: count(pre ≥ lo) ≥ k_total > count(pre ≥ hi).
    let max = pre.max_all()?.to_scalar::<f32>()?;
    let (mut lo, mut hi) = (f32::from_bits(1).to_bits(), max.to_bits() + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if count_ge(f32::from_bits(mid))? as usize >= k_total {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let t = f32::from_bits(lo);
    Ok((pre.ge(t)?, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::uniforms;

    /// BatchTopK's threshold is the `k`-th largest positive value, by sorting, for spread,
    /// skewed, tied and tiny distributions; the mask keeps exactly the values at or above it.
    #[test]
    fn batch_topk_threshold_is_the_kth_largest_value() {
        let (n, s) = (64usize, 700usize);
        let u = uniforms(11, n * s, 1.0);
        let cases: Vec<(&str, Vec<f32>)> = vec![
            ("uniform", u.clone()),
            // Heavy tail: the top values spread over decades above a dense bulk.
            ("skewed", u.iter().map(|v| (8.0 * v).exp() - 1.0).collect()),
            // Few distinct values: ties at the threshold.
            ("tied", u.iter().map(|v| (v * 4.0).round() / 4.0).collect()),
            ("tiny", u.iter().map(|v| v * 1e-30).collect()),
        ];
        for (name, v) in cases {
            let pre = Tensor::from_vec(v.clone(), (n, s), &Device::Cpu).unwrap();
            let mut pos: Vec<f32> = v.iter().copied().filter(|x| *x > 0.0).collect();
            pos.sort_by(|a, b| b.total_cmp(a));
            for k_total in [1, 7, n * 32, pos.len() - 1, pos.len(), pos.len() + 5] {
                let (mask, t) = batch_topk_mask(&pre, k_total).unwrap();
                let want = pos[k_total.min(pos.len()) - 1];
                assert_eq!(t, want, "{name}, k_total {k_total}");
                let kept = mask
                    .to_dtype(DType::U32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<u32>()
                    .unwrap() as usize;
                assert_eq!(kept, pos.iter().filter(|x| **x >= want).count(), "{name}");
            }
        }
    }
}
