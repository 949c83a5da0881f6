//! One vision transformer for DINOv2, CLIP and SigLIP, with public blocks.
//!
//! Follows the HF transformers implementations (`Dinov2Model`, `Dinov2WithRegistersModel`,
//! `CLIPVisionTransformer`, `SiglipVisionTransformer`): the `VarBuilder` paths are the checkpoint
//! keys. Unlike candle-transformers' models, the pieces are exposed so the residual stream can be
//! read after any block and the network resumed from an edited block output:
//! [`Vit::embed`] → [`Vit::run_blocks`] → [`Vit::finish`].
//!
//! ```no_run
//! # use saev::{backbone::Vit, backbone::VitConfig, backbone::Family};
//! # let vb = candle_nn::VarBuilder::zeros(candle_core::DType::F32, &candle_core::Device::Cpu);
//! let vit = Vit::new(&VitConfig::tiny(Family::Dinov2), vb)?;
//! let pixels = candle_core::Tensor::zeros((2, 3, 16, 16), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let x = vit.embed(&pixels)?;              // [B, T_all, D]
//! let x = vit.run_blocks(&x, 0..2)?;        // residual stream after block 1
//! let out = vit.finish(&x)?;                // final norm, pooled output
//! # Ok::<(), saev::Error>(())
//! ```

use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};
use candle_nn::VarBuilder;

use super::amx::{gemm_bf16_then, AlignedVec, PackedB};
use super::amx_attention;
use super::amx_packed::{gemm_packed, gemm_to_packed, PackedA};
use super::config::{Family, HiddenAct, PosInterp, VitConfig};
use super::kernels::{
    bias_act, bias_act_in_place, gemm_f32_then, self_attention_qkv, softmax_last_dim,
};
use super::norm::Norm;
use super::resample::{interp_matrix, interp_matrix_scaled, Kernel};
use crate::error::{CandleContext, Error, Result};

/// `y = x Wᵀ + b` over the last axis of a tensor of any rank.
#[derive(Debug, Clone)]
struct Linear {
    w_t: Tensor,
    b: Option<Tensor>,
    /// The weights packed for [`super::amx`]'s bfloat16 GEMM: set by [`Linear::to_bf16`], used
    /// on CPU inputs.
    bf16: Option<Arc<PackedB>>,
    /// The weights cast to a low-precision dtype for candle's matmul (GPUs; see
    /// [`LinearMode::Cast`]): inputs are cast to it, outputs back to f32.
    w_low: Option<Tensor>,
}

/// How a [`Vit`]'s linear layers compute (norms, attention scores, softmax and the residual
/// stream stay f32 in every mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearMode {
    /// f32.
    F32,
    /// bfloat16 weights packed for the CPU's AMX tiles ([`super::amx`]), f32 accumulation.
    PackedBf16,
    /// Weights and inputs cast to this dtype (bf16, f16) for candle's matmul — cuBLAS on a GPU,
    /// candle's own kernels on the CPU; outputs cast back to f32. Attention runs on candle's
    /// ops too: `Cast(F32)` on the CPU is the GPU's f32 code path, for checking it.
    Cast(DType),
}

impl Linear {
    /// The same layer computing in `mode`.
    fn with_mode(&self, mode: LinearMode) -> candle_core::Result<Self> {
        let bf16 = if mode == LinearMode::PackedBf16 {
            let (d_in, d_out) = self.w_t.dims2()?;
            let w: Vec<f32> = self.w_t.flatten_all()?.to_vec1()?;
            Some(Arc::new(PackedB::new(&w, d_in, d_out)))
        } else {
            None
        };
        let w_low = match mode {
            LinearMode::Cast(dt) => Some(self.w_t.to_dtype(dt)?),
            _ => None,
        };
        Ok(Self {
            bf16,
            w_low,
            ..self.clone()
        })
    }

