//! Image folders: a folder of images searched recursively (sorted; symlink loops read once),
//! or one sub-folder per class (the class names are the folder names); unreadable files
//! dropped on request (`--skip-bad`).

use std::path::{Path, PathBuf};

use super::Source;
use crate::error::{IoContext, Result};

pub(super) const IMAGE_EXTS: [&str; 9] = [
    "jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "jfif",
];

pub(super) fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

pub(super) fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    walk_once(dir, out, &mut std::collections::HashSet::new())
}

/// Depth-first, sorted; a directory reached twice (a symlink loop, or two links to one
/// directory) is read once.
pub(super) fn walk_once(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    seen: &mut std::collections::HashSet<PathBuf>,
) -> Result<()> {
    let real = std::fs::canonicalize(dir).with_path(dir)?;
    if !seen.insert(real) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_path(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_path(dir)?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk_once(&p, out, seen)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Header check that a file is a decodable image format with sane dimensions, and for a JPEG
/// or PNG that it is not cut short (its last bytes, as a rule).
pub(super) fn header_ok(p: &Path) -> bool {
    let Some(r) = image::ImageReader::open(p)
        .and_then(|r| r.with_guessed_format())
        .ok()
    else {
        return false;
    };
    let format = r.format();
    r.into_dimensions().is_ok_and(|(w, h)| w > 0 && h > 0)
        && match format {
            Some(image::ImageFormat::Jpeg) => crate::util::image_io::jpeg_file_complete(p),
            Some(image::ImageFormat::Png) => crate::util::image_io::png_file_complete(p),
            _ => true,
        }
}

pub(super) fn open_labelled(root: &Path) -> Result<(Vec<String>, Source)> {
    let mut class_dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .with_path(root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    class_dirs.sort();
    let mut classes = Vec::new();
    let mut paths = Vec::new();
    let mut labels = Vec::new();
    for (c, dir) in class_dirs.iter().enumerate() {
        classes.push(
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let mut files = Vec::new();
        walk(dir, &mut files)?;
        labels.extend(std::iter::repeat_n(c as u32, files.len()));
        paths.extend(files);
    }
    Ok((
        classes,
        Source::Files {
            paths,
            labels: Some(labels),
            masks: None,
        },
    ))
}

pub(super) fn drop_bad(source: Source) -> Source {
    match source {
        Source::Files {
            paths,
            labels,
            masks,
        } => {
            let keep: Vec<bool> = paths
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let ok = header_ok(p) && masks.as_ref().is_none_or(|m| header_ok(&m[i]));
                    if !ok {
                        eprintln!("skipping unreadable image {}", p.display());
                    }
                    ok
                })
                .collect();
            let filter = |v: Vec<PathBuf>| -> Vec<PathBuf> {
                v.into_iter()
                    .zip(&keep)
                    .filter(|(_, &k)| k)
                    .map(|(p, _)| p)
                    .collect()
            };
            Source::Files {
                labels: labels.map(|l| {
                    l.into_iter()
                        .zip(&keep)
                        .filter(|(_, &k)| k)
                        .map(|(v, _)| v)
                        .collect()
                }),
                masks: masks.map(filter),
                paths: filter(paths),
            }
        }
        other => other,
    }
}
