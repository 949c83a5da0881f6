//! One vision transformer for DINOv2, CLIP and SigLIP, with public blocks.
//!
//! Follows the HF transformers implementations (`Dinov2Model`, `Dinov2WithRegistersModel`,
//! `CLIPVisionTransformer`, `SiglipVisionTransformer`): the `VarBuilder` paths are the checkpoint
//! keys. Unlike candle-transformers' models, the pieces are exposed so the residual stream can be
//! read after any block and the network resumed from an edited block output:
//! [`Vit::embed`] → [`Vit::run_blocks`] → [`Vit::finish`].
//!
//! ```no_run
//! # use saev::{Vit, VitConfig, Family};
//! # let vb = candle_nn::VarBuilder::zeros(candle_core::DType::F32, &candle_core::Device::Cpu);
//! let vit = Vit::new(&VitConfig::tiny(Family::Dinov2), vb)?;
//! let pixels = candle_core::Tensor::zeros((2, 3, 16, 16), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let x = vit.embed(&pixels)?;              // [B, T_all, D]
//! let x = vit.run_blocks(&x, 0..2)?;        // residual stream after block 1
//! let out = vit.finish(&x)?;                // final norm, pooled output
//! # Ok::<(), saev::Error>(())
//! ```

use std::ops::Range;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, LayerNormConfig, VarBuilder};

use super::config::{Activation, Family, PosInterp, VitConfig};
use super::kernels::{bias_act, softmax_last_dim};
use super::resample::{interp_matrix, interp_matrix_scaled, Kernel};
use crate::error::{CandleContext, Error, Result};

/// `y = x Wᵀ + b` over the last axis of a tensor of any rank.
#[derive(Debug, Clone)]
struct Linear {
    w_t: Tensor,
    b: Option<Tensor>,
}

impl Linear {
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
        })
    }

    /// Scale output channels: `(x Wᵀ + b) · s` folded into the weights (LayerScale).
    fn scale_outputs(self, s: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            w_t: self.w_t.broadcast_mul(s)?,
            b: self.b.map(|b| b.mul(s)).transpose()?,
        })
    }

    /// `x Wᵀ` without the bias, as one 2-D GEMM over all leading axes.
    fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let d_in = dims[dims.len() - 1];
        let rows = x.elem_count() / d_in;
        let y = x.reshape((rows, d_in))?.matmul(&self.w_t)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.w_t.dim(1)?;
        }
        y.reshape(out_dims)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.matmul(x)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `act(x Wᵀ + b)` with bias and activation fused in one pass.
    fn forward_act(&self, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
        let y = self.matmul(x)?;
        match &self.b {
            Some(b) => bias_act(&y, b, act),
            None => activate(&y, act),
        }
    }
}

fn layer_norm(vb: VarBuilder, d: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    candle_nn::layer_norm(d, LayerNormConfig::from(eps), vb)
}

fn activate(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::QuickGelu => x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
    }
}

