//! ADE20K-style segmentation sets: `images/<split>/<name>.jpg` paired with
//! `annotations/<split>/<name>.png` (class index per pixel).

use std::path::Path;

use super::folder::walk;
use super::{dataset_err, Source};
use crate::error::Result;

pub(super) fn open_ade20k(root: &Path) -> Result<(Vec<String>, Source)> {
    let (img_root, ann_root) = (root.join("images"), root.join("annotations"));
    let mut images = Vec::new();
    walk(&img_root, &mut images)?;
    let mut masks = Vec::with_capacity(images.len());
    for img in &images {
        // images/<split>/<name>.jpg ↔ annotations/<split>/<name>.png
        let rel = img
            .strip_prefix(&img_root)
            .map_err(|_| dataset_err(img, "outside images/"))?;
        let mask = ann_root.join(rel).with_extension("png");
        if !mask.exists() {
            return Err(dataset_err(
                &mask,
                format!("missing annotation for {}", img.display()),
            ));
        }
        masks.push(mask);
    }
    Ok((
        Vec::new(),
        Source::Files {
            paths: images,
            labels: None,
            masks: Some(masks),
        },
    ))
}
