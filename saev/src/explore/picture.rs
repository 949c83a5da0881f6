//! Pictures that render themselves: a latent's patch heatmap over the model-input crop, and an
//! exemplar grid (k images with heatmaps, captioned). PNG via `image`, text, outlines and the
//! colour bar via plotters (with an embedded DejaVu Sans subset, so no system fonts are needed).
//!
//! Heatmap (the paper's): each patch rectangle is blended with `plasma(v / upper)` at alpha
//! `0.9 · v / upper` (clamped to [0, 1] before scaling), `upper` = the latent's max value.
//!
//! ```no_run
//! # let view = saev::image::RgbImage::new(224, 224);
//! let hm = saev::explore::Heatmap::new(view, vec![0.0; 256], (16, 16))?.with_upper(3.0);
//! hm.save("latent-12.png")?;     // or, in a notebook, just `hm`
//! # Ok::<(), saev::Error>(())
//! ```

use std::fmt;
use std::io::Cursor;
use std::path::Path;
use std::sync::Once;

use image::{ImageFormat, Rgb, RgbImage};
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::util::display::{show_png, write_out};

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-subset.ttf");
static FONT_ONCE: Once = Once::new();

/// Make the embedded font available to plotters as "sans-serif".
pub(crate) fn ensure_font() {
    FONT_ONCE.call_once(|| {
        // The embedded bytes are a valid TrueType file (checked by a test); a failure would
        // only mean captions are not drawn.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// matplotlib's `plasma`, 9 stops (0, 1/8, …, 1), linearly interpolated.
const PLASMA: [[f32; 3]; 9] = [
    [13.0, 8.0, 135.0],
    [75.0, 3.0, 161.0],
    [125.0, 3.0, 168.0],
    [168.0, 34.0, 150.0],
    [204.0, 71.0, 120.0],
    [229.0, 107.0, 93.0],
    [248.0, 149.0, 64.0],
    [253.0, 195.0, 40.0],
    [240.0, 249.0, 33.0],
];

/// The plasma colour at `t` ∈ [0, 1] (clamped).
pub fn plasma(t: f32) -> [u8; 3] {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * 8.0;
    let i = (x.floor() as usize).min(7);
    let f = x - i as f32;
    let (a, b) = (PLASMA[i], PLASMA[i + 1]);
    [0, 1, 2].map(|c| (a[c] + (b[c] - a[c]) * f).round() as u8)
}

fn plot_err(e: impl fmt::Display) -> Error {
    Error::render("drawing", e)
}

/// A latent's per-patch values over an image (the model-input crop). Renders as PNG.
#[derive(Clone)]
pub struct Heatmap {
    view: RgbImage,
    values: Vec<f32>,
    grid: (usize, usize),
    upper: f32,
    highlight: Vec<usize>,
    colorbar: bool,
    caption: Option<String>,
}

impl Heatmap {
    /// `values` has one entry per patch, row-major over `grid` = (rows, cols).
    pub fn new(view: RgbImage, values: Vec<f32>, grid: (usize, usize)) -> Result<Self> {
        if values.len() != grid.0 * grid.1 || grid.0 == 0 {
            return Err(Error::Shape {
                what: "heatmap values vs patch grid".into(),
                expected: vec![grid.0, grid.1],
                actual: vec![values.len()],
            });
        }
        let upper = values.iter().copied().fold(0f32, f32::max);
        Ok(Self {
            view,
            values,
            grid,
            upper,
            highlight: Vec::new(),
            colorbar: false,
            caption: None,
        })
    }
    /// Colour scale top (default: the max of the values; use the latent's max to compare).
    pub fn with_upper(mut self, upper: f32) -> Self {
        self.upper = upper;
        self
    }
    /// Outline these patches (indices row-major in the grid).
    pub fn with_highlight(mut self, patches: Vec<usize>) -> Self {
        self.highlight = patches;
        self
    }
    /// Draw a colour bar on the right.
    pub fn with_colorbar(mut self, on: bool) -> Self {
        self.colorbar = on;
        self
    }
    /// A caption under the image.
    pub fn with_caption(mut self, text: impl Into<String>) -> Self {
        self.caption = Some(text.into());
        self
    }
    /// The per-patch values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }
    /// The patches where the latent fires (value > 0), in raster order: the patches to edit.
    pub fn active_patches(&self) -> Vec<usize> {
        (0..self.values.len())
            .filter(|&p| self.values[p] > 0.0)
            .collect()
    }

    /// Pixel rectangle `(x0, y0, x1, y1)` of patch `p` in the view.
    fn cell(&self, p: usize) -> (u32, u32, u32, u32) {
        let (gr, gc) = self.grid;
        let (w, h) = (self.view.width() as usize, self.view.height() as usize);
        let (r, c) = (p / gc, p % gc);
        (
            (c * w / gc) as u32,
            (r * h / gr) as u32,
            ((c + 1) * w / gc) as u32,
            ((r + 1) * h / gr) as u32,
        )
    }

    /// The blended image only (no bar, no caption), same size as the view.
    pub fn overlay(&self) -> RgbImage {
        let mut img = self.view.clone();
        let up = if self.upper > 0.0 { self.upper } else { 1.0 };
        for (p, &v) in self.values.iter().enumerate() {
            if v <= 0.0 {
                continue;
            }
            let t = (v / up).clamp(0.0, 1.0);
            let (col, a) = (plasma(t), 0.9 * t);
            let (x0, y0, x1, y1) = self.cell(p);
            for y in y0..y1 {
                for x in x0..x1 {
                    let px = img.get_pixel_mut(x, y);
                    for (ch, &cc) in px.0.iter_mut().zip(&col) {
                        *ch = ((1.0 - a) * f32::from(*ch) + a * f32::from(cc)).round() as u8;
                    }
                }
            }
        }
        img
    }

    /// The full picture: overlay, highlighted outlines, colour bar, caption.
    pub fn render(&self) -> Result<RgbImage> {
        ensure_font();
        let base = self.overlay();
        let (w, h) = (base.width(), base.height());
        let bar_w = if self.colorbar { 46 } else { 0 };
        let cap_h = if self.caption.is_some() { 18 } else { 0 };
        let (tw, th) = (w + bar_w, h + cap_h);
        let mut canvas = RgbImage::from_pixel(tw, th, Rgb([255, 255, 255]));
        image::imageops::replace(&mut canvas, &base, 0, 0);
        {
            let mut buf = canvas.as_raw().clone();
            {
                let root = BitMapBackend::with_buffer(&mut buf, (tw, th)).into_drawing_area();
                for &p in &self.highlight {
                    if p >= self.values.len() {
                        continue;
                    }
                    let (x0, y0, x1, y1) = self.cell(p);
                    root.draw(&Rectangle::new(
                        [(x0 as i32, y0 as i32), (x1 as i32 - 1, y1 as i32 - 1)],
                        ShapeStyle::from(&RGBColor(0, 255, 255)).stroke_width(1),
                    ))
                    .map_err(plot_err)?;
                }
                if self.colorbar {
                    let x0 = w as i32 + 4;
                    for y in 0..h as i32 {
                        let t = 1.0 - y as f32 / (h as f32 - 1.0).max(1.0);
                        let c = plasma(t);
                        root.draw(&Rectangle::new(
                            [(x0, y), (x0 + 9, y)],
                            RGBColor(c[0], c[1], c[2]).filled(),
                        ))
                        .map_err(plot_err)?;
                    }
                    let font = ("sans-serif", 11).into_font().color(&BLACK);
                    root.draw(&Text::new(
                        format!("{:.2}", self.upper),
                        (x0 + 12, 0),
                        font.clone(),
                    ))
                    .map_err(plot_err)?;
                    root.draw(&Text::new("0", (x0 + 12, h as i32 - 12), font))
                        .map_err(plot_err)?;
                }
                if let Some(cap) = &self.caption {
                    let font = ("sans-serif", 12).into_font().color(&BLACK);
                    root.draw(&Text::new(cap.clone(), (3, h as i32 + 3), font))
                        .map_err(plot_err)?;
                }
                root.present().map_err(plot_err)?;
            }
            canvas = RgbImage::from_raw(tw, th, buf)
                .ok_or_else(|| Error::render("drawing", "canvas size"))?;
        }
        Ok(canvas)
    }

    /// PNG bytes of [`Heatmap::render`].
    pub fn to_png(&self) -> Result<Vec<u8>> {
        png(&self.render()?)
    }

    /// Write a PNG.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        write_out(path, self.to_png())
    }

    /// Jupyter (evcxr) display: the PNG inline.
    pub fn evcxr_display(&self) {
        show_png(self.to_png());
    }
}

impl fmt::Debug for Heatmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lit = self.values.iter().filter(|&&v| v > 0.0).count();
        write!(
            f,
            "Heatmap({}×{} patches, {lit} lit, upper {:.3}, {}×{} px)",
            self.grid.0,
            self.grid.1,
            self.upper,
            self.view.width(),
            self.view.height()
        )
    }
}

