//! Interventions: the causal test of an SAE feature (the paper's §5). Encode the block-L
//! output with the SAE, edit latents on chosen patches, decode, keep the SAE's error term, run
//! blocks L+1.. and a task head, and compare predictions before and after.
//!
//! The edit is applied as `x' = x + scalar · (f' − f) W_dec` on the chosen patches only — the
//! same as `scalar · (decode(f') + (x̃ − decode(f))) + mean` (error term kept), but exact: with
//! no edits, or on patches outside the set, the block-L output is bitwise unchanged, so the
//! model's output equals the unedited model's.
//!
//! ```no_run
//! # use saev::prelude::*;
//! # let vit = Backbone::open("facebook/dinov2-small")?;
//! # let store = ActivationStore::open("acts/1a2b3c4d")?;
//! # let ex = Explorer::open("runs/k/0", &store)?;
//! # let head = saev::Head::load("heads/probe")?;
//! let iv = Intervention::new(&vit, -2, ex.sae(), &head)?.with_features(ex.features());
//! let out = iv.run(&load_image("shoe.png")?, Some(&[40, 41, 56, 57]), &[Edit::scale_max(2687, -2.0)])?;
//! // renders inline: the image with the edited patches outlined, class bars before / after
//! # Ok::<(), saev::Error>(())
//! ```

mod change_rates;
mod fidelity;
pub(crate) mod head;
mod outcome;
mod protocol;

pub use change_rates::ChangeRates;
pub use fidelity::Fidelity;
pub use outcome::Outcome;
pub use protocol::{best_f1_latents, ClassRow, LatentF1, ProtocolTable};

pub use head::{miou, Head, HeadConfig, HeadKind, HeadMeta};

use candle_core::Tensor;
use image::DynamicImage;
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, Residual};
use crate::error::{Computing, Error, Result};
use crate::explore::features::Features;
use crate::sae::model::Sae;

/// How an edit sets a latent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EditValue {
    /// Set to this value.
    Set(f32),
    /// Set to this multiple of the latent's max observed activation.
    SetMaxTimes(f32),
    /// Add this value.
    Add(f32),
    /// Add this multiple of the latent's max observed activation.
    AddMaxTimes(f32),
}

/// One latent edit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Edit {
    /// The latent.
    pub latent: usize,
    /// What to do to it.
    pub value: EditValue,
}

impl Edit {
    /// Set `latent` to `v`.
    pub fn set(latent: usize, v: f32) -> Self {
        Self {
            latent,
            value: EditValue::Set(v),
        }
    }
    /// Set `latent` to `m ×` its max observed activation (needs [`Intervention::with_features`]).
    pub fn scale_max(latent: usize, m: f32) -> Self {
        Self {
            latent,
            value: EditValue::SetMaxTimes(m),
        }
    }
    /// Add `v` to `latent`.
    pub fn add(latent: usize, v: f32) -> Self {
        Self {
            latent,
            value: EditValue::Add(v),
        }
    }
}

/// Backbone + layer + SAE + head. Cheap to clone.
#[derive(Clone)]
pub struct Intervention {
    vit: Backbone,
    layer: i64,
    sae: Sae,
    head: Head,
    max: Option<Vec<f32>>,
    w_dec: Vec<f32>,
    scalar: f32,
    group_by: GroupBy,
}

/// How the change-rate experiments decide which images or patches are "the target class's".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// The recorded labels (image labels, patch labels). The default.
    #[default]
    Labels,
    /// The head's own predictions before the edit — the paper's §5 grouping, which needs no
    /// labels and asks "did the model change its mind about what it saw as the class".
    Predictions,
}

impl std::str::FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        crate::util::parse_name(s, &["labels", "predictions"])
    }
}

/// What is added to the block-L output of the edited patches.
enum Perturb<'a> {
    /// SAE latent edits.
    Edits(&'a [Edit]),
    /// A fixed direction `[d]` per edited patch with the norm the given edits would have.
    DirectionLike(&'a [Edit], &'a [f32]),
}

