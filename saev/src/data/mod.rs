//! Image datasets: a [`Dataset`] is an indexed list of images with optional class labels and
//! optional segmentation masks, read from the layouts vision researchers use:
//!
//! - a folder of images (recursive, sorted paths);
//! - a labelled folder, one sub-folder per class (ImageNet / torchvision `ImageFolder`);
//! - IDX files (MNIST, Fashion-MNIST; `.gz` or not), labels from the sibling `labels-idx1` file;
//! - segmentation pairs in the ADE20K layout (`images/…/x.jpg` + `annotations/…/x.png`).
//!
//! Grey images become RGB when preprocessed; an unreadable file is an error naming it, or is
//! dropped up front when the dataset is opened with `skip_bad` (header check).
//!
//! ```no_run
//! use saev::{Dataset, data::DatasetKind};
//! let ds = Dataset::open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz", None, false)?;
//! let ex = ds.get(0)?;                       // image, label Some(9), source "…#0"
//! # Ok::<(), saev::Error>(())
//! ```

pub(crate) mod composite;

pub use composite::{composite_classes, composite_fashion_mnist};
pub(crate) mod idx;
pub(crate) mod parquet;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{DynamicImage, GrayImage};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// The dataset layouts saev reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// A folder of images, searched recursively.
    ImageFolder,
    /// One sub-folder per class.
    LabelledFolder,
    /// MNIST-style IDX image file (+ sibling labels file).
    Idx,
    /// ADE20K-style `images/` + `annotations/` pairs.
    Ade20k,
    /// Hugging Face parquet files (image struct/bytes column, optional `label`).
    Parquet,
}

impl std::str::FromStr for DatasetKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        crate::util::parse_name(
            s,
            &[
                "image-folder",
                "labelled-folder",
                "idx",
                "ade20k",
                "parquet",
            ],
        )
    }
}

/// One example: the decoded image and what is known about it.
#[derive(Debug, Clone)]
pub struct Example {
    /// Index in the dataset.
    pub index: usize,
    /// The image as decoded (grey stays grey until preprocessing).
    pub image: DynamicImage,
    /// Class label, if the dataset has labels.
    pub label: Option<u32>,
    /// Per-pixel class mask (segmentation datasets).
    pub mask: Option<GrayImage>,
}

#[derive(Debug)]
enum Source {
    Files {
        paths: Vec<PathBuf>,
        labels: Option<Vec<u32>>,
        masks: Option<Vec<PathBuf>>,
    },
    Idx {
        side: (usize, usize),
        pixels: Vec<u8>,
        labels: Option<Vec<u8>>,
    },
    Parquet(Arc<parquet::ParquetSource>),
}

/// An indexed image dataset. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Dataset {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: usize,
    kind: DatasetKind,
    root: PathBuf,
    classes: Vec<String>,
    source: Source,
}

const IMAGE_EXTS: [&str; 9] = [
    "jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "jfif",
];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    walk_once(dir, out, &mut std::collections::HashSet::new())
}