/// A latent's top images with their heatmaps, in a captioned grid. Renders as PNG.
#[derive(Clone)]
pub struct ExemplarGrid {
    /// The latent.
    pub latent: usize,
    title: String,
    tiles: Vec<Heatmap>,
    cols: usize,
}

impl ExemplarGrid {
    /// A grid of `tiles` (each captioned already), `cols` per row, with a title line.
    pub fn new(latent: usize, title: impl Into<String>, tiles: Vec<Heatmap>, cols: usize) -> Self {
        Self {
            latent,
            title: title.into(),
            tiles,
            cols: cols.max(1),
        }
    }
    /// The tiles.
    pub fn tiles(&self) -> &[Heatmap] {
        &self.tiles
    }

    /// The grid picture.
    pub fn render(&self) -> Result<RgbImage> {
        ensure_font();
        let rendered: Vec<RgbImage> = self
            .tiles
            .iter()
            .map(Heatmap::render)
            .collect::<Result<_>>()?;
        let (tw, th) = rendered
            .iter()
            .fold((1, 1), |(w, h), t| (w.max(t.width()), h.max(t.height())));
        let pad = 4u32;
        let title_h = 22u32;
        let cols = self.cols.min(rendered.len().max(1)) as u32;
        let rows = (rendered.len() as u32).div_ceil(cols).max(1);
        let (w, h) = (cols * (tw + pad) + pad, title_h + rows * (th + pad) + pad);
        let mut canvas = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
        for (i, t) in rendered.iter().enumerate() {
            let (r, c) = (i as u32 / cols, i as u32 % cols);
            image::imageops::replace(
                &mut canvas,
                t,
                i64::from(pad + c * (tw + pad)),
                i64::from(title_h + pad + r * (th + pad)),
            );
        }
        let mut buf = canvas.as_raw().clone();
        {
            let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            let font = ("sans-serif", 15).into_font().color(&BLACK);
            root.draw(&Text::new(self.title.clone(), (pad as i32, 3), font))
                .map_err(plot_err)?;
            root.present().map_err(plot_err)?;
        }
        RgbImage::from_raw(w, h, buf).ok_or_else(|| Error::render("drawing", "canvas size"))
    }