    /// The fused CPU path for an f32 CPU tensor `x`: `act(x Wᵀ (+ b)) (+ residual)` in one GEMM
    /// and one pass over its output (bias, activation and residual applied to each band of rows
    /// as it is computed) — in bfloat16 on AMX when the layer has packed weights, else the f32
    /// GEMM. None on other devices and dtypes (candle's ops run there).
    fn fused_forward(
        &self,
        x: &Tensor,
        with_bias: bool,
        act: Option<HiddenAct>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 || self.w_low.is_some() {
            return Ok(None);
        }
        let dims = x.dims();
        let d_in = dims[dims.len() - 1];
        let rows = x.elem_count() / d_in;
        let n = self.w_t.dim(1)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        let y = self.with_epilogue(&out_dims, with_bias, act, residual, |epilogue| {
            let gemm = |a: &[f32]| -> candle_core::Result<AlignedVec> {
                match &self.bf16 {
                    Some(w) => Ok(gemm_bf16_then(a, rows, w, epilogue)),
                    None => {
                        let (st, l) = self.w_t.storage_and_layout();
                        match (&*st, l.contiguous_offsets()) {
                            (Storage::Cpu(CpuStorage::F32(w)), Some((s0, s1))) => {
                                Ok(AlignedVec::from_vec(gemm_f32_then(
                                    a,
                                    rows,
                                    &w[s0..s1],
                                    n,
                                    epilogue,
                                )))
                            }
                            _ => candle_core::bail!("fused linear: weights not on the CPU"),
                        }
                    }
                }
            };
            // The input is read in place when it is contiguous (no copy).
            let (storage, layout) = x.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((s0, s1))) => gemm(&v[s0..s1]),
                _ => {
                    drop(storage);
                    let a: Vec<f32> = x.flatten_all()?.to_vec1()?;
                    gemm(&a)
                }
            }
        })?;
        y.map(|y| y.into_tensor(&out_dims, x.device())).transpose()
    }

    /// Run `f` with the epilogue `act(· (+ b)) (+ residual)` for outputs of shape `out_dims`
    /// (None when the residual is not an f32 CPU tensor of that shape).
    fn with_epilogue<R>(
        &self,
        out_dims: &[usize],
        with_bias: bool,
        act: Option<HiddenAct>,
        residual: Option<&Tensor>,
        f: impl FnOnce(&(dyn Fn(usize, &mut [f32]) + Sync)) -> candle_core::Result<R>,
    ) -> candle_core::Result<Option<R>> {
        let n = self.w_t.dim(1)?;
        let residual = match residual {
            Some(r) if r.dims() == out_dims && r.dtype() == DType::F32 => {
                Some(r.flatten_all()?.contiguous()?)
            }
            Some(_) => return Ok(None),
            None => None,
        };
        let bias = match (&self.b, with_bias) {
            (Some(b), true) => Some(b.to_vec1::<f32>()?),
            _ => None,
        };
        let res_guard = residual.as_ref().map(|r| r.storage_and_layout());
        let res: Option<&[f32]> = match &res_guard {
            Some((st, l)) => match (&**st, l.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((s0, s1))) => Some(&v[s0..s1]),
                _ => return Ok(None),
            },
            None => None,
        };
        let epilogue = |row0: usize, c: &mut [f32]| {
            let r = res.map(|r| &r[row0 * n..row0 * n + c.len()]);
            bias_act_in_place(c, n, bias.as_deref(), act, r);
        };
        f(&epilogue).map(Some)
    }

    /// `act(a Wᵀ + b) (+ residual)` from activations already packed in bf16 tiles (the layer
    /// has packed weights): `[rows, n]` with the leading dims of `out_dims`.
    fn packed_forward(
        &self,
        a: &PackedA,
        out_dims: &[usize],
        act: Option<HiddenAct>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(w) = &self.bf16 else {
            return Ok(None);
        };
        let y = self.with_epilogue(out_dims, true, act, residual, |e| Ok(gemm_packed(a, w, e)))?;
        y.map(|y| y.into_tensor(out_dims, &Device::Cpu)).transpose()
    }

    /// `act(a Wᵀ + b)` from packed activations into the packed input of the next layer.
    fn packed_to_packed(
        &self,
        a: &PackedA,
        act: Option<HiddenAct>,
    ) -> candle_core::Result<Option<PackedA>> {
        let Some(w) = &self.bf16 else {
            return Ok(None);
        };
        let n = self.w_t.dim(1)?;
        // The bias per 32-column block, zeros past n.
        let mut bias = vec![0f32; n.div_ceil(32) * 32];
        if let Some(b) = &self.b {
            bias[..n].copy_from_slice(&b.to_vec1::<f32>()?);
        }
        let epilogue = |c0: usize, block: &mut [f32]| {
            bias_act_in_place(block, 32, Some(&bias[c0..c0 + 32]), act, None);
        };
        Ok(Some(gemm_to_packed(a, w, &epilogue)))
    }

    /// `x Wᵀ + b + residual` (the block's output projections).
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = self.fused_forward(x, true, None, Some(residual))? {
            return Ok(y);
        }
        residual + self.forward(x)?
    }

    fn new(vb: &VarBuilder, d_in: usize, d_out: usize, bias: bool) -> candle_core::Result<Self> {
        let w = vb.get((d_out, d_in), "weight")?;
        let b = if bias {
            Some(vb.get(d_out, "bias")?)
        } else {
            None
        };
        Self::from_parts(w, b)
    }

    fn from_parts(w_oi: Tensor, b: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Self {
            w_t: w_oi.t()?.contiguous()?,
            b,
            bf16: None,
            w_low: None,
        })
    }

    /// Scale output channels: `(x Wᵀ + b) · s` folded into the weights (LayerScale).
    fn scale_outputs(self, s: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            w_t: self.w_t.broadcast_mul(s)?,
            b: self.b.map(|b| b.mul(s)).transpose()?,
            bf16: None,
            w_low: None,
        })
    }

    /// `x Wᵀ` without the bias, as one 2-D GEMM over all leading axes.
    fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.bf16.is_some() {
            if let Some(y) = self.fused_forward(x, false, None, None)? {
                return Ok(y);
            }
        }
        let dims = x.dims();
        let d_in = dims[dims.len() - 1];
        let rows = x.elem_count() / d_in;
        let y = match &self.w_low {
            Some(w) => x
                .reshape((rows, d_in))?
                .to_dtype(w.dtype())?
                .matmul(w)?
                .to_dtype(DType::F32)?,
            None => x.reshape((rows, d_in))?.matmul(&self.w_t)?,
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.w_t.dim(1)?;
        }
        y.reshape(out_dims)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = self.fused_forward(x, true, None, None)? {
            return Ok(y);
        }
        let y = self.matmul(x)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `act(x Wᵀ + b)` with bias and activation fused in one pass.
    fn forward_act(&self, x: &Tensor, act: HiddenAct) -> candle_core::Result<Tensor> {
        if let Some(y) = self.fused_forward(x, true, Some(act), None)? {
            return Ok(y);
        }
        let y = self.matmul(x)?;
        match &self.b {
            Some(b) => bias_act(&y, b, act),
            None => activate(&y, act),
        }
    }
}