/// Depth-first, sorted; a directory reached twice (a symlink loop, or two links to one
/// directory) is read once.
fn walk_once(
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

fn dataset_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Header-only check that a file is a decodable image format with sane dimensions.
fn header_ok(p: &Path) -> bool {
    image::ImageReader::open(p)
        .and_then(|r| r.with_guessed_format())
        .ok()
        .and_then(|r| r.into_dimensions().ok())
        .is_some_and(|(w, h)| w > 0 && h > 0)
}

impl Dataset {
    /// Open `path`, detecting the layout unless `kind` is given. With `skip_bad`, files whose
    /// header does not decode are dropped (and reported on stderr) instead of failing later.
    pub fn open(path: impl AsRef<Path>, kind: Option<DatasetKind>, skip_bad: bool) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(dataset_err(path, "does not exist"));
        }
        // Absolute, so the provenance recorded in stores finds the files from any directory.
        let abs = std::path::absolute(path).with_path(path)?;
        let path = abs.as_path();
        let kind = match kind {
            Some(k) => k,
            None => detect(path)?,
        };
        let (classes, source) = match kind {
            DatasetKind::Idx => open_idx(path)?,
            DatasetKind::ImageFolder => {
                let mut paths = Vec::new();
                walk(path, &mut paths)?;
                (
                    Vec::new(),
                    Source::Files {
                        paths,
                        labels: None,
                        masks: None,
                    },
                )
            }
            DatasetKind::LabelledFolder => open_labelled(path)?,
            DatasetKind::Ade20k => open_ade20k(path)?,
            DatasetKind::Parquet => {
                let src = parquet::ParquetSource::open(path)?;
                let classes = src
                    .labels
                    .as_ref()
                    .map(|l| {
                        (0..=l.iter().copied().max().unwrap_or(0))
                            .map(|c| c.to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                (classes, Source::Parquet(Arc::new(src)))
            }
        };
        let source = if skip_bad { drop_bad(source) } else { source };
        let n = match &source {
            Source::Files { paths, .. } => paths.len(),
            Source::Idx {
                labels,
                pixels,
                side,
            } => labels
                .as_ref()
                .map_or(pixels.len() / (side.0 * side.1), Vec::len),
            Source::Parquet(p) => p.len(),
        };
        if n == 0 {
            return Err(dataset_err(
                path,
                format!("no images found (read as {kind:?})"),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                limit: usize::MAX,
                kind,
                root: path.to_path_buf(),
                classes,
                source,
            }),
        })
    }

    /// The layout.
    pub fn kind(&self) -> DatasetKind {
        self.inner.kind
    }

    /// The path it was opened from.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The first `n` examples only (all if `n` is larger).
    pub fn take(&self, n: usize) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(Inner {
                limit: n,
                kind: inner.kind,
                root: inner.root.clone(),
                classes: inner.classes.clone(),
                source: match &inner.source {
                    Source::Files {
                        paths,
                        labels,
                        masks,
                    } => Source::Files {
                        paths: paths.iter().take(n).cloned().collect(),
                        labels: labels.as_ref().map(|l| l.iter().take(n).copied().collect()),
                        masks: masks.as_ref().map(|m| m.iter().take(n).cloned().collect()),
                    },
                    Source::Idx {
                        side,
                        pixels,
                        labels,
                    } => Source::Idx {
                        side: *side,
                        pixels: pixels[..pixels.len().min(n * side.0 * side.1)].to_vec(),
                        labels: labels.as_ref().map(|l| l.iter().take(n).copied().collect()),
                    },
                    Source::Parquet(p) => Source::Parquet(p.clone()),
                },
            }),
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        let n = match &self.inner.source {
            Source::Files { paths, .. } => paths.len(),
            Source::Idx { side, pixels, .. } => pixels.len() / (side.0 * side.1),
            Source::Parquet(p) => p.len(),
        };
        n.min(self.inner.limit)
    }

    /// Whether the dataset is empty (never true for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Class names, index = label (empty when unlabelled; Fashion-MNIST gets its names).
    pub fn class_names(&self) -> &[String] {
        &self.inner.classes
    }

    /// Whether examples carry class labels.
    pub fn has_labels(&self) -> bool {
        match &self.inner.source {
            Source::Files { labels, .. } => labels.is_some(),
            Source::Idx { labels, .. } => labels.is_some(),
            Source::Parquet(p) => p.labels.is_some(),
        }
    }

    /// Whether examples carry segmentation masks.
    pub fn has_masks(&self) -> bool {
        matches!(&self.inner.source, Source::Files { masks: Some(_), .. })
    }

    /// The label of example `i`, without decoding it.
    pub fn label(&self, i: usize) -> Option<u32> {
        match &self.inner.source {
            Source::Files { labels, .. } => labels.as_ref().and_then(|l| l.get(i).copied()),
            Source::Idx { labels, .. } => labels
                .as_ref()
                .and_then(|l| l.get(i).map(|&v| u32::from(v))),
            Source::Parquet(p) => p.labels.as_ref().and_then(|l| l.get(i).copied()),
        }
    }

    /// Where example `i` comes from: its file path, or `file#index` for IDX.
    pub fn source(&self, i: usize) -> String {
        match &self.inner.source {
            Source::Files { paths, .. } => paths
                .get(i)
                .map(|p| crate::util::paths::path_to_text(p))
                .unwrap_or_default(),
            Source::Idx { .. } => {
                format!("{}#{i}", crate::util::paths::path_to_text(&self.inner.root))
            }
            Source::Parquet(p) => p.source(i),
        }
    }

    /// Decode example `i`.
    pub fn get(&self, i: usize) -> Result<Example> {
        if i >= self.len() {
            return Err(Error::out_of_range(
                "example",
                i,
                format!("0..{}, the dataset's examples", self.len()),
            ));
        }
        let label = self.label(i);
        match &self.inner.source {
            Source::Files { paths, masks, .. } => {
                let image = crate::util::image_io::load_image(&paths[i])?;
                let mask = match masks {
                    Some(m) => Some(crate::util::image_io::load_image(&m[i])?.to_luma8()),
                    None => None,
                };
                Ok(Example {
                    index: i,
                    image,
                    label,
                    mask,
                })
            }
            Source::Idx {
                side: (h, w),
                pixels,
                ..
            } => {
                let n = h * w;
                let img =
                    GrayImage::from_raw(*w as u32, *h as u32, pixels[i * n..(i + 1) * n].to_vec())
                        .ok_or_else(|| dataset_err(&self.inner.root, "IDX image buffer size"))?;
                Ok(Example {
                    index: i,
                    image: DynamicImage::ImageLuma8(img),
                    label,
                    mask: None,
                })
            }
            Source::Parquet(p) => {
                let image =
                    crate::util::image_io::decode_image(&p.image_bytes(i)?).map_err(|e| {
                        Error::Image {
                            path: p.source(i).into(),
                            msg: e.to_string(),
                        }
                    })?;
                Ok(Example {
                    index: i,
                    image,
                    label,
                    mask: None,
                })
            }
        }
    }

    /// A one-line description (stored as the store metadata's `data` field).
    pub fn describe(&self) -> String {
        format!(
            "{}:{} ({} examples{}{}{})",
            serde_json::to_value(self.kind())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            self.inner.root.display(),
            self.len(),
            if self.has_labels() { ", labelled" } else { "" },
            if self.has_masks() {
                ", segmentation masks"
            } else {
                ""
            },
            if self.inner.limit < usize::MAX {
                format!(", first {}", self.inner.limit)
            } else {
                String::new()
            },
        )
    }
}

