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

pub(crate) mod head;

pub use head::{miou, Head, HeadConfig, HeadKind, HeadMeta};

use std::fmt;

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, Residual};
use crate::error::{Error, Result};
use crate::explore::features::Features;
use crate::explore::picture::{plasma, Heatmap};
use crate::sae::model::Sae;
use crate::store::{ActivationStore, Examples, Tokens};
use crate::util::display::{base64, emit_text, html_escape};

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
}

/// Before/after predictions of one image. Renders inline.
#[derive(Clone)]
pub struct Outcome {
    /// Probabilities before `[C]` (classifier) or `[P, C]` (segmenter), flattened.
    pub before: Vec<f32>,
    /// Probabilities after, same layout.
    pub after: Vec<f32>,
    /// Class names.
    pub classes: Vec<String>,
    /// Edited patches.
    pub patches: Vec<usize>,
    /// Head kind.
    pub kind: HeadKind,
    view: Option<RgbImage>,
    grid: (usize, usize),
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

impl Outcome {
    /// Predicted class before and after (classifier), or per patch (segmenter: `[P]` each).
    pub fn labels(&self) -> (Vec<usize>, Vec<usize>) {
        let c = self.classes.len();
        let f = |v: &[f32]| v.chunks(c).map(argmax).collect();
        (f(&self.before), f(&self.after))
    }

    /// Whether any predicted label changed.
    pub fn changed(&self) -> bool {
        let (a, b) = self.labels();
        a != b
    }

    fn bars_svg(&self) -> String {
        let c = self.classes.len();
        let mut idx: Vec<usize> = (0..c).collect();
        idx.sort_by(|&a, &b| {
            self.before[b]
                .max(self.after[b])
                .total_cmp(&self.before[a].max(self.after[a]))
        });
        idx.truncate(5);
        let mut s = String::from("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"380\" height=\"130\" font-family=\"sans-serif\" font-size=\"11\">");
        s.push_str("<text x=\"150\" y=\"11\">before</text><text x=\"270\" y=\"11\">after</text>");
        for (row, &k) in idx.iter().enumerate() {
            let y = 18 + row * 22;
            let name = html_escape(&self.classes[k]);
            s.push_str(&format!("<text x=\"0\" y=\"{}\">{name}</text>", y + 12));
            for (col, p) in [(150, self.before[k]), (270, self.after[k])] {
                s.push_str(&format!(
                    "<rect x=\"{col}\" y=\"{y}\" width=\"{:.1}\" height=\"16\" fill=\"#5b4bab\"/><text x=\"{}\" y=\"{}\">{:.2}</text>",
                    100.0 * p,
                    col + 2 + (100.0 * p) as usize,
                    y + 12,
                    p
                ));
            }
        }
        s.push_str("</svg>");
        s
    }

    fn mask_png(&self, probs: &[f32]) -> Result<Vec<u8>> {
        let c = self.classes.len();
        let (gr, gc) = self.grid;
        let cell = 14u32;
        let mut img = RgbImage::new(gc as u32 * cell, gr as u32 * cell);
        for (p, row) in probs.chunks(c).enumerate() {
            let k = argmax(row);
            let col = if k == 0 {
                [0, 0, 0]
            } else {
                plasma(k as f32 / (c - 1).max(1) as f32)
            };
            let (r, q) = ((p / gc) as u32, (p % gc) as u32);
            for y in r * cell..(r + 1) * cell {
                for x in q * cell..(q + 1) * cell {
                    img.put_pixel(x, y, image::Rgb(col));
                }
            }
        }
        crate::explore::picture::png(&img)
    }

    /// Jupyter (evcxr) display: [`Outcome::to_html`].
    pub fn evcxr_display(&self) {
        emit_text("text/html", &self.to_html());
    }

    /// The image with edited patches outlined, and class bars (classifier) or predicted masks
    /// (segmenter) before / after, as HTML with inline PNG/SVG.
    pub fn to_html(&self) -> String {
        let mut html = String::from("<div style=\"display:flex;gap:12px;align-items:flex-start\">");
        if let Some(v) = &self.view {
            let p = self.grid.0 * self.grid.1;
            if let Ok(png) = Heatmap::new(v.clone(), vec![0.0; p], self.grid)
                .and_then(|h| h.with_highlight(self.patches.clone()).to_png())
            {
                html.push_str(&format!(
                    "<img src=\"data:image/png;base64,{}\"/>",
                    base64(&png)
                ));
            }
        }
        match self.kind {
            HeadKind::Segmenter => {
                for (name, probs) in [("before", &self.before), ("after", &self.after)] {
                    if let Ok(png) = self.mask_png(probs) {
                        html.push_str(&format!(
                            "<figure><img src=\"data:image/png;base64,{}\"/><figcaption>{name}</figcaption></figure>",
                            base64(&png)
                        ));
                    }
                }
            }
            _ => html.push_str(&self.bars_svg()),
        }
        html.push_str("</div>");
        html
    }
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b) = self.labels();
        let name = |v: &[usize]| -> String {
            v.iter()
                .take(4)
                .map(|&k| self.classes.get(k).cloned().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "Outcome({} patches edited: {} → {})",
            self.patches.len(),
            name(&a),
            name(&b)
        )
    }
}