/// Multi-head softmax attention on `[B, T, 3·D]`-packed (or separate) projections.
///
/// # Shapes
/// `q`: `[B, Tq, D]`, `k`, `v`: `[B, Tk, D]` → `[B, Tq, D]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let (b, tq, d) = q.dims3()?;
    let tk = k.dim(1)?;
    let hd = d / n_heads;
    let split = |x: &Tensor, t: usize| -> candle_core::Result<Tensor> {
        x.reshape((b, t, n_heads, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q_bhtd = (split(q, tq)? * (hd as f64).powf(-0.5))?;
    let k_bhtd = split(k, tk)?;
    let v_bhtd = split(v, tk)?;
    let scores = q_bhtd.matmul(&k_bhtd.t()?)?;
    let probs = softmax_last_dim(&scores)?;
    let out = probs.matmul(&v_bhtd)?;
    out.transpose(1, 2)?.reshape((b, tq, d))
}

/// One pre-norm transformer block (attention + MLP, optional LayerScale).
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    n_heads: usize,
    act: Activation,
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
        };
        // Fuse q, k, v into one [3D, D] projection: one GEMM instead of three.
        let ws = qkv_names
            .iter()
            .map(|p| p.get((d, d), "weight"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bs = if cfg.qkv_bias {
            let bs = qkv_names
                .iter()
                .map(|p| p.get(d, "bias"))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        let qkv = Linear::from_parts(Tensor::cat(&ws, 0)?, bs)?;
        let mut out = Linear::new(&out_vb, d, d, true)?;
        let mlp = vb.pp("mlp");
        let fc1 = Linear::new(&mlp.pp("fc1"), d, cfg.intermediate_size, true)?;
        let mut fc2 = Linear::new(&mlp.pp("fc2"), cfg.intermediate_size, d, true)?;
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
            n_heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    /// Run the block.
    ///
    /// # Shapes
    /// `x_btd`: `[B, T, D]` → `[B, T, D]`.
    pub fn forward(&self, x_btd: &Tensor) -> candle_core::Result<Tensor> {
        let d = x_btd.dim(2)?;
        let h = self.norm1.forward(x_btd)?;
        let qkv = self.qkv.forward(&h)?;
        let q = qkv.narrow(2, 0, d)?;
        let k = qkv.narrow(2, d, d)?;
        let v = qkv.narrow(2, 2 * d, d)?;
        let a = self.out.forward(&attention(&q, &k, &v, self.n_heads)?)?;
        let x = (x_btd + a)?;
        let h = self.norm2.forward(&x)?;
        let h = self.fc2.forward(&self.fc1.forward_act(&h, self.act)?)?;
        x + h
    }
}

/// SigLIP's multi-head attention pooling head (`head.probe`, `head.attention`, …).
#[derive(Debug, Clone)]
struct MapHead {
    probe: Tensor,
    q: Linear,
    kv: Linear,
    out: Linear,
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    n_heads: usize,
    act: Activation,
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
    pos_grid: Tensor,
    registers: Option<Tensor>,
    pre_norm: Option<LayerNorm>,
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
        };
        let w = patch_vb.get((d, cfg.num_channels, p, p), "weight")?;
        let b = if patch_bias {
            Some(patch_vb.get(d, "bias")?)
        } else {
            None
        };
        let patch = Linear::from_parts(w.reshape((d, cfg.num_channels * p * p))?, b)?;
        let (pos_cls, pos_grid) = if cfg.cls_token {
            (
                Some(pos.narrow(0, 0, 1)?.unsqueeze(0)?),
                pos.narrow(0, 1, g * g)?,
            )
        } else {
            (None, pos)
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
            pos_grid: pos_grid.reshape((g, g, d))?,
            registers,
            pre_norm,
        })
    }

    /// Position embeddings for a `gh × gw` grid, resized like HF's `interpolate_pos_encoding`.
    fn pos_for(&self, gh: usize, gw: usize, how: PosInterp) -> candle_core::Result<Tensor> {
        let (g, _, d) = self.pos_grid.dims3()?;
        if (gh, gw) == (g, g) {
            return self.pos_grid.reshape((g * g, d));
        }
        let matrix = |n: usize| match how {
            PosInterp::Bicubic => interp_matrix(g, n, Kernel::TorchBicubic),
            PosInterp::BicubicAntialias => interp_matrix(g, n, Kernel::AntialiasBicubic),
            PosInterp::BicubicOffset => interp_matrix_scaled(g, n, g as f64 / (n as f64 + 0.1)),
        };
        let dev = self.pos_grid.device();
        let m_h = Tensor::from_vec(matrix(gh), (gh, g), dev)?;
        let m_w = Tensor::from_vec(matrix(gw), (gw, g), dev)?;
        // Rows: [gh, g] · [g, g·D] → [gh, g, D]; then columns the same way on the transpose.
        let rows = m_h
            .matmul(&self.pos_grid.reshape((g, g * d))?)?
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
            let x = self.patch.forward(&x)?;
            let x = x.broadcast_add(&self.pos_for(gh, gw, cfg.pos_interp)?.unsqueeze(0)?)?;
            let d = x.dim(2)?;
            let mut parts = Vec::with_capacity(3);
            if let (Some(cls), Some(pos_cls)) = (&self.cls, &self.pos_cls) {
                parts.push((cls + pos_cls)?.broadcast_as((b, 1, d))?.contiguous()?);
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
    final_norm: LayerNorm,
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

    /// The transformer blocks, in order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embeddings.pos_grid.device()
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
    pub fn run_blocks(&self, x_btd: &Tensor, range: Range<usize>) -> Result<Tensor> {
        let mut x = x_btd.clone();
        for i in range {
            let block = self.blocks.get(i).ok_or(Error::LayerOutOfRange {
                layer: i as i64,
                n_layers: self.blocks.len(),
            })?;
            x = block.forward(&x).with_context(|| format!("block {i}"))?;
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
                Family::Dinov2 => {
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

trait WithContext<T> {
    fn with_context(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T> WithContext<T> for candle_core::Result<T> {
    fn with_context(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: f(),
            source,
        })
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
        let y: Vec<f32> = activate(&x, Activation::QuickGelu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = 1.0 / (1.0 + (-1.702f32).exp());
        assert!((y[0] - want).abs() < 1e-6);
    }
}