fn detect(path: &Path) -> Result<DatasetKind> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if path.is_file() {
        if name.contains("idx3-ubyte") {
            return Ok(DatasetKind::Idx);
        }
        if name.ends_with(".parquet") {
            return Ok(DatasetKind::Parquet);
        }
        return Err(dataset_err(
            path,
            "a single file that is not an IDX image file; pass a folder",
        ));
    }
    if path.join("images").is_dir() && path.join("annotations").is_dir() {
        return Ok(DatasetKind::Ade20k);
    }
    let has_parquet = std::fs::read_dir(path)
        .with_path(path)?
        .filter_map(|e| e.ok())
        .any(|e| e.path().extension().is_some_and(|x| x == "parquet"));
    if has_parquet {
        return Ok(DatasetKind::Parquet);
    }
    let mut has_root_images = false;
    let mut n_dirs = 0;
    for e in std::fs::read_dir(path).with_path(path)? {
        let p = e.with_path(path)?.path();
        if p.is_dir() {
            n_dirs += 1;
        } else if is_image(&p) {
            has_root_images = true;
        }
    }
    Ok(if n_dirs > 0 && !has_root_images {
        DatasetKind::LabelledFolder
    } else {
        DatasetKind::ImageFolder
    })
}

/// Fashion-MNIST class names (the Debian package's data is Fashion-MNIST when the path says so).
const FASHION_MNIST: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

