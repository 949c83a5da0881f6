//! What one intervention did to one image, rendered: class bars before and after (SVG), the
//! edited patches outlined over the image and, for segmenters, the predicted masks (PNG) — as
//! HTML inline in a notebook.

use std::fmt;

use image::RgbImage;

use super::HeadKind;
use crate::error::Result;
use crate::explore::picture::{plasma, Heatmap};
use crate::util::display::{base64, emit_text, html_escape};

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
    pub(super) view: Option<RgbImage>,
    pub(super) grid: (usize, usize),
}

pub(super) fn argmax(v: &[f32]) -> usize {
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