    /// PNG bytes.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        png(&self.render()?)
    }

    /// Write a PNG.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        write_out(path, self.to_png())
    }

    /// Jupyter (evcxr) display: the PNG inline.
    pub fn evcxr_display(&self) {
        show_png(self.to_png());
    }
}

impl fmt::Debug for ExemplarGrid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ExemplarGrid(latent {}, {} images: {})",
            self.latent,
            self.tiles.len(),
            self.title
        )
    }
}

pub(crate) fn png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)
        .map_err(|e| Error::Image {
            path: "<png>".into(),
            msg: e.to_string(),
        })?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plasma_endpoints_and_middle() {
        assert_eq!(plasma(0.0), [13, 8, 135]);
        assert_eq!(plasma(1.0), [240, 249, 33]);
        assert_eq!(plasma(0.5), [204, 71, 120]);
        assert_eq!(plasma(7.0), [240, 249, 33]);
        assert_eq!(plasma(f32::NAN), [13, 8, 135]);
    }

    #[test]
    fn heatmap_pixels_follow_the_blend_formula() {
        // A grey 4×4-patch view of 8×8 px; patch 5 at the max, patch 10 at half, rest 0.
        let view = RgbImage::from_pixel(8, 8, Rgb([100, 100, 100]));
        let mut v = vec![0.0; 16];
        v[5] = 2.0;
        v[10] = 1.0;
        let hm = Heatmap::new(view, v, (4, 4)).unwrap().with_upper(2.0);
        assert_eq!(hm.active_patches(), vec![5, 10]);
        let img = hm.overlay();
        // Patch 5 = row 1, col 1 → pixels (2..4, 2..4): 0.1·100 + 0.9·plasma(1).
        let want5 = [
            (0.1f32 * 100.0 + 0.9 * 240.0).round() as u8,
            (0.1f32 * 100.0 + 0.9 * 249.0).round() as u8,
            (0.1f32 * 100.0 + 0.9 * 33.0).round() as u8,
        ];
        assert_eq!(img.get_pixel(2, 2).0, want5);
        assert_eq!(img.get_pixel(3, 3).0, want5);
        // Patch 10 = row 2, col 2 → (4..6, 4..6): alpha 0.45, plasma(0.5) = (204, 71, 120).
        let want10 = [204.0f32, 71.0, 120.0].map(|c| (0.55 * 100.0 + 0.45 * c).round() as u8);
        assert_eq!(img.get_pixel(5, 4).0, want10);
        // Unlit patches are untouched.
        assert_eq!(img.get_pixel(0, 0).0, [100, 100, 100]);
        assert_eq!(img.get_pixel(7, 7).0, [100, 100, 100]);
        // The full render keeps the overlay and adds the bar and caption.
        let full = hm
            .with_colorbar(true)
            .with_caption("latent 3: 2.00")
            .render()
            .unwrap();
        assert_eq!((full.width(), full.height()), (8 + 46, 8 + 18));
        assert_eq!(full.get_pixel(2, 2).0, want5);
        // Some caption pixels are dark (the text was drawn with the embedded font).
        let dark = (0..full.width())
            .flat_map(|x| (8..full.height()).map(move |y| (x, y)))
            .filter(|&(x, y)| full.get_pixel(x, y).0[0] < 128)
            .count();
        assert!(dark > 5, "caption not drawn ({dark} dark pixels)");
    }

    #[test]
    fn heatmap_rejects_a_wrong_number_of_values() {
        let view = RgbImage::new(8, 8);
        assert!(matches!(
            Heatmap::new(view, vec![0.0; 15], (4, 4)),
            Err(Error::Shape { .. })
        ));
    }
}
