//! ADE20K scene parsing (`ADEChallengeData2016`, the MIT Scene Parsing Benchmark layout):
//! `images/<split>/<name>.jpg` paired with `annotations/<split>/<name>.png` (one class index per
//! pixel: 0 = other, 1..=150 the benchmark's classes), the class names in `objectInfo150.csv`
//! (the sceneparsing repository's `Idx,Ratio,Train,Val,Stuff,Name`) or `objectInfo150.txt` (the
//! release's tab-separated `Idx Ratio Train Val Name`), first synonym kept (`building;edifice` →
//! `building`).
//!
//! A root holding both `training` and `validation` must be opened with a split
//! ([`Dataset::ade20k`](super::Dataset::ade20k), `--split`): mixing them would put validation
//! images into a training store.

use std::path::{Path, PathBuf};

use super::folder::walk;
use super::{dataset_err, Source};
use crate::error::{IoContext, Result};

/// The splits under `root/images`, sorted.
fn splits(root: &Path) -> Result<Vec<String>> {
    let img_root = root.join("images");
    let mut out: Vec<String> = std::fs::read_dir(&img_root)
        .with_path(&img_root)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    out.sort();
    Ok(out)
}

pub(super) fn open_ade20k(root: &Path, split: Option<&str>) -> Result<(Vec<String>, Source)> {
    let (img_root, ann_root) = (root.join("images"), root.join("annotations"));
    let have = splits(root)?;
    let img_dir: PathBuf = match split {
        Some(s) => {
            if !have.iter().any(|h| h == s) {
                return Err(dataset_err(
                    &img_root.join(s),
                    format!("no split `{s}` here; the splits are {have:?}"),
                ));
            }
            img_root.join(s)
        }
        None if have.len() > 1 => {
            return Err(dataset_err(
                root,
                format!(
                    "holds the splits {have:?}; choose one (`--split {}`, Dataset::ade20k) rather than mixing them",
                    have[0]
                ),
            ))
        }
        None => img_root.clone(),
    };
    let mut images = Vec::new();
    walk(&img_dir, &mut images)?;
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
        class_names(root)?,
        Source::Files {
            paths: images,
            labels: None,
            masks: Some(masks),
        },
    ))
}

/// `["other", wall, building, …]` indexed by mask value, from `objectInfo150.csv` / `.txt`;
/// empty when neither is there.
fn class_names(root: &Path) -> Result<Vec<String>> {
    for (file, sep) in [("objectInfo150.csv", ','), ("objectInfo150.txt", '\t')] {
        let path = root.join(file);
        if !path.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&path).with_path(&path)?;
        let mut names = vec!["other".to_string()];
        for (i, line) in text.lines().enumerate().skip(1) {
            if line.trim().is_empty() {
                continue;
            }
            let cols: Vec<&str> = line.split(sep).map(str::trim).collect();
            let bad = |why: String| dataset_err(&path, format!("line {}: {why}", i + 1));
            let idx: usize = cols
                .first()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| bad(format!("`{}` does not start with a class index", line)))?;
            if idx != names.len() {
                return Err(bad(format!(
                    "class index {idx} where {} was expected (indices run 1, 2, … in order)",
                    names.len()
                )));
            }
            let name = cols
                .last()
                .map(|n| n.trim_matches('"').split(';').next().unwrap_or("").trim())
                .filter(|n| !n.is_empty())
                .ok_or_else(|| bad("no class name in the last column".into()))?;
            names.push(name.to_string());
        }
        return Ok(names);
    }
    Ok(Vec::new())
}
