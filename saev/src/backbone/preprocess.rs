//! Image → model input, matching the Hugging Face (Pillow-backend) image processors pixel for
//! pixel: `BitImageProcessor` for DINOv2, `CLIPImageProcessor`, `SiglipImageProcessor`.
//!
//! Steps: convert to RGB (grey is replicated, alpha dropped — Pillow's `convert("RGB")`),
//! resize with Pillow's 8-bit resampler (see `resample`), centre-crop with HF's
//! `(h - crop) // 2` offsets, scale by 1/255 and normalise per channel.
//!
//! A model directory's `preprocessor_config.json` (what `AutoImageProcessor` reads) sets the
//! recipe when present ([`Preprocess::from_hf_config`]): SigLIP-384, CLIP-336 or DINOv2 at 518
//! need no flags.
//!
//! ```no_run
//! use saev::{backbone::Family, Preprocess};
//! let pre = Preprocess::for_family(Family::Dinov2).with_size(448); // 448 crop from a 512 resize
//! let img = saev::load_image("photo.jpg")?;
//! let chw = pre.apply(&img);          // Vec<f32>, [3, 448, 448]
//! # Ok::<(), saev::Error>(())
//! ```

use std::path::Path;

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde::{Deserialize, Serialize};

use super::config::Family;
use super::resample::{pil_resize_rgb8_window, Kernel};
use crate::error::{CandleContext, Error, Result};

/// ImageNet mean (DINOv2).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet std (DINOv2).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// OpenAI CLIP mean.
#[allow(clippy::excessive_precision)] // the published constants, verbatim
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP std.
#[allow(clippy::excessive_precision)] // the published constants, verbatim
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// How the image is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// Shortest side to this many pixels, aspect kept (HF `{"shortest_edge": n}`).
    ShortestEdge(usize),
    /// Exactly `height × width`, aspect not kept (HF `{"height": h, "width": w}`).
    Exact {
        /// Output height in pixels.
        height: usize,
        /// Output width in pixels.
        width: usize,
    },
}

/// The resampling filter (Pillow's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// `PIL.Image.BICUBIC`.
    Bicubic,
    /// `PIL.Image.BILINEAR`.
    Bilinear,
}

/// A preprocessing recipe. Presets: [`Preprocess::dinov2`], [`Preprocess::clip`],
/// [`Preprocess::siglip`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Resize step. Default per family.
    pub resize: Resize,
    /// Centre crop `(height, width)` after resizing, if any.
    pub crop: Option<(usize, usize)>,
    /// Resampling filter.
    pub filter: Filter,
    /// Per-channel mean subtracted after scaling to `[0, 1]`.
    pub mean: [f32; 3],
    /// Per-channel std divided by.
    pub std: [f32; 3],
}

