//! Exemplar search (the paper's Figure 2 procedure) and SAE comparison.
//!
//! Search: run a new image through the backbone to the SAE's layer, encode its patches, sum
//! the codes over the highlighted patches, drop dense latents (frequency > 1e-2), and return
//! the top latents with their exemplar grids. Comparison: for a latent of SAE A, the latents of
//! SAE B whose per-image max activations correlate most with it over the same images (two
//! stores of the same dataset, e.g. two backbones).
//!
//! ```no_run
//! # use saev::prelude::*;
//! # let store = ActivationStore::open("acts/1a2b3c4d")?;
//! # let ex = Explorer::open("runs/a/0", &store)?;
//! let vit = Backbone::open("facebook/dinov2-small")?;
//! let img = load_image("photo.jpg")?;
//! let patches = ex.patches_in_rect((56, 56, 112, 112));   // a box in the 224×224 view
//! let hits = ex.search(&vit, &img, &patches, 3)?;         // renders query + grids inline
//! # Ok::<(), saev::Error>(())
//! ```

use std::fmt;

use image::DynamicImage;

use super::features::CodeEngine;
use super::picture::{ExemplarGrid, Heatmap};
use super::Explorer;
use crate::backbone::Backbone;
use crate::error::{Error, Result};
use crate::sae::eval::DENSE_FREQ;
use crate::sae::Compute;
use crate::store::Tokens;
use crate::util::display::{base64, emit_text};

/// What [`Explorer::search`] found.
#[derive(Clone)]
pub struct SearchResult {
    /// The query image with the highlighted patches outlined.
    pub query: Heatmap,
    /// (latent, summed activation over the highlighted patches), best first.
    pub hits: Vec<(usize, f32)>,
    /// One exemplar grid per hit.
    pub grids: Vec<ExemplarGrid>,
}

impl fmt::Debug for SearchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SearchResult(hits {:?})", self.hits)
    }
}

impl SearchResult {
    /// Jupyter (evcxr) display: the query and the grids, as HTML with inline PNGs.
    pub fn evcxr_display(&self) {
        let mut html = String::from("<div>");
        let mut push = |png: Result<Vec<u8>>, cap: &str| {
            match png {
            Ok(b) => html.push_str(&format!(
                "<figure><img src=\"data:image/png;base64,{}\"/><figcaption>{}</figcaption></figure>",
                base64(&b),
                cap
            )),
            Err(e) => html.push_str(&format!("<p>{e}</p>")),
        }
        };
        push(self.query.to_png(), "query (highlighted patches outlined)");
        for (g, (l, v)) in self.grids.iter().zip(&self.hits) {
            push(g.to_png(), &format!("latent {l}: summed activation {v:.2}"));
        }
        html.push_str("</div>");
        emit_text("text/html", &html);
    }
}

impl Explorer {
    /// Patch indices (row-major) whose cells overlap the pixel box `(x0, y0, x1, y1)` of the
    /// model-input view (exclusive right/bottom).
    pub fn patches_in_rect(&self, (x0, y0, x1, y1): (usize, usize, usize, usize)) -> Vec<usize> {
        let (gr, gc) = self.patch_grid();
        let side = self.view_side();
        let (ch, cw) = (side as f64 / gr as f64, side as f64 / gc as f64);
        let mut out = Vec::new();
        for r in 0..gr {
            for c in 0..gc {
                let (px0, py0) = (c as f64 * cw, r as f64 * ch);
                let (px1, py1) = (px0 + cw, py0 + ch);
                if (x0 as f64) < px1 && (x1 as f64) > px0 && (y0 as f64) < py1 && (y1 as f64) > py0
                {
                    out.push(r * gc + c);
                }
            }
        }
        out
    }

    fn view_side(&self) -> usize {
        self.view(0).map(|v| v.width() as usize).unwrap_or(224)
    }