impl std::fmt::Debug for Intervention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Intervention({} at layer {}, d_sae {}, {:?} head of {} classes, group by {:?}{})",
            self.vit.name(),
            self.layer,
            self.sae.d_sae(),
            self.head.kind(),
            self.head.classes().len(),
            self.group_by,
            crate::util::device::on_device(self.device())
        )
    }
}

/// `what` (an SAE or a head) says it was trained on backbone `ck`: refuse unless that names
/// `vit` — its name, its directory, or a path ending in the same directory name (a model moved
/// or opened from another working directory).
fn check_backbone(what: &str, ck: &str, vit: &Backbone) -> Result<()> {
    let dir = vit.dir().display().to_string();
    let tail = |s: &str| {
        s.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string()
    };
    if ck != dir && ck != vit.name() && tail(ck) != tail(&dir) {
        return Err(Error::mismatch(
            what,
            format!("trained on backbone `{ck}`"),
            format!("`{}` ({dir})", vit.name()),
            "",
        ));
    }
    Ok(())
}

impl Intervention {
    /// Where it computes: its backbone's device (the SAE and the head were moved there).
    pub fn device(&self) -> &candle_core::Device {
        self.vit.device()
    }

    /// Check that the SAE was trained on this backbone's `layer` (its provenance) and that the
    /// head reads this backbone's width.
    pub fn new(vit: &Backbone, layer: i64, sae: &Sae, head: &Head) -> Result<Self> {
        vit.layer_index(layer)?;
        if sae.d_model() != vit.d_model() {
            return Err(Error::Shape {
                what: format!("SAE d_model vs backbone {}", vit.name()),
                expected: vec![vit.d_model()],
                actual: vec![sae.d_model()],
            });
        }
        let prov = &sae.config().provenance;
        if let Some(l) = prov.get("layer").and_then(|v| v.as_i64()) {
            let same = vit.layer_index(l).ok() == vit.layer_index(layer).ok();
            if !same {
                return Err(Error::mismatch(
                    "SAE",
                    format!("trained on layer {l}"),
                    format!("layer {layer}"),
                    "",
                ));
            }
        }
        if let Some(ck) = prov.get("ckpt").and_then(|v| v.as_str()) {
            check_backbone("SAE", ck, vit)?;
        }
        // A head of another backbone of the same width (CLIP and DINOv2 ViT-B are both 768)
        // would score the edited model with weights made for other features: silently wrong.
        if !head.meta().backbone.is_empty() {
            check_backbone("head", &head.meta().backbone, vit)?;
        }
        if head.meta().d_model != vit.d_model() {
            return Err(Error::Shape {
                what: "head d_model vs backbone".into(),
                expected: vec![vit.d_model()],
                actual: vec![head.meta().d_model],
            });
        }
        let [_, _, w_dec, _] = sae.weights();
        Ok(Self {
            vit: vit.clone(),
            layer,
            // The SAE and the head compute where the backbone does.
            sae: sae.to_device(vit.device())?,
            head: head.to_device(vit.device())?,
            max: None,
            w_dec: w_dec.flatten_all()?.to_vec1()?,
            scalar: sae.config().norm.as_ref().map_or(1.0, |n| n.scalar),
            group_by: GroupBy::Labels,
        })
    }

    /// Group the change rates' images or patches by labels (default) or by the head's
    /// predictions before the edit.
    pub fn with_group_by(mut self, group_by: GroupBy) -> Self {
        self.group_by = group_by;
        self
    }

    /// Use the feature pass's max values for `*MaxTimes` edits.
    pub fn with_features(mut self, f: &Features) -> Self {
        self.max = Some(f.max_value().to_vec());
        self
    }

