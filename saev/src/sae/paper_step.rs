//! The paper-era ReLU SAE training step (saev 0.1.0), with explicit gradients.
//!
//! Per step, as `saev.training.train` does: set decoder rows to unit norm; forward
//! `f = relu((x − b_dec) W_enc + b_enc)`, `x̂ = f W_dec + b_dec`; loss = safe MSE (mean of squared
//! error, computed after dividing by max|x| and rescaled) + λ · mean_b Σ_s f; backward; remove
//! the gradient component parallel to each decoder row; Adam (torch defaults, bias-corrected)
//! with the step's learning rate; then advance the linear warm-up (which starts at lr 0, so the
//! first update only fills Adam's moments). The sparsity warm-up of 0.1.0 is a no-op there (a
//! bug); this step reproduces that for parity — the full trainer (issue #4) makes it work.
//!
//! The gradients are written out (not autograd) because the fast trainer replaces the dense
//! products by sparse ones when `f` is sparse; this dense version is their reference.
//!
//! ```text
//! let mut t = PaperReluStep::new(w_enc, b_enc, w_dec, b_dec, lr, lambda, n_warmup)?;
//! let terms = t.step(&x_bd)?;   // mse, sparsity, loss, l0, l1 before the update
//! ```

use candle_core::{Tensor, D};

use crate::error::Result;

/// Loss terms of one step (computed before the update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossTerms {
    /// Safe MSE.
    pub mse: f32,
    /// λ · L1.
    pub sparsity: f32,
    /// mse + sparsity.
    pub loss: f32,
    /// Mean active latents per row.
    pub l0: f32,
    /// Mean Σ f per row.
    pub l1: f32,
}

struct Adam {
    m: Tensor,
    v: Tensor,
}

/// One paper-era ReLU SAE under training (weights, Adam state, schedule).
pub struct PaperReluStep {
    /// `[d, d_sae]`.
    pub w_enc: Tensor,
    /// `[d_sae]`.
    pub b_enc: Tensor,
    /// `[d_sae, d]`.
    pub w_dec: Tensor,
    /// `[d]`.
    pub b_dec: Tensor,
    adam: Vec<Adam>,
    lr_final: f64,
    lr: f64,
    lambda: f64,
    n_warmup: usize,
    t: usize,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl PaperReluStep {
    /// Start from initial weights; `lr` is reached after `n_warmup` linear steps from 0.
    pub fn new(
        w_enc: Tensor,
        b_enc: Tensor,
        w_dec: Tensor,
        b_dec: Tensor,
        lr: f64,
        lambda: f64,
        n_warmup: usize,
    ) -> Result<Self> {
        let adam = [&w_enc, &b_enc, &w_dec, &b_dec]
            .iter()
            .map(|p| {
                Ok(Adam {
                    m: p.zeros_like()?,
                    v: p.zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            adam,
            lr_final: lr,
            lr: 0.0,
            lambda,
            n_warmup,
            t: 0,
        })
    }

    /// Set λ (the trainer's sparsity warm-up).
    pub fn set_lambda(&mut self, lambda: f64) {
        self.lambda = lambda;
    }

    /// The learning rate the next step will use.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// One training step on `x_bd` (`[B, d]`).
    pub fn step(&mut self, x_bd: &Tensor) -> Result<LossTerms> {
        Ok(self.step_inner(x_bd)?.0)
    }

    /// [`PaperReluStep::step`], also returning which latents fired in the batch.
    pub fn step_with_activity(&mut self, x_bd: &Tensor) -> Result<(LossTerms, Vec<bool>)> {
        let (terms, active) = self.step_inner(x_bd)?;
        let counts: Vec<f32> = active.sum(0)?.to_vec1()?;
        Ok((terms, counts.into_iter().map(|c| c > 0.0).collect()))
    }

    fn step_inner(&mut self, x_bd: &Tensor) -> Result<(LossTerms, Tensor)> {
        let (b, d) = x_bd.dims2()?;
        // Unit-norm decoder rows.
        self.w_dec = self
            .w_dec
            .broadcast_div(&self.w_dec.sqr()?.sum_keepdim(1)?.sqrt()?)?;
        let xc = x_bd.broadcast_sub(&self.b_dec)?;
        let h = xc.matmul(&self.w_enc)?.broadcast_add(&self.b_enc)?;
        let active = h.gt(0.0)?.to_dtype(candle_core::DType::F32)?;
        let f = h.relu()?;
        let x_hat = f.matmul(&self.w_dec)?.broadcast_add(&self.b_dec)?;
        let err = (&x_hat - x_bd)?;
        // safe_mse: divide by max|x|, square, rescale by max|x|²; mean over elements.
        let upper = f64::from(x_bd.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
        let mse =
            ((&err / upper)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 * upper * upper) as f32;
        let l1 = f.sum(1)?.mean_all()?.to_scalar::<f32>()?;
        let l0 = active.sum(1)?.mean_all()?.to_scalar::<f32>()?;
        let sparsity = (self.lambda * f64::from(l1)) as f32;
        let terms = LossTerms {
            mse,
            sparsity,
            loss: mse + sparsity,
            l0,
            l1,
        };

        // Backward.
        let g = (&err * (2.0 / (b * d) as f64))?; // dL/dx̂
        let mut d_w_dec = f.t()?.matmul(&g)?;
        let d_f = (g.matmul(&self.w_dec.t()?)? + self.lambda / b as f64)?;
        let d_h = (d_f * &active)?;
        let d_w_enc = xc.t()?.matmul(&d_h)?;
        let d_b_enc = d_h.sum(0)?;
        let d_b_dec = (g.sum(0)? - d_h.matmul(&self.w_enc.t()?)?.sum(0)?)?;
        // Remove the component of each decoder row's gradient parallel to the row.
        let par = (&d_w_dec * &self.w_dec)?.sum_keepdim(D::Minus1)?;
        d_w_dec = (d_w_dec - self.w_dec.broadcast_mul(&par)?)?;

        // Adam with this step's lr, then advance the warm-up.
        self.t += 1;
        let (bc1, bc2) = (
            1.0 - BETA1.powi(self.t as i32),
            1.0 - BETA2.powi(self.t as i32),
        );
        let grads = [d_w_enc, d_b_enc, d_w_dec, d_b_dec];
        let params = [
            &mut self.w_enc,
            &mut self.b_enc,
            &mut self.w_dec,
            &mut self.b_dec,
        ];
        for ((p, g), st) in params.into_iter().zip(grads).zip(self.adam.iter_mut()) {
            st.m = ((&st.m * BETA1)? + (&g * (1.0 - BETA1))?)?;
            st.v = ((&st.v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let denom = ((st.v.sqrt()? / bc2.sqrt())? + EPS)?;
            *p = (&*p - ((&st.m / &denom)? * (self.lr / bc1))?)?;
        }
        self.lr = if self.t < self.n_warmup {
            self.lr_final * self.t as f64 / self.n_warmup as f64
        } else {
            self.lr_final
        };
        Ok((terms, active))
    }
}