    /// Figure-2 search: the top `n` non-dense latents on `patches` of `image` (run through
    /// `vit` to the SAE's layer), with their exemplar grids (8 images each).
    pub fn search(
        &self,
        vit: &Backbone,
        image: &DynamicImage,
        patches: &[usize],
        n: usize,
    ) -> Result<SearchResult> {
        let (gr, gc) = self.patch_grid();
        let p = gr * gc;
        if let Some(&bad) = patches.iter().find(|&&q| q >= p) {
            return Err(Error::out_of_range(
                "patch",
                bad,
                format!("0..{} on the {gr}×{gc} grid", gr * gc),
            ));
        }
        if vit.d_model() != self.sae().d_model() {
            return Err(Error::Shape {
                what: "backbone width vs SAE d_model".into(),
                expected: vec![self.sae().d_model()],
                actual: vec![vit.d_model()],
            });
        }
        if vit.n_patches() != p {
            return Err(Error::Shape {
                what: "backbone patches per image vs the store's".into(),
                expected: vec![p],
                actual: vec![vit.n_patches()],
            });
        }
        let layer = self.features().layer();
        let pixels = vit.pixels(std::slice::from_ref(image))?;
        let acts = vit.record(&pixels, &[layer])?; // [1, 1, T, D]
        let t = acts.dims()[2];
        let x: Vec<f32> = acts.narrow(2, t - p, p)?.flatten_all()?.to_vec1()?;
        // Encoded where the backbone ran.
        let codes = CodeEngine::new(self.sae(), &Compute::for_device(vit.device()))?.codes(x)?;
        let s = self.sae().d_sae();
        let freq = self.features().freq();
        let mut score = vec![0f32; s];
        for &q in patches {
            for (a, v) in score.iter_mut().zip(&codes[q * s..(q + 1) * s]) {
                *a += v;
            }
        }
        let mut hits: Vec<(usize, f32)> = score
            .into_iter()
            .enumerate()
            .filter(|&(i, v)| v > 0.0 && freq[i] <= DENSE_FREQ)
            .collect();
        hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        hits.truncate(n);
        let view = vit.preprocess().model_view(image);
        let query = Heatmap::new(view, vec![0.0; p], (gr, gc))?.with_highlight(patches.to_vec());
        let grids = hits
            .iter()
            .map(|&(l, _)| self.grid(l, 8))
            .collect::<Result<Vec<_>>>()?;
        Ok(SearchResult { query, hits, grids })
    }

    /// For `latent` of this SAE, the `top` latents of `other` (over the same images, in the
    /// same order) whose per-image max activation correlates most (Pearson), best first.
    pub fn compare(
        &self,
        latent: usize,
        other: &Explorer,
        top: usize,
    ) -> Result<Vec<(usize, f64)>> {
        let (sa, sb) = (self.store(), other.store());
        if sa.n_examples() != sb.n_examples() {
            return Err(Error::mismatch(
                "compare",
                format!("{} examples in the first store", sa.n_examples()),
                format!("{} in the second", sb.n_examples()),
                "the stores must hold the same images",
            ));
        }
        if latent >= self.sae().d_sae() {
            return Err(Error::out_of_range(
                "latent",
                latent,
                format!("0..{} (d_sae)", self.sae().d_sae()),
            ));
        }
        let ea = CodeEngine::new(self.sae(), self.compute())?;
        let eb = CodeEngine::new(other.sae(), other.compute())?;
        let (pa, pb) = (sa.n_patches(), sb.n_patches());
        let (sa_s, s) = (self.sae().d_sae(), other.sae().d_sae());
        let per = 16;
        let (mut sx, mut sxx) = (0f64, 0f64);
        let (mut sy, mut syy, mut sxy) = (vec![0f64; s], vec![0f64; s], vec![0f64; s]);
        let mut n = 0f64;
        let it_b = sb.ordered(other.features().layer(), Tokens::Patches, per)?;
        for ((_, xa), (_, xb)) in sa
            .ordered(self.features().layer(), Tokens::Patches, per)?
            .zip(it_b)
        {
            let (ma, mb) = (ea.example_maxima(xa, pa)?, eb.example_maxima(xb, pb)?);
            for (ra, rb) in ma.chunks_exact(sa_s).zip(mb.chunks_exact(s)) {
                // Codes are ≥ 0 but for a TopK without ReLU: its maxima count from 0.
                let a = f64::from(ra[latent].max(0.0));
                sx += a;
                sxx += a * a;
                for j in 0..s {
                    let b = f64::from(rb[j].max(0.0));
                    sy[j] += b;
                    syy[j] += b * b;
                    sxy[j] += a * b;
                }
                n += 1.0;
            }
        }
        let vx = sxx - sx * sx / n;
        let mut out: Vec<(usize, f64)> = (0..s)
            .map(|j| {
                let vy = syy[j] - sy[j] * sy[j] / n;
                let c = sxy[j] - sx * sy[j] / n;
                let r = if vx > 0.0 && vy > 0.0 {
                    c / (vx * vy).sqrt()
                } else {
                    0.0
                };
                (j, r)
            })
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(top);
        Ok(out)
    }
}