fn layer_norm(vb: VarBuilder, d: usize, eps: f64) -> candle_core::Result<Norm> {
    Norm::load(vb, d, eps)
}

fn activate(x: &Tensor, act: HiddenAct) -> candle_core::Result<Tensor> {
    match act {
        HiddenAct::Gelu => x.gelu_erf(),
        HiddenAct::GeluTanh => x.gelu(),
        HiddenAct::QuickGelu => x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
        HiddenAct::Silu => x.silu(),
    }
}

/// Multi-head softmax attention on `[B, T, 3·D]`-packed (or separate) projections.
///
/// # Shapes
/// `q`: `[B, Tq, D]`, `k`, `v`: `[B, Tk, D]` → `[B, Tq, D]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    attention_rope(q, k, v, n_heads, None)
}

/// Rotary position embeddings for the patch tokens (DINOv3): `cos`, `sin` `[P, hd]` and the
/// number of leading tokens (CLS, registers) left unrotated.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    n_prefix: usize,
}

impl Rope {
    /// DINOv3's RoPE on a `gh × gw` patch grid: periods `θ^(4i/hd)` (`i < hd/4`), patch centres
    /// normalised per axis to `2(i + 0.5)/n − 1`, angles `2π·[y/periods, x/periods]` tiled
    /// twice over the head width (rotation of halves, NeoX style).
    pub(crate) fn new(
        theta: f64,
        head_dim: usize,
        (gh, gw): (usize, usize),
        n_prefix: usize,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let q = head_dim / 4;
        let periods: Vec<f32> = (0..q)
            .map(|i| theta.powf(4.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let mut cos = Vec::with_capacity(gh * gw * head_dim);
        let mut sin = Vec::with_capacity(gh * gw * head_dim);
        let two_pi = 2.0 * std::f32::consts::PI;
        for r in 0..gh {
            let y = 2.0 * (r as f32 + 0.5) / gh as f32 - 1.0;
            for c in 0..gw {
                let x = 2.0 * (c as f32 + 0.5) / gw as f32 - 1.0;
                let half: Vec<f32> = periods
                    .iter()
                    .map(|p| two_pi * y / p)
                    .chain(periods.iter().map(|p| two_pi * x / p))
                    .collect();
                for _ in 0..2 {
                    cos.extend(half.iter().map(|a| a.cos()));
                    sin.extend(half.iter().map(|a| a.sin()));
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (gh * gw, head_dim), dev)?,
            sin: Tensor::from_vec(sin, (gh * gw, head_dim), dev)?,
            n_prefix,
        })
    }

    /// Rotate the patch tokens of `x_bhtd` (`[B, H, T, hd]`).
    fn apply(&self, x_bhtd: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, t, hd) = x_bhtd.dims4()?;
        let p = t - self.n_prefix;
        if p != self.cos.dim(0)? {
            candle_core::bail!(
                "RoPE for {} patches applied to {p} patch tokens",
                self.cos.dim(0)?
            );
        }
        let prefix = x_bhtd.narrow(2, 0, self.n_prefix)?;
        let xp = x_bhtd.narrow(2, self.n_prefix, p)?;
        let half = hd / 2;
        let rot = Tensor::cat(
            &[xp.narrow(3, half, half)?.neg()?, xp.narrow(3, 0, half)?],
            3,
        )?;
        let xp = (xp.broadcast_mul(&self.cos)? + rot.broadcast_mul(&self.sin)?)?;
        Tensor::cat(&[prefix, xp], 2)?.contiguous()
    }
}

/// [`attention`] with rotary embeddings on the queries and keys (DINOv3).
fn attention_rope(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_heads: usize,
    rope: Option<&Rope>,
) -> candle_core::Result<Tensor> {
    let (b, tq, d) = q.dims3()?;
    let tk = k.dim(1)?;
    let hd = d / n_heads;
    let split = |x: &Tensor, t: usize| -> candle_core::Result<Tensor> {
        x.reshape((b, t, n_heads, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (mut q_bhtd, mut k_bhtd) = (split(q, tq)?, split(k, tk)?);
    if let Some(r) = rope {
        q_bhtd = r.apply(&q_bhtd)?;
        k_bhtd = r.apply(&k_bhtd)?;
    }
    let q_bhtd = (q_bhtd * (hd as f64).powf(-0.5))?;
    let v_bhtd = split(v, tk)?;
    let scores = q_bhtd.matmul(&k_bhtd.t()?)?;
    let probs = softmax_last_dim(&scores)?;
    let out = probs.matmul(&v_bhtd)?;
    out.transpose(1, 2)?.reshape((b, tq, d))
}

/// One pre-norm transformer block (attention + MLP, optional LayerScale).
#[derive(Debug, Clone)]
pub struct Block {
    norm1: Norm,
    qkv: Linear,
    out: Linear,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    /// DINOv3's gated MLP: `fc2(act(gate x) ⊙ fc1 x)` (`fc1` = `up_proj`).
    gate: Option<Linear>,
    n_heads: usize,
    act: HiddenAct,
}

impl Block {
    /// Build block weights from `vb` (already pointed at `encoder.layer.{i}` / `encoder.layers.{i}`).
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let (norm1, norm2, qkv_names, out_vb) = match cfg.family {
            Family::Dinov2 => {
                let att = vb.pp("attention");
                // transformers >= 5 names the projections q/k/v/o_proj; hub checkpoints use
                // attention.attention.{query,key,value} and attention.output.dense.
                let (names, out_vb) = if att.contains_tensor("q_proj.weight") {
                    (
                        [att.pp("q_proj"), att.pp("k_proj"), att.pp("v_proj")],
                        att.pp("o_proj"),
                    )
                } else {
                    let inner = att.pp("attention");
                    (
                        [inner.pp("query"), inner.pp("key"), inner.pp("value")],
                        att.pp("output").pp("dense"),
                    )
                };
                (
                    layer_norm(vb.pp("norm1"), d, eps)?,
                    layer_norm(vb.pp("norm2"), d, eps)?,
                    names,
                    out_vb,
                )
            }
            Family::Clip | Family::Siglip => {
                let att = vb.pp("self_attn");
                (
                    layer_norm(vb.pp("layer_norm1"), d, eps)?,
                    layer_norm(vb.pp("layer_norm2"), d, eps)?,
                    [att.pp("q_proj"), att.pp("k_proj"), att.pp("v_proj")],
                    att.pp("out_proj"),
                )
            }
            Family::Dinov3 => {
                let att = vb.pp("attention");
                (
                    layer_norm(vb.pp("norm1"), d, eps)?,
                    layer_norm(vb.pp("norm2"), d, eps)?,
                    [att.pp("q_proj"), att.pp("k_proj"), att.pp("v_proj")],
                    att.pp("o_proj"),
                )
            }
        };
        // Fuse q, k, v into one [3D, D] projection: one GEMM instead of three.
        let ws = qkv_names
            .iter()
            .map(|p| p.get((d, d), "weight"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bs = if cfg.qkv_bias {
            // A key without bias (DINOv3) adds zeros: the fused bias stays one add.
            let bs = qkv_names
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    if i == 1 && !cfg.key_bias {
                        Tensor::zeros(d, DType::F32, p.device())
                    } else {
                        p.get(d, "bias")
                    }
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        let qkv = Linear::from_parts(Tensor::cat(&ws, 0)?, bs)?;
        let mut out = Linear::new(&out_vb, d, d, true)?;
        let mlp = vb.pp("mlp");
        let (up, down) = if cfg.family == Family::Dinov3 {
            ("up_proj", "down_proj")
        } else {
            ("fc1", "fc2")
        };
        let fc1 = Linear::new(&mlp.pp(up), d, cfg.intermediate_size, true)?;
        let mut fc2 = Linear::new(&mlp.pp(down), cfg.intermediate_size, d, true)?;
        let gate = if cfg.gated_mlp {
            Some(Linear::new(
                &mlp.pp("gate_proj"),
                d,
                cfg.intermediate_size,
                true,
            )?)
        } else {
            None
        };
        if cfg.layerscale {
            // LayerScale multiplies the attention and MLP outputs per channel: fold it into
            // the output projections (one pass less each).
            out = out.scale_outputs(&vb.pp("layer_scale1").get(d, "lambda1")?)?;
            fc2 = fc2.scale_outputs(&vb.pp("layer_scale2").get(d, "lambda1")?)?;
        }
        Ok(Self {
            norm1,
            qkv,
            out,
            norm2,
            fc1,
            fc2,
            gate,
            n_heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    /// The same block with its linear layers in `mode` (see [`Vit::with_linear_mode`]).
    fn with_mode(&self, mode: LinearMode) -> candle_core::Result<Self> {
        Ok(Self {
            qkv: self.qkv.with_mode(mode)?,
            out: self.out.with_mode(mode)?,
            fc1: self.fc1.with_mode(mode)?,
            fc2: self.fc2.with_mode(mode)?,
            gate: self.gate.as_ref().map(|g| g.with_mode(mode)).transpose()?,
            ..self.clone()
        })
    }

    /// Run the block.
    ///
    /// # Shapes
    /// `x_btd`: `[B, T, D]` → `[B, T, D]`.
    pub fn forward(&self, x_btd: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_rope(x_btd, None)
    }

    /// The bf16 mode on AMX or AVX-512-BF16 (Zen 4): each LayerNorm writes the packed input of the GEMM after it, the
    /// MLP's first GEMM the packed input of its second, attention runs on tiles. None where
    /// that path does not apply (other modes, devices, gated MLPs, no bf16 kernel).
    fn forward_packed(&self, x_btd: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let packed = [&self.qkv, &self.out, &self.fc1, &self.fc2]
            .iter()
            .all(|l| l.bf16.is_some());
        if !packed
            || self.gate.is_some()
            || !x_btd.device().is_cpu()
            || x_btd.dtype() != DType::F32
            || !amx_attention::available()
        {
            return Ok(None);
        }
        let (b, t, d) = x_btd.dims3()?;
        let x = x_btd.contiguous()?;
        let Some(h) = self.norm1.pack(&x)? else {
            return Ok(None);
        };
        let Some(qkv) = self.qkv.packed_forward(&h, &[b, t, 3 * d], None, None)? else {
            return Ok(None);
        };
        let att = amx_attention::self_attention_qkv_bf16(&qkv, self.n_heads)?;
        let x = self.out.forward_residual(&att, &x)?;
        let Some(h) = self.norm2.pack(&x)? else {
            return Ok(None);
        };
        let Some(a) = self.fc1.packed_to_packed(&h, Some(self.act))? else {
            return Ok(None);
        };
        self.fc2.packed_forward(&a, &[b, t, d], None, Some(&x))
    }

    /// Run the block with rotary embeddings on the patch tokens (DINOv3).
    pub(crate) fn forward_rope(
        &self,
        x_btd: &Tensor,
        rope: Option<&Rope>,
    ) -> candle_core::Result<Tensor> {
        if rope.is_none() {
            if let Some(y) = self.forward_packed(x_btd)? {
                return Ok(y);
            }
        }
        let d = x_btd.dim(2)?;
        let h = self.norm1.forward(x_btd)?;
        let qkv = self.qkv.forward(&h)?;
        // saev's CPU attention kernel; candle's ops on other devices and in the cast modes (so
        // `LinearMode::Cast(F32)` runs the GPU's code path on the CPU).
        let cpu_kernel = qkv.device().is_cpu() && self.qkv.w_low.is_none();
        let att = if rope.is_none() && cpu_kernel && qkv.dtype() == DType::F32 {
            // In the bf16 mode on a bf16 kernel, attention in bf16 too (as torch's bf16 model computes it).
            if self.qkv.bf16.is_some() && amx_attention::available() {
                amx_attention::self_attention_qkv_bf16(&qkv.contiguous()?, self.n_heads)?
            } else {
                self_attention_qkv(&qkv.contiguous()?, self.n_heads)?
            }
        } else {
            let q = qkv.narrow(2, 0, d)?;
            let k = qkv.narrow(2, d, d)?;
            let v = qkv.narrow(2, 2 * d, d)?;
            attention_rope(&q, &k, &v, self.n_heads, rope)?
        };
        let x = self.out.forward_residual(&att, x_btd)?;
        let h = self.norm2.forward(&x)?;
        let h = match &self.gate {
            None => self.fc1.forward_act(&h, self.act)?,
            Some(g) => (g.forward_act(&h, self.act)? * self.fc1.forward(&h)?)?,
        };
        self.fc2.forward_residual(&h, &x)
    }
}

/// SigLIP's multi-head attention pooling head (`head.probe`, `head.attention`, …).
#[derive(Debug, Clone)]
struct MapHead {
    probe: Tensor,
    q: Linear,
    kv: Linear,
    out: Linear,
    norm: Norm,
    fc1: Linear,
    fc2: Linear,
    n_heads: usize,
    act: HiddenAct,
}

impl MapHead {
    fn new(cfg: &VitConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let att = vb.pp("attention");
        let w = att.get((3 * d, d), "in_proj_weight")?;
        let b = att.get(3 * d, "in_proj_bias")?;
        let mlp = vb.pp("mlp");
        Ok(Self {
            probe: vb.get((1, 1, d), "probe")?,
            q: Linear::from_parts(w.narrow(0, 0, d)?, Some(b.narrow(0, 0, d)?))?,
            kv: Linear::from_parts(w.narrow(0, d, 2 * d)?, Some(b.narrow(0, d, 2 * d)?))?,
            out: Linear::new(&att.pp("out_proj"), d, d, true)?,
            norm: layer_norm(vb.pp("layernorm"), d, cfg.layer_norm_eps)?,
            fc1: Linear::new(&mlp.pp("fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::new(&mlp.pp("fc2"), cfg.intermediate_size, d, true)?,
            n_heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    fn with_mode(&self, mode: LinearMode) -> candle_core::Result<Self> {
        Ok(Self {
            q: self.q.with_mode(mode)?,
            kv: self.kv.with_mode(mode)?,
            out: self.out.with_mode(mode)?,
            fc1: self.fc1.with_mode(mode)?,
            fc2: self.fc2.with_mode(mode)?,
            ..self.clone()
        })
    }

    fn forward(&self, x_btd: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, d) = x_btd.dims3()?;
        let probe = self.probe.broadcast_as((b, 1, d))?.contiguous()?;
        let q = self.q.forward(&probe)?;
        let kv = self.kv.forward(x_btd)?;
        let a = attention(&q, &kv.narrow(2, 0, d)?, &kv.narrow(2, d, d)?, self.n_heads)?;
        let a = self.out.forward(&a)?;
        let h = self.fc2.forward(&activate(
            &self.fc1.forward(&self.norm.forward(&a)?)?,
            self.act,
        )?)?;
        (a + h)?.squeeze(1)
    }
}

/// Patch, class, register and position embeddings (+ CLIP's pre-encoder LayerNorm).
#[derive(Debug, Clone)]
struct Embeddings {
    patch: Linear,
    cls: Option<Tensor>,
    pos_cls: Option<Tensor>,
    /// `[g, g, D]`; None with rotary embeddings (DINOv3).
    pos_grid: Option<Tensor>,
    registers: Option<Tensor>,
    pre_norm: Option<Norm>,
}

impl Embeddings {
    fn new(cfg: &VitConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let g = cfg.grid_side();
        let e = vb.pp("embeddings");
        let n_pos = g * g + usize::from(cfg.cls_token);
        let (patch_vb, patch_bias, cls, pos) = match cfg.family {
            Family::Dinov2 => (
                e.pp("patch_embeddings").pp("projection"),
                true,
                Some(e.get((1, 1, d), "cls_token")?),
                e.get((1, n_pos, d), "position_embeddings")?.squeeze(0)?,
            ),
            Family::Clip => (
                e.pp("patch_embedding"),
                false,
                Some(e.get(d, "class_embedding")?.reshape((1, 1, d))?),
                e.pp("position_embedding").get((n_pos, d), "weight")?,
            ),
            Family::Siglip => (
                e.pp("patch_embedding"),
                true,
                None,
                e.pp("position_embedding").get((n_pos, d), "weight")?,
            ),
            Family::Dinov3 => {
                // No absolute position embeddings: a placeholder never used.
                (
                    e.pp("patch_embeddings"),
                    true,
                    Some(e.get((1, 1, d), "cls_token")?),
                    Tensor::zeros((0, d), DType::F32, vb.device())?,
                )
            }
        };
        let w = patch_vb.get((d, cfg.num_channels, p, p), "weight")?;
        let b = if patch_bias {
            Some(patch_vb.get(d, "bias")?)
        } else {
            None
        };
        let patch = Linear::from_parts(w.reshape((d, cfg.num_channels * p * p))?, b)?;
        let (pos_cls, pos_grid) = if cfg.rope_theta.is_some() {
            (None, None)
        } else if cfg.cls_token {
            (
                Some(pos.narrow(0, 0, 1)?.unsqueeze(0)?),
                Some(pos.narrow(0, 1, g * g)?.reshape((g, g, d))?),
            )
        } else {
            (None, Some(pos.reshape((g, g, d))?))
        };
        let registers = if cfg.num_register_tokens > 0 {
            Some(e.get((1, cfg.num_register_tokens, d), "register_tokens")?)
        } else {
            None
        };
        let pre_norm = if cfg.pre_layernorm {
            Some(layer_norm(vb.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?)
        } else {
            None
        };
        Ok(Self {
            patch,
            cls,
            pos_cls,
            pos_grid,
            registers,
            pre_norm,
        })
    }

    /// Position embeddings for a `gh × gw` grid, resized like HF's `interpolate_pos_encoding`.
    fn pos_for(
        &self,
        pos_grid: &Tensor,
        gh: usize,
        gw: usize,
        how: PosInterp,
    ) -> candle_core::Result<Tensor> {
        let (g, _, d) = pos_grid.dims3()?;
        if (gh, gw) == (g, g) {
            return pos_grid.reshape((g * g, d));
        }
        let matrix = |n: usize| match how {
            PosInterp::Bicubic => interp_matrix(g, n, Kernel::TorchBicubic),
            PosInterp::BicubicAntialias => interp_matrix(g, n, Kernel::AntialiasBicubic),
            PosInterp::BicubicOffset => interp_matrix_scaled(g, n, g as f64 / (n as f64 + 0.1)),
        };
        let dev = pos_grid.device();
        let m_h = Tensor::from_vec(matrix(gh), (gh, g), dev)?;
        let m_w = Tensor::from_vec(matrix(gw), (gw, g), dev)?;
        // Rows: [gh, g] · [g, g·D] → [gh, g, D]; then columns the same way on the transpose.
        let rows = m_h
            .matmul(&pos_grid.reshape((g, g * d))?)?
            .reshape((gh, g, d))?;
        let cols_first = rows.transpose(0, 1)?.contiguous()?.reshape((g, gh * d))?;
        let both = m_w.matmul(&cols_first)?.reshape((gw, gh, d))?;
        both.transpose(0, 1)?.contiguous()?.reshape((gh * gw, d))
    }

    fn forward(&self, cfg: &VitConfig, pixels_bchw: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels_bchw
            .dims4()
            .context("pixel batch must be [B, C, H, W]")?;
        let p = cfg.patch_size;
        if c != cfg.num_channels {
            return Err(Error::Shape {
                what: "pixel batch [B, C, H, W]".into(),
                expected: vec![b, cfg.num_channels, h, w],
                actual: vec![b, c, h, w],
            });
        }
        if h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            return Err(Error::InputSize {
                height: h,
                width: w,
                patch_size: p,
            });
        }
        let (gh, gw) = (h / p, w / p);
        let f = || -> candle_core::Result<Tensor> {
            let x = pixels_bchw
                .to_dtype(DType::F32)?
                .reshape((b, c, gh, p, gw, p))?
                .permute((0, 2, 4, 1, 3, 5))?
                .contiguous()?
                .reshape((b, gh * gw, c * p * p))?;
            let mut x = self.patch.forward(&x)?;
            if let Some(pg) = &self.pos_grid {
                x = x.broadcast_add(&self.pos_for(pg, gh, gw, cfg.pos_interp)?.unsqueeze(0)?)?;
            }
            let d = x.dim(2)?;
            let mut parts = Vec::with_capacity(3);
            match (&self.cls, &self.pos_cls) {
                (Some(cls), Some(pos_cls)) => {
                    parts.push((cls + pos_cls)?.broadcast_as((b, 1, d))?.contiguous()?)
                }
                (Some(cls), None) => parts.push(cls.broadcast_as((b, 1, d))?.contiguous()?),
                _ => {}
            }
            if let Some(r) = &self.registers {
                parts.push(r.broadcast_as((b, r.dim(1)?, d))?.contiguous()?);
            }
            parts.push(x);
            let x = Tensor::cat(&parts, 1)?;
            match &self.pre_norm {
                Some(n) => n.forward(&x),
                None => Ok(x),
            }
        };
        f().context("embedding patches")
    }
}

/// The final outputs of a ViT, following HF's `BaseModelOutputWithPooling`.
#[derive(Debug, Clone)]
pub struct VitOutput {
    /// HF `last_hidden_state` with register tokens dropped: after the final LayerNorm for DINOv2
    /// and SigLIP; the raw last block output for CLIP (HF normalises only the pooled CLS).
    ///
    /// Shape `[B, T, D]`, CLS first when the model has one.
    pub last_hidden: Tensor,
    /// HF `pooler_output` `[B, D]`: normalised CLS (DINOv2, CLIP) or the attention-pooling head
    /// (SigLIP with `vision_use_head`); `None` for a SigLIP without head.
    pub pooled: Option<Tensor>,
}

/// A vision transformer whose blocks can be run piecewise.
#[derive(Debug, Clone)]
pub struct Vit {
    cfg: VitConfig,
    embeddings: Embeddings,
    blocks: Vec<Block>,
    final_norm: Norm,
    head: Option<MapHead>,
}

impl Vit {
    /// Build from a `VarBuilder` whose paths are the checkpoint keys of the vision tower
    /// (already narrowed by `cfg.prefix`).
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let f = || -> candle_core::Result<Self> {
            let embeddings = Embeddings::new(cfg, &vb)?;
            let (layers, final_name) = match cfg.family {
                Family::Dinov2 => (vb.pp("encoder").pp("layer"), "layernorm"),
                Family::Clip | Family::Siglip => (vb.pp("encoder").pp("layers"), "post_layernorm"),
                // On disk `layer.N`; transformers' in-memory name is `model.layer.N`.
                Family::Dinov3 if vb.contains_tensor("model.layer.0.norm1.weight") => {
                    (vb.pp("model").pp("layer"), "norm")
                }
                Family::Dinov3 => (vb.pp("layer"), "norm"),
            };
            let blocks = (0..cfg.num_hidden_layers)
                .map(|i| Block::new(cfg, layers.pp(i.to_string())))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let final_norm = layer_norm(vb.pp(final_name), cfg.hidden_size, cfg.layer_norm_eps)?;
            let head = if cfg.use_head {
                Some(MapHead::new(cfg, vb.pp("head"))?)
            } else {
                None
            };
            Ok(Self {
                cfg: cfg.clone(),
                embeddings,
                blocks,
                final_norm,
                head,
            })
        };
        f().context("building the ViT from its checkpoint")
    }

    /// The configuration.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// The same model with every linear layer (patch embedding, q/k/v, attention output, MLP,
    /// pooling head) computing in `mode`: bfloat16 with f32 accumulation on the CPU's AMX tiles
    /// where the processor has them ([`super::amx`]), weights cast to bf16/f16 for candle's
    /// matmul (GPUs), or all in f32 again. Attention scores, softmax, norms, activations and the
    /// residual stream stay f32.
    pub fn with_linear_mode(&self, mode: LinearMode) -> Result<Self> {
        let f = || -> candle_core::Result<Self> {
            Ok(Self {
                embeddings: Embeddings {
                    patch: self.embeddings.patch.with_mode(mode)?,
                    ..self.embeddings.clone()
                },
                blocks: self
                    .blocks
                    .iter()
                    .map(|b| b.with_mode(mode))
                    .collect::<candle_core::Result<_>>()?,
                head: self.head.as_ref().map(|h| h.with_mode(mode)).transpose()?,
                ..self.clone()
            })
        };
        f().with_context(|| format!("converting the ViT's linear layers to {mode:?}"))
    }

    /// The transformer blocks, in order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embeddings.patch.w_t.device()
    }

    /// Embed a pixel batch: the input of block 0 (HF `hidden_states[0]`), registers included.
    ///
    /// # Shapes
    /// `pixels_bchw`: `[B, 3, H, W]` (H, W multiples of the patch size) → `[B, T_all, D]`,
    /// `T_all = [CLS] + registers + (H/p)·(W/p)`.
    pub fn embed(&self, pixels_bchw: &Tensor) -> Result<Tensor> {
        self.embeddings.forward(&self.cfg, pixels_bchw)
    }

    /// Run blocks `range` on the residual stream `x_btd` (`[B, T_all, D]`).
    ///
    /// Models with rotary embeddings (DINOv3) need the patch grid: this assumes a square one;
    /// [`Vit::run_blocks_on_grid`] takes it.
    pub fn run_blocks(&self, x_btd: &Tensor, range: Range<usize>) -> Result<Tensor> {
        let n_patches = x_btd
            .dim(1)
            .context("residual stream [B, T, D]")?
            .saturating_sub(self.cfg.n_prefix_tokens());
        let g = (n_patches as f64).sqrt().round() as usize;
        if self.cfg.rope_theta.is_some() && g * g != n_patches {
            return Err(Error::mismatch(
                "patch tokens",
                "a square grid",
                format!("{n_patches} tokens"),
                "use run_blocks_on_grid",
            ));
        }
        self.run_blocks_on_grid(x_btd, range, (g, g))
    }

    /// [`Vit::run_blocks`] on a `(rows, cols)` patch grid.
    pub fn run_blocks_on_grid(
        &self,
        x_btd: &Tensor,
        range: Range<usize>,
        grid: (usize, usize),
    ) -> Result<Tensor> {
        let rope = match self.cfg.rope_theta {
            Some(theta) => Some(
                Rope::new(
                    theta,
                    self.cfg.head_dim(),
                    grid,
                    self.cfg.n_prefix_tokens(),
                    x_btd.device(),
                )
                .context("rotary embeddings")?,
            ),
            None => None,
        };
        let mut x = x_btd.clone();
        for i in range {
            let block = self.blocks.get(i).ok_or(Error::LayerOutOfRange {
                layer: i as i64,
                n_layers: self.blocks.len(),
            })?;
            x = block
                .forward_rope(&x, rope.as_ref())
                .with_context(|| format!("block {i}"))?;
        }
        Ok(x)
    }

    /// Final norm and pooling on the last block output (`[B, T_all, D]`); registers dropped.
    pub fn finish(&self, x_btd: &Tensor) -> Result<VitOutput> {
        let f = || -> candle_core::Result<VitOutput> {
            let (_, t, _) = x_btd.dims3()?;
            let regs = self.cfg.num_register_tokens;
            let drop_regs = |x: &Tensor| -> candle_core::Result<Tensor> {
                if regs == 0 {
                    Ok(x.clone())
                } else {
                    Tensor::cat(
                        &[x.narrow(1, 0, 1)?, x.narrow(1, 1 + regs, t - 1 - regs)?],
                        1,
                    )
                }
            };
            match self.cfg.family {
                Family::Dinov2 | Family::Dinov3 => {
                    let seq = self.final_norm.forward(x_btd)?;
                    let pooled = seq.narrow(1, 0, 1)?.squeeze(1)?;
                    Ok(VitOutput {
                        last_hidden: drop_regs(&seq)?,
                        pooled: Some(pooled),
                    })
                }
                Family::Clip => {
                    let cls = x_btd.narrow(1, 0, 1)?.squeeze(1)?;
                    Ok(VitOutput {
                        last_hidden: x_btd.clone(),
                        pooled: Some(self.final_norm.forward(&cls)?),
                    })
                }
                Family::Siglip => {
                    let seq = self.final_norm.forward(x_btd)?;
                    let pooled = match &self.head {
                        Some(h) => Some(h.forward(&seq)?),
                        None => None,
                    };
                    Ok(VitOutput {
                        last_hidden: seq,
                        pooled,
                    })
                }
            }
        };
        f().context("final norm and pooling")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_uniform_when_keys_equal() {
        // Identical keys → uniform weights → output is the mean of the values.
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 8), &dev).unwrap();
        let k = Tensor::ones((1, 3, 8), DType::F32, &dev).unwrap();
        let v = Tensor::new(&[[[1f32; 8], [2f32; 8], [6f32; 8]]], &dev).unwrap();
        let out = attention(&q, &k, &v, 2).unwrap();
        let vals: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert!(vals.iter().all(|&x| (x - 3.0).abs() < 1e-5), "{vals:?}");
    }

    #[test]
    fn quick_gelu_closed_form() {
        let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let y: Vec<f32> = activate(&x, HiddenAct::QuickGelu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = 1.0 / (1.0 + (-1.702f32).exp());
        assert!((y[0] - want).abs() < 1e-6);
    }
}