    fn check(&self, patches: Option<&[usize]>, edits: &[Edit]) -> Result<()> {
        let p = self.vit.n_patches();
        let (gr, gc) = self.vit.patch_grid();
        if let Some(&bad) = patches.unwrap_or(&[]).iter().find(|&&q| q >= p) {
            return Err(Error::out_of_range(
                "patch",
                bad,
                format!("0..{} on the {gr}×{gc} grid", gr * gc),
            ));
        }
        if let Some(m) = &self.max {
            if m.len() != self.sae.d_sae() {
                return Err(Error::mismatch(
                    "the latent maxima given by Intervention::with_features",
                    format!("{} latents (the SAE's d_sae)", self.sae.d_sae()),
                    format!("{} latents", m.len()),
                    "pass the feature pass of this SAE",
                ));
            }
        }
        for (i, e) in edits.iter().enumerate() {
            // Every edit's change is computed from the unedited codes, so a latent listed twice
            // would be moved twice (set to 0 twice ends at −value).
            if edits[..i].iter().any(|o| o.latent == e.latent) {
                return Err(Error::out_of_range(
                    "edited latent",
                    format!("{} (listed twice)", e.latent),
                    "each latent at most once in an edit list",
                ));
            }
            if e.latent >= self.sae.d_sae() {
                return Err(Error::out_of_range(
                    "latent",
                    e.latent,
                    format!("0..{} (d_sae)", self.sae.d_sae()),
                ));
            }
            if matches!(
                e.value,
                EditValue::SetMaxTimes(_) | EditValue::AddMaxTimes(_)
            ) && self.max.is_none()
            {
                return Err(Error::missing(
                    "a max-multiple edit",
                    "the latent maxima",
                    "Intervention::with_features",
                ));
            }
        }
        Ok(())
    }

    fn target(&self, e: &Edit, current: f32) -> f32 {
        let mx = |l: usize| self.max.as_ref().map_or(0.0, |m| m[l]);
        match e.value {
            EditValue::Set(v) => v,
            EditValue::SetMaxTimes(m) => m * mx(e.latent),
            EditValue::Add(v) => current + v,
            EditValue::AddMaxTimes(m) => current + m * mx(e.latent),
        }
    }

    /// Edit the patch tokens `[B, T, D]` (CLS first when present) on `patches` (None = all).
    fn edit_tokens(
        &self,
        tokens: &Tensor,
        patches: Option<&[usize]>,
        how: &Perturb,
    ) -> Result<Tensor> {
        let (b, t, d) = tokens.dims3()?;
        let c = usize::from(self.vit.has_cls());
        let p = t - c;
        let edits = match how {
            Perturb::Edits(e) | Perturb::DirectionLike(e, _) => *e,
        };
        if edits.is_empty() {
            return Ok(tokens.clone());
        }
        let mut x: Vec<f32> = tokens.flatten_all()?.to_vec1()?;
        // A patch listed twice is edited once (each is moved from its unedited codes).
        let mut rows: Vec<usize> = patches.map_or_else(|| (0..p).collect(), <[usize]>::to_vec);
        rows.sort_unstable();
        rows.dedup();
        let s = self.sae.d_sae();
        for img in 0..b {
            let patch_rows: Vec<usize> = rows.iter().map(|&q| (img * t + c + q) * d).collect();
            let xs: Vec<f32> = patch_rows
                .iter()
                .flat_map(|&o| x[o..o + d].to_vec())
                .collect();
            let xt = Tensor::from_vec(xs, (patch_rows.len(), d), self.vit.device())?;
            let f: Vec<f32> = self.sae.encode(&xt)?.flatten_all()?.to_vec1()?;
            for (r, &o) in patch_rows.iter().enumerate() {
                let mut delta = vec![0f32; d];
                for e in edits {
                    let cur = f[r * s + e.latent];
                    let df = self.target(e, cur) - cur;
                    if df != 0.0 {
                        let w = &self.w_dec[e.latent * d..(e.latent + 1) * d];
                        for (dv, wv) in delta.iter_mut().zip(w) {
                            *dv += self.scalar * df * wv;
                        }
                    }
                }
                if let Perturb::DirectionLike(_, u) = how {
                    let norm = delta.iter().map(|v| v * v).sum::<f32>().sqrt();
                    for (dv, uv) in delta.iter_mut().zip(u.iter()) {
                        *dv = norm * uv;
                    }
                }
                for (xv, dv) in x[o..o + d].iter_mut().zip(&delta) {
                    *xv += dv;
                }
            }
        }
        Ok(Tensor::from_vec(x, (b, t, d), self.vit.device())?)
    }