fn open_idx(path: &Path) -> Result<(Vec<String>, Source)> {
    let (dims, pixels) = idx::read_idx_u8(path)?;
    if dims.len() != 3 || dims.contains(&0) {
        return Err(dataset_err(
            path,
            format!("IDX images must be [n, rows, cols], none zero; got dims {dims:?}"),
        ));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let label_path = path.with_file_name(name.replace("images-idx3", "labels-idx1"));
    let labels = if label_path != path && label_path.exists() {
        let (ldims, labels) = idx::read_idx_u8(&label_path)?;
        if ldims != [dims[0]] {
            return Err(dataset_err(
                &label_path,
                format!("labels of dims {ldims:?} for {} images", dims[0]),
            ));
        }
        Some(labels)
    } else {
        None
    };
    let fashion = path
        .to_string_lossy()
        .to_ascii_lowercase()
        .contains("fashion");
    let classes = match (&labels, fashion) {
        (Some(_), true) => FASHION_MNIST.iter().map(|s| s.to_string()).collect(),
        (Some(l), false) => (0..=l.iter().copied().max().unwrap_or(0))
            .map(|c| c.to_string())
            .collect(),
        (None, _) => Vec::new(),
    };
    Ok((
        classes,
        Source::Idx {
            side: (dims[1], dims[2]),
            pixels,
            labels,
        },
    ))
}

fn open_labelled(root: &Path) -> Result<(Vec<String>, Source)> {
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

fn open_ade20k(root: &Path) -> Result<(Vec<String>, Source)> {
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

fn drop_bad(source: Source) -> Source {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("saev-ds-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn png(path: &Path, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(8, 6, image::Rgb([v, v, v]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn labelled_folder_is_detected_and_sorted() {
        let d = tmp("lab");
        png(&d.join("dog/b.png"), 1);
        png(&d.join("cat/z.png"), 2);
        png(&d.join("cat/a.png"), 3);
        let ds = Dataset::open(&d, None, false).unwrap();
        assert_eq!(ds.kind(), DatasetKind::LabelledFolder);
        assert_eq!(ds.class_names(), ["cat", "dog"]);
        assert_eq!(ds.len(), 3);
        assert!(ds.source(0).ends_with("cat/a.png"));
        assert_eq!((ds.label(0), ds.label(2)), (Some(0), Some(1)));
    }

    #[test]
    fn bad_image_fails_or_is_skipped() {
        let d = tmp("bad");
        png(&d.join("a.png"), 1);
        std::fs::write(d.join("b.jpg"), b"not a jpeg").unwrap();
        let ds = Dataset::open(&d, None, false).unwrap();
        assert_eq!(ds.kind(), DatasetKind::ImageFolder);
        let err = ds.get(1).unwrap_err().to_string();
        assert!(err.contains("b.jpg"), "{err}");
        let ds = Dataset::open(&d, None, true).unwrap();
        assert_eq!(ds.len(), 1);
    }

    #[test]
    fn hf_parquet_made_by_pyarrow() {
        // scripts/make_data_fixtures.py: 5 PNGs over two files, int labels i % 2, image 3 grey.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data/hf-parquet");
        let ds = Dataset::open(&root, None, false).unwrap();
        assert_eq!(ds.kind(), DatasetKind::Parquet);
        assert_eq!(ds.len(), 5);
        assert_eq!(
            (0..5).map(|i| ds.label(i).unwrap()).collect::<Vec<_>>(),
            vec![0, 1, 0, 1, 0]
        );
        assert!(ds.source(4).ends_with("train-00001-of-00002.parquet#1"));
        // Pixel sums printed by the script (Pillow decode, converted to RGB).
        for (i, want) in [(0usize, 384_544u64), (3, 976_623), (4, 977_507)] {
            let img = ds.get(i).unwrap().image.to_rgb8();
            assert_eq!((img.width(), img.height()), (48, 40));
            assert_eq!(
                img.as_raw().iter().map(|&v| u64::from(v)).sum::<u64>(),
                want,
                "image {i}"
            );
        }
        assert_eq!(ds.take(2).len(), 2);
    }

    #[test]
    fn ade20k_pairs() {
        let d = tmp("ade");
        png(&d.join("images/training/x1.png"), 1);
        png(&d.join("annotations/training/x1.png"), 4);
        let ds = Dataset::open(&d, None, false).unwrap();
        assert_eq!(ds.kind(), DatasetKind::Ade20k);
        let ex = ds.get(0).unwrap();
        assert_eq!(ex.mask.unwrap().get_pixel(0, 0).0[0], 4);
        std::fs::remove_file(d.join("annotations/training/x1.png")).unwrap();
        let err = Dataset::open(&d, None, false).unwrap_err().to_string();
        assert!(err.contains("missing annotation"), "{err}");
    }
}