/// What is added to the block-L output of the edited patches.
enum Perturb<'a> {
    /// SAE latent edits.
    Edits(&'a [Edit]),
    /// A fixed direction `[d]` per edited patch with the norm the given edits would have.
    DirectionLike(&'a [Edit], &'a [f32]),
}

impl Intervention {
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
                    "SAE",
                    format!("trained on backbone `{ck}`"),
                    format!("`{}` ({dir})", vit.name()),
                    "",
                ));
            }
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
            sae: sae.clone(),
            head: head.clone(),
            max: None,
            w_dec: w_dec.flatten_all()?.to_vec1()?,
            scalar: sae.config().norm.as_ref().map_or(1.0, |n| n.scalar),
        })
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
        for e in edits {
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
        let rows: Vec<usize> = patches.map_or_else(|| (0..p).collect(), <[usize]>::to_vec);
        let s = self.sae.d_sae();
        for img in 0..b {
            let patch_rows: Vec<usize> = rows.iter().map(|&q| (img * t + c + q) * d).collect();
            let xs: Vec<f32> = patch_rows
                .iter()
                .flat_map(|&o| x[o..o + d].to_vec())
                .collect();
            let xt = Tensor::from_vec(xs, (patch_rows.len(), d), &Device::Cpu)?;
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
        Ok(Tensor::from_vec(x, (b, t, d), &Device::Cpu)?)
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
        let edited = self.edit_tokens(&tokens, patches, &Perturb::Edits(edits))?;
        Ok((tokens, edited))
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
        let edited = self.edit_tokens(&tokens, patches, &Perturb::Edits(edits))?;
        let before = self.vit.forward_from(&res)?;
        let after = self.vit.forward_from(&res.with_tokens(&edited)?)?;
        let pb: Vec<f32> = self
            .head
            .predict(&self.vit, &before)?
            .flatten_all()?
            .to_vec1()?;
        let pa: Vec<f32> = self
            .head
            .predict(&self.vit, &after)?
            .flatten_all()?
            .to_vec1()?;
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

    /// The paper's §5.2 test on some of the store's examples (recorded at this layer; a range
    /// `(start, end)` or an [`Examples`] split such as the head's [`Head::held_out`]): edit
    /// `latent` to `mult ×` its max on the patches where it fires, and count how often the
    /// head's prediction changes for images (classifier) or patches (segmenter: per-patch labels
    /// from the store) of the latent's class (`target_class`) and of other classes — next to
    /// two controls: a random unit direction with the same norm per patch, and a random live
    /// latent edited the same way on its own active patches.
    pub fn change_rates(
        &self,
        store: &ActivationStore,
        examples: impl Into<Examples>,
        latent: usize,
        target_class: u32,
        mult: f32,
        seed: u64,
    ) -> Result<ChangeRates> {
        self.check(None, &[Edit::scale_max(latent, mult)])?;
        let examples = examples.into();
        let ids = examples.ids(store.n_examples())?;
        let seg = self.head.kind() == HeadKind::Segmenter;
        let labels = store
            .provenance()
            .map(|p| p.labels.clone())
            .unwrap_or_default();
        if !seg && labels.iter().all(Option::is_none) {
            return Err(Error::missing(
                store.dir().display().to_string(),
                "no image labels",
                "record a labelled dataset",
            ));
        }
        if seg && store.patch_labels(ids[0]).is_none() {
            return Err(Error::missing(
                store.dir().display().to_string(),
                "no per-patch labels for a segmentation head",
                "record a segmentation dataset",
            ));
        }
        let max = self.max.as_ref().ok_or_else(|| {
            Error::missing(
                "change rates",
                "the latent maxima",
                "Intervention::with_features",
            )
        })?;
        // Control latent: a seeded random live latent other than `latent`.
        let live: Vec<usize> = (0..max.len())
            .filter(|&l| max[l] > 0.0 && l != latent)
            .collect();
        if live.is_empty() {
            return Err(Error::missing(
                "the random-latent control",
                "no other live latent",
                "",
            ));
        }
        let ctrl = live[(crate::util::rng::splitmix64(seed) % live.len() as u64) as usize];
        let d = self.vit.d_model();
        let mut u: Vec<f32> = (0..d)
            .map(|i| {
                let z =
                    crate::util::rng::splitmix64(seed.wrapping_mul(31).wrapping_add(i as u64 + 1));
                (z >> 11) as f32 / (1u64 << 53) as f32 - 0.5
            })
            .collect();
        let nu = u.iter().map(|v| v * v).sum::<f32>().sqrt();
        u.iter_mut().for_each(|v| *v /= nu);
        let (t, c) = (store.tokens_per_example(), usize::from(self.vit.has_cls()));
        let p = t - c;
        let mut r = ChangeRates {
            latent,
            control_latent: ctrl,
            target_class,
            mult,
            counts: [[0; 2]; 3],
            totals: [0; 2],
        };
        let bar = crate::util::progress::bar(ids.len() as u64, "images");
        for (chunk, x) in store.ordered_examples(self.layer, Tokens::All, 8, examples)? {
            let n = x.len() / (t * d);
            let tokens = Tensor::from_vec(x, (n, t, d), &Device::Cpu)?;
            let regs = head::recorded_registers(store, &chunk, self.layer, &Device::Cpu)?;
            let before = self.heads_from_tokens(&tokens, regs.as_ref())?;
            let c_n = self.head.classes().len();
            let rows_per = if seg { p } else { 1 };
            let preds = |v: &[f32]| -> Vec<usize> { v.chunks(c_n).map(argmax).collect() };
            for i in 0..n {
                let img = tokens.narrow(0, i, 1)?;
                let img_regs = match &regs {
                    Some(r) => Some(r.narrow(0, i, 1)?),
                    None => None,
                };
                // Group of each counted unit (the image, or each patch): 0 target, 1 other.
                let groups: Vec<usize> = if seg {
                    let pl = store.patch_labels(chunk[i]).unwrap_or(&[]);
                    pl.iter()
                        .map(|&l| usize::from(u32::from(l) != target_class))
                        .collect()
                } else {
                    match labels.get(chunk[i]).copied().flatten() {
                        Some(lab) => vec![usize::from(lab != target_class)],
                        None => continue,
                    }
                };
                for &g in &groups {
                    r.totals[g] += 1;
                }
                let pred0 = preds(&before[i * rows_per * c_n..(i + 1) * rows_per * c_n]);
                let active = |l: usize| -> Result<Vec<usize>> {
                    let xs = img.narrow(1, c, p)?.squeeze(0)?;
                    let f = self.sae.encode(&xs)?.narrow(1, l, 1)?.squeeze(1)?;
                    let v: Vec<f32> = f.to_vec1()?;
                    Ok((0..p).filter(|&q| v[q] > 0.0).collect())
                };
                let (pa, pc) = (active(latent)?, active(ctrl)?);
                let e_main = [Edit::scale_max(latent, mult)];
                let e_ctrl = [Edit::scale_max(ctrl, mult)];
                for (k, (rows, how)) in [
                    (&pa, Perturb::Edits(&e_main)),
                    (&pa, Perturb::DirectionLike(&e_main, &u)),
                    (&pc, Perturb::Edits(&e_ctrl)),
                ]
                .into_iter()
                .enumerate()
                {
                    if rows.is_empty() {
                        continue;
                    }
                    let edited = self.edit_tokens(&img, Some(rows), &how)?;
                    let after = preds(&self.heads_from_tokens(&edited, img_regs.as_ref())?);
                    for ((a, b), &g) in after.iter().zip(&pred0).zip(&groups) {
                        if a != b {
                            r.counts[k][g] += 1;
                        }
                    }
                }
            }
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        Ok(r)
    }
}

/// Counts of [`Intervention::change_rates`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRates {
    /// The latent tested.
    pub latent: usize,
    /// The random live latent of the control.
    pub control_latent: usize,
    /// The latent's class.
    pub target_class: u32,
    /// The edit: `mult ×` max.
    pub mult: f32,
    /// Changed predictions `[edit, random direction, random latent][target, other]` (images for
    /// a classifier, patches for a segmenter).
    pub counts: [[usize; 2]; 3],
    /// Images (classifier) or patches (segmenter) `[target, other]`.
    pub totals: [usize; 2],
}

impl ChangeRates {
    /// Jupyter (evcxr) display: the table as Markdown.
    pub fn evcxr_display(&self) {
        emit_text("text/markdown", &self.to_string());
    }

    /// `(target rate, other rate)` of row `k` (0 edit, 1 random direction, 2 random latent).
    pub fn rates(&self, k: usize) -> (f64, f64) {
        let f = |c: usize, n: usize| if n == 0 { 0.0 } else { c as f64 / n as f64 };
        (
            f(self.counts[k][0], self.totals[0]),
            f(self.counts[k][1], self.totals[1]),
        )
    }
}

impl fmt::Display for ChangeRates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "latent {} ({}× max; target class {}; {} target / {} other units)\n",
            self.latent, self.mult, self.target_class, self.totals[0], self.totals[1]
        )?;
        writeln!(
            f,
            "| perturbation | target changed | other changed |\n|---|---|---|"
        )?;
        for (k, name) in [
            "SAE latent edit".to_string(),
            "random direction, same norm".to_string(),
            format!("random live latent {}", self.control_latent),
        ]
        .iter()
        .enumerate()
        {
            let (a, b) = self.rates(k);
            writeln!(
                f,
                "| {name} | {:.1}% ({}/{}) | {:.1}% ({}/{}) |",
                100.0 * a,
                self.counts[k][0],
                self.totals[0],
                100.0 * b,
                self.counts[k][1],
                self.totals[1]
            )?;
        }
        Ok(())
    }
}