    /// The block-`layer` tokens `[B, T, D]` (CLS first) before and after the edit, without running
    /// the rest of the model — to inspect exactly what an edit changes.
    pub fn edited_tokens(
        &self,
        images: &[DynamicImage],
        patches: Option<&[usize]>,
        edits: &[Edit],
    ) -> Result<(Tensor, Tensor)> {
        self.check(patches, edits)?;
        let pixels = self.vit.pixels(images)?;
        let tokens = self.vit.forward_to(&pixels, self.layer)?.tokens()?;
        let edited = self
            .edit_tokens(&tokens, patches, &Perturb::Edits(edits))
            .computing(|| self.edit_context(&tokens))?;
        Ok((tokens, edited))
    }

    /// What a failed edit was computing.
    fn edit_context(&self, tokens: &Tensor) -> String {
        format!(
            "editing block {} tokens {:?} through the SAE (d_sae {})",
            self.layer,
            tokens.dims(),
            self.sae.d_sae()
        )
    }

    fn heads_from_tokens(&self, tokens: &Tensor, registers: Option<&Tensor>) -> Result<Vec<f32>> {
        let res = Residual::from_recorded(&self.vit, self.layer, tokens, registers)?;
        let out = self.vit.forward_from(&res)?;
        Ok(self
            .head
            .predict(&self.vit, &out)?
            .flatten_all()?
            .to_vec1()?)
    }

    /// Edit one image: `patches` (None = all), `edits`; before/after predictions.
    pub fn run(
        &self,
        image: &DynamicImage,
        patches: Option<&[usize]>,
        edits: &[Edit],
    ) -> Result<Outcome> {
        let mut v = self.run_batch(std::slice::from_ref(image), patches, edits)?;
        // One image in, one outcome out.
        v.pop()
            .ok_or_else(|| Error::Internal("run_many returned no outcome".into()))
    }

    /// [`Intervention::run`] over many images at once.
    pub fn run_batch(
        &self,
        images: &[DynamicImage],
        patches: Option<&[usize]>,
        edits: &[Edit],
    ) -> Result<Vec<Outcome>> {
        self.check(patches, edits)?;
        let pixels = self.vit.pixels(images)?;
        let res = self.vit.forward_to(&pixels, self.layer)?;
        let tokens = res.tokens()?;
        let edited = self
            .edit_tokens(&tokens, patches, &Perturb::Edits(edits))
            .computing(|| self.edit_context(&tokens))?;
        let before = self.vit.forward_from(&res)?;
        let after = self.vit.forward_from(&res.with_tokens(&edited)?)?;
        let predict = |out| -> Result<Vec<f32>> {
            (|| {
                Ok(self
                    .head
                    .predict(&self.vit, out)?
                    .flatten_all()?
                    .to_vec1()?)
            })()
            .computing(|| format!("the head's predictions ({})", self.vit.name()))
        };
        let (pb, pa) = (predict(&before)?, predict(&after)?);
        let per = pb.len() / images.len().max(1);
        let p = self.vit.n_patches();
        Ok(images
            .iter()
            .enumerate()
            .map(|(i, img)| Outcome {
                before: pb[i * per..(i + 1) * per].to_vec(),
                after: pa[i * per..(i + 1) * per].to_vec(),
                classes: self.head.classes().to_vec(),
                patches: patches.map_or_else(|| (0..p).collect(), <[usize]>::to_vec),
                kind: self.head.kind(),
                view: Some(self.vit.preprocess().model_view(img)),
                grid: self.vit.patch_grid(),
            })
            .collect())
    }
}