impl Preprocess {
    /// DINOv2 (`BitImageProcessor`): shortest side 256 bicubic, centre crop 224, ImageNet stats.
    pub fn dinov2() -> Self {
        Self {
            resize: Resize::ShortestEdge(256),
            crop: Some((224, 224)),
            filter: Filter::Bicubic,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// CLIP (`CLIPImageProcessor`): shortest side 224 bicubic, centre crop 224, CLIP stats.
    pub fn clip() -> Self {
        Self {
            resize: Resize::ShortestEdge(224),
            crop: Some((224, 224)),
            filter: Filter::Bicubic,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// SigLIP (`SiglipImageProcessor`): 224×224 bilinear, mean = std = 0.5.
    pub fn siglip() -> Self {
        Self {
            resize: Resize::Exact {
                height: 224,
                width: 224,
            },
            crop: None,
            filter: Filter::Bilinear,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }

    /// The preset of a family.
    pub fn for_family(family: Family) -> Self {
        match family {
            Family::Dinov2 | Family::Dinov3 => Self::dinov2(),
            Family::Clip => Self::clip(),
            Family::Siglip => Self::siglip(),
        }
    }

    /// The recipe of a Hugging Face `preprocessor_config.json` (`CLIPImageProcessor`,
    /// `BitImageProcessor`, `SiglipImageProcessor`, `ViTImageProcessor` and their `Fast`
    /// twins): `size` (`shortest_edge`, `height`/`width`, or a bare number read as the class
    /// reads it), `do_center_crop` + `crop_size`, `resample` (2 bilinear, 3 bicubic),
    /// `do_rescale` with `rescale_factor` 1/255, `do_normalize` + `image_mean`/`image_std`.
    /// Anything saev cannot reproduce exactly is an error naming the field, never a guess.
    pub fn from_hf_config(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let v: serde_json::Value = crate::util::files::read_json(path)?;
        Self::from_hf_json(&v, path)
    }

    /// [`Preprocess::from_hf_config`] on a parsed value; `path` names it in errors.
    pub fn from_hf_json(v: &serde_json::Value, path: &Path) -> Result<Self> {
        use serde_json::Value;
        let err = |field: &str, msg: String| Error::Config {
            path: path.to_path_buf(),
            field: field.into(),
            msg,
        };
        // Older repos (e.g. openai/clip-vit-large-patch14-336) name a feature extractor.
        let class = v
            .get("image_processor_type")
            .or_else(|| v.get("feature_extractor_type"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim_end_matches("Fast")
            .replace("FeatureExtractor", "ImageProcessor");
        // A bare number: CLIP and BiT read it as the shortest edge, SigLIP and ViT as a square.
        let square_default = match class.as_str() {
            "CLIPImageProcessor" | "BitImageProcessor" => false,
            "SiglipImageProcessor" | "ViTImageProcessor" | "DINOv3ViTImageProcessor" => true,
            other => {
                return Err(err(
                    "image_processor_type",
                    format!(
                        "{other:?} is not supported (CLIP, BiT, SigLIP or ViT image processors)"
                    ),
                ))
            }
        };
        let flag = |name: &str, default: bool| -> Result<bool> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(err(name, format!("{other} is not a boolean"))),
            }
        };
        let side = |field: &str, x: &Value| -> Result<usize> {
            x.as_u64()
                .filter(|&n| (1..=8192).contains(&n))
                .map(|n| n as usize)
                .ok_or_else(|| err(field, format!("{x} is not a side in 1..=8192 pixels")))
        };
        let hw = |field: &str, x: &Value, square: bool| -> Result<Resize> {
            if x.is_u64() {
                let n = side(field, x)?;
                return Ok(if square {
                    Resize::Exact {
                        height: n,
                        width: n,
                    }
                } else {
                    Resize::ShortestEdge(n)
                });
            }
            match (x.get("shortest_edge"), x.get("height"), x.get("width")) {
                (Some(s), None, None) => Ok(Resize::ShortestEdge(side(field, s)?)),
                (None, Some(h), Some(w)) => Ok(Resize::Exact {
                    height: side(field, h)?,
                    width: side(field, w)?,
                }),
                _ => Err(err(
                    field,
                    format!(
                        "{x}: expected {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}}"
                    ),
                )),
            }
        };
        if !flag("do_resize", true)? {
            return Err(err(
                "do_resize",
                "false: inputs of any size are not supported (the patch grid must be fixed)".into(),
            ));
        }
        let resize = hw(
            "size",
            v.get("size").ok_or_else(|| err("size", "missing".into()))?,
            square_default,
        )?;
        let crop_default = !square_default;
        let crop = if flag("do_center_crop", crop_default)? {
            match hw(
                "crop_size",
                v.get("crop_size")
                    .ok_or_else(|| err("crop_size", "missing (do_center_crop is on)".into()))?,
                true,
            )? {
                Resize::Exact { height, width } => Some((height, width)),
                Resize::ShortestEdge(_) => {
                    return Err(err("crop_size", "shortest_edge is not a crop size".into()))
                }
            }
        } else {
            None
        };
        if crop.is_none() && matches!(resize, Resize::ShortestEdge(_)) {
            // Without a crop, a shortest-edge resize gives every aspect ratio its own size, and
            // the patch grid must be fixed.
            return Err(err(
                "do_center_crop",
                "false with a shortest_edge size: the model input would take each image's aspect ratio (the patch grid must be fixed); set a crop_size or an exact size".into(),
            ));
        }
        let filter = match v.get("resample").and_then(Value::as_u64) {
            Some(2) => Filter::Bilinear,
            Some(3) => Filter::Bicubic,
            // The classes' defaults: bicubic, but bilinear for ViTImageProcessor.
            None if v.get("resample").is_none() => {
                if class == "ViTImageProcessor" || class == "DINOv3ViTImageProcessor" {
                    Filter::Bilinear
                } else {
                    Filter::Bicubic
                }
            }
            _ => {
                return Err(err(
                    "resample",
                    format!(
                        "{}: only 2 (bilinear) and 3 (bicubic) are supported",
                        v["resample"]
                    ),
                ))
            }
        };
        let rescale = v
            .get("rescale_factor")
            .and_then(Value::as_f64)
            .unwrap_or(1.0 / 255.0);
        if !flag("do_rescale", true)? || (rescale - 1.0 / 255.0).abs() > 1e-12 {
            return Err(err(
                "rescale_factor",
                format!(
                    "{rescale} (do_rescale {:?}): only 1/255 is supported",
                    v.get("do_rescale")
                ),
            ));
        }
        let triple = |name: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => match x.as_array().map(Vec::as_slice) {
                    Some([a, b, c]) if a.is_number() && b.is_number() && c.is_number() => {
                        let f = |y: &Value| y.as_f64().unwrap_or(f64::NAN) as f32;
                        Ok([f(a), f(b), f(c)])
                    }
                    _ => Err(err(name, format!("{x} is not three numbers"))),
                },
            }
        };
        let (mean, std) = if flag("do_normalize", true)? {
            (
                triple("image_mean", IMAGENET_MEAN)?,
                triple("image_std", IMAGENET_STD)?,
            )
        } else {
            ([0.0; 3], [1.0; 3])
        };
        if std.iter().any(|&s| !s.is_finite() || s <= 0.0) || mean.iter().any(|m| !m.is_finite()) {
            return Err(err(
                "image_std",
                format!("mean {mean:?} / std {std:?}: std must be positive, both finite"),
            ));
        }
        Ok(Self {
            resize,
            crop,
            filter,
            mean,
            std,
        })
    }

    /// Set the model input side to `side` pixels, keeping the recipe's resize/crop ratio
    /// (DINOv2: resize `side·256/224`, crop `side`).
    pub fn with_size(mut self, side: usize) -> Self {
        match (&mut self.resize, self.crop) {
            (Resize::ShortestEdge(s), Some((ch, _))) => {
                *s = (side as f64 * *s as f64 / ch as f64).round() as usize;
                self.crop = Some((side, side));
            }
            (Resize::ShortestEdge(s), None) => *s = side,
            (Resize::Exact { height, width }, _) => {
                *height = side;
                *width = side;
                if self.crop.is_some() {
                    self.crop = Some((side, side));
                }
            }
        }
        self
    }

    /// Set the resize step.
    pub fn with_resize(mut self, resize: Resize) -> Self {
        self.resize = resize;
        self
    }

    /// Set (or remove) the centre crop.
    pub fn with_crop(mut self, crop: Option<(usize, usize)>) -> Self {
        self.crop = crop;
        self
    }

    /// The `(height, width)` of the model input for an image of `(width, height)`.
    pub fn output_size(&self, (w, h): (usize, usize)) -> (usize, usize) {
        let (rw, rh) = self.resized_size((w, h));
        self.crop.unwrap_or((rh, rw))
    }

    fn resized_size(&self, (w, h): (usize, usize)) -> (usize, usize) {
        match self.resize {
            Resize::ShortestEdge(s) => {
                // HF get_resize_output_image_size(default_to_square=False): long = int(s·long/short).
                if w <= h {
                    (s, (s as f64 * h as f64 / w as f64) as usize)
                } else {
                    ((s as f64 * w as f64 / h as f64) as usize, s)
                }
            }
            Resize::Exact { height, width } => (width, height),
        }
    }

    /// Resize and crop to the RGB8 image the model sees (for drawing heatmaps on).
    pub fn model_view(&self, img: &DynamicImage) -> image::RgbImage {
        let rgb = img.to_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let (rw, rh) = self.resized_size((w, h));
        let kernel = match self.filter {
            Filter::Bicubic => Kernel::AntialiasBicubic,
            Filter::Bilinear => Kernel::AntialiasBilinear,
        };
        let (ch, cw) = self.crop.unwrap_or((rh, rw));
        // HF center_crop: top = (h - crop_h) // 2 (Python floor division); pads if the crop is
        // larger than the image. Only the part of the resized image the crop keeps is made.
        let top = (rh as i64 - ch as i64).div_euclid(2);
        let left = (rw as i64 - cw as i64).div_euclid(2);
        let span = |start: i64, len: usize, n: usize| {
            let a = start.clamp(0, n as i64) as usize;
            let b = (start + len as i64).clamp(0, n as i64) as usize;
            a..b.max(a)
        };
        let (xs, ys) = (span(left, cw, rw), span(top, ch, rh));
        let win = if (rw, rh) == (w, h) {
            let raw = rgb.as_raw();
            ys.clone()
                .flat_map(|y| {
                    raw[(y * w + xs.start) * 3..(y * w + xs.end) * 3]
                        .iter()
                        .copied()
                })
                .collect()
        } else {
            pil_resize_rgb8_window(
                rgb.as_raw(),
                (w, h),
                (rw, rh),
                kernel,
                xs.clone(),
                ys.clone(),
            )
        };
        let nx = xs.len();
        let mut out = image::RgbImage::new(cw as u32, ch as u32);
        for (r, sy) in ys.enumerate() {
            let y = (sy as i64 - top) as u32;
            for (c, sx) in xs.clone().enumerate() {
                let i = (r * nx + c) * 3;
                out.put_pixel(
                    (sx as i64 - left) as u32,
                    y,
                    image::Rgb([win[i], win[i + 1], win[i + 2]]),
                );
            }
        }
        out
    }

    /// Resize and crop a class mask to the model view with nearest-neighbour sampling (Pillow
    /// `NEAREST`: source index `floor((x + 0.5) · in / out)`), the same geometry as the image.
    pub fn mask_view(&self, mask: &image::GrayImage) -> image::GrayImage {
        let (w, h) = (mask.width() as usize, mask.height() as usize);
        let (rw, rh) = self.resized_size((w, h));
        let (ch, cw) = self.crop.unwrap_or((rh, rw));
        let top = (rh as i64 - ch as i64).div_euclid(2);
        let left = (rw as i64 - cw as i64).div_euclid(2);
        let src = |o: i64, n_in: usize, n_out: usize| -> Option<u32> {
            if o < 0 || o >= n_out as i64 {
                return None;
            }
            let s = ((o as f64 + 0.5) * n_in as f64 / n_out as f64).floor() as usize;
            Some(s.min(n_in - 1) as u32)
        };
        image::GrayImage::from_fn(cw as u32, ch as u32, |x, y| {
            match (src(left + x as i64, w, rw), src(top + y as i64, h, rh)) {
                (Some(sx), Some(sy)) => *mask.get_pixel(sx, sy),
                _ => image::Luma([0]),
            }
        })
    }

    /// Preprocess one image to a normalised `[3, H, W]` float vector (channel-major).
    pub fn apply(&self, img: &DynamicImage) -> Vec<f32> {
        let view = self.model_view(img);
        let (w, h) = (view.width() as usize, view.height() as usize);
        let mut out = vec![0f32; 3 * h * w];
        for (i, px) in view.pixels().enumerate() {
            for c in 0..3 {
                let v = f32::from(px.0[c]) * (1.0 / 255.0);
                out[c * h * w + i] = (v - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    /// Preprocess a batch into one tensor.
    ///
    /// # Shapes
    /// Returns `[B, 3, H, W]`; every image must come out at the same size (true whenever the
    /// recipe crops or resizes exactly).
    pub fn batch(&self, images: &[DynamicImage], device: &Device) -> Result<Tensor> {
        let mut data = Vec::new();
        let mut size = None;
        for (i, img) in images.iter().enumerate() {
            let (h, w) = self.output_size((img.width() as usize, img.height() as usize));
            match size {
                None => size = Some((h, w)),
                Some(s) if s != (h, w) => {
                    return Err(Error::Shape {
                        what: format!("preprocessed image {i} of the batch (no crop configured)"),
                        expected: vec![3, s.0, s.1],
                        actual: vec![3, h, w],
                    })
                }
                _ => {}
            }
            data.extend(self.apply(img));
        }
        let (h, w) = size.ok_or_else(|| Error::out_of_range("images in a batch:", 0, "≥ 1"))?;
        Tensor::from_vec(data, (images.len(), 3, h, w), device).context("pixel batch")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dinov2_sizes() {
        let p = Preprocess::dinov2();
        assert_eq!(p.resized_size((512, 512)), (256, 256));
        assert_eq!(p.resized_size((640, 480)), (341, 256));
        assert_eq!(p.output_size((640, 480)), (224, 224));
        let p = p.with_size(448);
        assert_eq!(p.resize, Resize::ShortestEdge(512));
        assert_eq!(p.crop, Some((448, 448)));
    }

    /// A shortest-edge resize without a crop has no fixed input size: refused at load, by
    /// field (recording used to fail at the first non-square image with an unnamed error).
    #[test]
    fn shortest_edge_without_a_crop_is_refused() {
        let v = serde_json::json!({
            "image_processor_type": "BitImageProcessor",
            "size": {"shortest_edge": 224},
            "do_center_crop": false,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5]
        });
        let e = Preprocess::from_hf_json(&v, Path::new("preprocessor_config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("preprocessor_config.json") && e.contains("do_center_crop"),
            "{e}"
        );
    }

    /// A 20,000 × 2 strip resizes to 2.56M × 256 before the crop: only the crop is made now
    /// (the whole intermediate was 2 GB). Its pixels are the crop of the strip's middle.
    #[test]
    fn an_extreme_aspect_ratio_makes_only_the_crop() {
        let strip = image::RgbImage::from_fn(20_000, 2, |x, _| {
            image::Rgb([(x % 256) as u8, 7, if x < 10_000 { 0 } else { 255 }])
        });
        let view = Preprocess::dinov2().model_view(&DynamicImage::ImageRgb8(strip));
        assert_eq!((view.width(), view.height()), (224, 224));
        // The crop's middle column lies at the strip's middle: blue switches there.
        let blue: Vec<u8> = (0..224).map(|x| view.get_pixel(x, 100).0[2]).collect();
        assert!(blue[0] < 20 && blue[223] > 235, "{blue:?}");
        assert!(view.pixels().all(|p| p.0[1] == 7));
    }

    #[test]
    fn constant_image_normalises_to_closed_form() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            300,
            260,
            image::Rgb([255, 0, 128]),
        ));
        let p = Preprocess::dinov2();
        let chw = p.apply(&img);
        assert_eq!(chw.len(), 3 * 224 * 224);
        let want = [
            (1.0 - 0.485) / 0.229,
            (0.0 - 0.456) / 0.224,
            (128.0 / 255.0 - 0.406) / 0.225,
        ];
        for c in 0..3 {
            assert!((chw[c * 224 * 224 + 1000] - want[c]).abs() < 1e-5);
        }
    }

    #[test]
    fn grey_becomes_rgb() {
        let img =
            DynamicImage::ImageLuma8(image::GrayImage::from_pixel(28, 28, image::Luma([200])));
        let chw = Preprocess::siglip().apply(&img);
        let v = (200.0 / 255.0 - 0.5) / 0.5;
        assert!(chw.iter().all(|&x| (x - v).abs() < 1e-5));
    }
}
