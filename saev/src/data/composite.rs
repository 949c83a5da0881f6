//! A patch-labelled segmentation set built from Fashion-MNIST with no download: items pasted on
//! a black canvas, the mask holding `class + 1` where an item's pixel is lit (background 0),
//! written in the ADE20K layout (`images/training/*.png`, `annotations/training/*.png`) so the
//! store's segmentation reader records per-patch labels from it.
//!
//! ```no_run
//! let dir = saev::data::composite_fashion_mnist(
//!     "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz", "seg/", 500, 0)?;
//! # Ok::<(), saev::Error>(())
//! ```

use std::path::{Path, PathBuf};

use image::{imageops, GrayImage, Luma, Rgb, RgbImage};

use super::Dataset;
use crate::error::{Error, IoContext, Result};
use crate::util::rng::splitmix64;

/// Class names of the composite masks: background, then Fashion-MNIST's ten.
pub fn composite_classes(ds: &Dataset) -> Vec<String> {
    std::iter::once("background".to_string())
        .chain(ds.class_names().iter().cloned())
        .collect()
}

const CANVAS: u32 = 224;
/// Pixels at or above this intensity belong to the item.
const LIT: u8 = 40;

/// Write `n_images` composites of 2–3 items (side 84 or 112 px, non-overlapping grid cells)
/// from the IDX file at `idx_path` into `out`; returns `out`. `out` records its settings
/// (`composite.json`): a rerun with the same ones reuses it, other settings or a directory of
/// other files are refused (nothing is overwritten).
pub fn composite_fashion_mnist(
    idx_path: impl AsRef<Path>,
    out: impl AsRef<Path>,
    n_images: usize,
    seed: u64,
) -> Result<PathBuf> {
    let (idx_path, out) = (idx_path.as_ref(), out.as_ref());
    let ds = Dataset::open(idx_path, None, false)?;
    if !ds.has_labels() || ds.is_empty() {
        return Err(Error::Dataset {
            path: idx_path.to_path_buf(),
            msg: "composites need a labelled IDX dataset (images + labels)".into(),
        });
    }
    let record = serde_json::json!({
        "version": 1,
        "idx": crate::util::paths::path_to_text(&std::path::absolute(idx_path).with_path(idx_path)?),
        "n_images": n_images,
        "seed": seed,
    });
    let rp = out.join("composite.json");
    if std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        let found: Option<serde_json::Value> = std::fs::read(&rp)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        return match found {
            Some(v) if v == record => Ok(out.to_path_buf()),
            Some(v) => Err(Error::output_dir(
                out,
                format!("holds composites made with other settings ({v})"),
                "choose another --out, or remove it to make these",
            )),
            None => Err(Error::output_dir(
                out,
                "exists and holds files `saev composite` did not write (or an unfinished run)",
                "choose a new or empty output directory",
            )),
        };
    }
    let (img_dir, ann_dir) = (
        out.join("images/training"),
        out.join("annotations/training"),
    );
    for d in [&img_dir, &ann_dir] {
        std::fs::create_dir_all(d).with_path(d)?;
    }
    let mut s = seed;
    let mut rnd = |m: u64| {
        s = s.wrapping_add(1);
        splitmix64(s) % m.max(1)
    };
    let bar = crate::util::progress::bar(n_images as u64, "composites");
    for i in 0..n_images {
        let mut canvas = GrayImage::new(CANVAS, CANVAS);
        let mut mask = GrayImage::new(CANVAS, CANVAS);
        // A 2×2 layout of 112-px cells; 2 or 3 of them get an item.
        let mut cells = [0u32, 1, 2, 3];
        for k in (1..4).rev() {
            cells.swap(k, rnd(k as u64 + 1) as usize);
        }
        let n_items = 2 + rnd(2) as usize;
        for &cell in &cells[..n_items] {
            let e = rnd(ds.len() as u64) as usize;
            let ex = ds.get(e)?;
            let label = ex.label.unwrap_or(0);
            let side = if rnd(2) == 0 { 84 } else { 112 };
            let item = imageops::resize(
                &ex.image.to_luma8(),
                side,
                side,
                imageops::FilterType::Triangle,
            );
            let (cx, cy) = ((cell % 2) * 112, (cell / 2) * 112);
            let (ox, oy) = (
                cx + rnd(u64::from(112 - side + 1)) as u32,
                cy + rnd(u64::from(112 - side + 1)) as u32,
            );
            for (x, y, p) in item.enumerate_pixels() {
                if p.0[0] >= LIT {
                    canvas.put_pixel(ox + x, oy + y, *p);
                    mask.put_pixel(ox + x, oy + y, Luma([label as u8 + 1]));
                }
            }
        }
        let rgb = RgbImage::from_fn(CANVAS, CANVAS, |x, y| {
            let v = canvas.get_pixel(x, y).0[0];
            Rgb([v, v, v])
        });
        let ip = img_dir.join(format!("{i:05}.png"));
        rgb.save(&ip).map_err(|e| Error::Image {
            path: ip.clone(),
            msg: e.to_string(),
        })?;
        let ap = ann_dir.join(format!("{i:05}.png"));
        mask.save(&ap).map_err(|e| Error::Image {
            path: ap.clone(),
            msg: e.to_string(),
        })?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let classes = composite_classes(&ds);
    let cp = out.join("classes.json");
    std::fs::write(&cp, serde_json::to_string(&classes).unwrap_or_default()).with_path(&cp)?;
    // Written last: its presence means the set is complete.
    crate::util::files::write_atomic(&rp, record.to_string().as_bytes())?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_label_exactly_the_lit_item_pixels() {
        // The Fashion-MNIST subset the repository ships (the quickstart set).
        let idx = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("assets/quickstart/fashion-mnist-3000-images-idx3-ubyte.gz");
        let idx = idx.as_path();
        assert!(idx.exists(), "{} is part of the repository", idx.display());
        let out = std::env::temp_dir().join(format!("saev-composite-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        composite_fashion_mnist(idx, &out, 3, 7).unwrap();
        for i in 0..3 {
            let img = image::open(out.join(format!("images/training/{i:05}.png")))
                .unwrap()
                .to_luma8();
            let mask = image::open(out.join(format!("annotations/training/{i:05}.png")))
                .unwrap()
                .to_luma8();
            let mut fg = 0;
            for (p, m) in img.pixels().zip(mask.pixels()) {
                // Lit pixels carry a class 1..=10; dark pixels are background 0.
                assert_eq!(p.0[0] >= LIT, m.0[0] > 0);
                assert!(m.0[0] <= 10);
                fg += usize::from(m.0[0] > 0);
            }
            assert!(fg > 500, "image {i}: {fg} item pixels");
        }
        let classes: Vec<String> =
            serde_json::from_str(&std::fs::read_to_string(out.join("classes.json")).unwrap())
                .unwrap();
        assert_eq!(
            (classes.len(), classes[0].as_str(), classes[2].as_str()),
            (11, "background", "Trouser")
        );
        // A rerun with the same settings reuses the set (nothing rewritten); other settings,
        // or a directory of other files, are refused and left as they were.
        let first = out.join("images/training/00000.png");
        let (bytes, mtime) = (
            std::fs::read(&first).unwrap(),
            std::fs::metadata(&first).unwrap().modified().unwrap(),
        );
        composite_fashion_mnist(idx, &out, 3, 7).unwrap();
        let e = composite_fashion_mnist(idx, &out, 3, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("other settings"), "{e}");
        assert_eq!(std::fs::read(&first).unwrap(), bytes);
        assert_eq!(
            std::fs::metadata(&first).unwrap().modified().unwrap(),
            mtime
        );
        let foreign = out.join("images");
        let e = composite_fashion_mnist(idx, &foreign, 3, 7)
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not write"), "{e}");
        std::fs::remove_dir_all(&out).ok();
    }
}
