//! Image datasets: a [`Dataset`] is an indexed list of images with optional class labels and
//! optional segmentation masks, read from the layouts vision researchers use:
//!
//! - a folder of images (recursive, sorted paths);
//! - a labelled folder, one sub-folder per class (ImageNet / torchvision `ImageFolder`);
//! - IDX files (MNIST, Fashion-MNIST; `.gz` or not), labels from the sibling `labels-idx1` file;
//! - segmentation pairs in the ADE20K layout (`images/…/x.jpg` + `annotations/…/x.png`).
//!
//! Grey images become RGB when preprocessed; an unreadable file is an error naming it, or is
//! dropped up front when the dataset is opened with `skip_bad` (header check, and for JPEG and
//! PNG that the file is whole).
//!
//! ```no_run
//! use saev::{Dataset, data::DatasetKind};
//! let ds = Dataset::open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz", None, false)?;
//! let ex = ds.get(0)?;                       // image, label Some(9), source "…#0"
//! # Ok::<(), saev::Error>(())
//! ```

mod ade20k;
pub(crate) mod composite;
mod folder;

pub use composite::{composite_classes, composite_fashion_mnist};
pub(crate) mod idx;
pub(crate) mod parquet;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{DynamicImage, GrayImage};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use ade20k::open_ade20k;
use folder::{drop_bad, is_image, open_labelled, walk};
use idx::open_idx;

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
pub(super) enum Source {
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

pub(super) fn dataset_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
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
            DatasetKind::Ade20k => open_ade20k(path, None)?,
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
        Self::from_source(path, kind, classes, source, skip_bad)
    }

    /// One split (`training`, `validation`) of an ADE20K root (`ADEChallengeData2016`), with
    /// the class names of its `objectInfo150` table (`other` at 0).
    pub fn ade20k(root: impl AsRef<Path>, split: &str, skip_bad: bool) -> Result<Self> {
        let root = root.as_ref();
        if !root.exists() {
            return Err(dataset_err(root, "does not exist"));
        }
        let abs = std::path::absolute(root).with_path(root)?;
        let (classes, source) = open_ade20k(&abs, Some(split))?;
        Self::from_source(&abs, DatasetKind::Ade20k, classes, source, skip_bad)
    }

    fn from_source(
        path: &Path,
        kind: DatasetKind,
        classes: Vec<String>,
        source: Source,
        skip_bad: bool,
    ) -> Result<Self> {
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
                    Some(m) => Some(crate::util::image_io::load_mask(&m[i])?),
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

    /// The fixture's files with their label column replaced: all -1 (an unlabelled Hugging
    /// Face split) reads as unlabelled; a stray negative or an id-sized label is refused by file.
    #[test]
    fn parquet_labels_minus_one_ids_and_strays() {
        use polars::prelude::*;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data/hf-parquet");
        let rewrite = |name: &str, label: &dyn Fn(usize, usize) -> i64| -> PathBuf {
            let d = tmp(name);
            let mut files: Vec<_> = std::fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for (fi, f) in files.iter().enumerate() {
                let mut df = ParquetReader::new(std::fs::File::open(f).unwrap())
                    .finish()
                    .unwrap();
                let v: Vec<i64> = (0..df.height()).map(|r| label(fi, r)).collect();
                df.with_column(Column::new("label".into(), v)).unwrap();
                let mut out = std::fs::File::create(d.join(f.file_name().unwrap())).unwrap();
                ParquetWriter::new(&mut out).finish(&mut df).unwrap();
            }
            d
        };
        let ds = Dataset::open(rewrite("pq-unlabelled", &|_, _| -1), None, false).unwrap();
        assert_eq!(ds.len(), 5);
        assert!(!ds.has_labels());
        assert_eq!(ds.label(0), None);
        let e = Dataset::open(
            rewrite("pq-stray", &|fi, r| if fi == 1 && r == 1 { -1 } else { 0 }),
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("-1") && e.contains("train-00001-of-00002.parquet"),
            "{e}"
        );
        let e = Dataset::open(
            rewrite("pq-ids", &|_, r| 1_000_000_007 * r as i64),
            None,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("1000000007") && e.contains("class index"), "{e}");
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

    /// Both splits: refused unsplit, each split alone on request, class names from either
    /// objectInfo150 format (the release's tab-separated .txt, the repository's .csv).
    #[test]
    fn ade20k_splits_and_class_names() {
        let d = tmp("ade-splits");
        for (split, n) in [("training", 3), ("validation", 2)] {
            for i in 0..n {
                png(&d.join(format!("images/{split}/ADE_{split}_{i}.png")), 1);
                png(
                    &d.join(format!("annotations/{split}/ADE_{split}_{i}.png")),
                    2,
                );
            }
        }
        let err = Dataset::open(&d, None, false).unwrap_err().to_string();
        assert!(
            err.contains("[\"training\", \"validation\"]") && err.contains("--split"),
            "{err}"
        );
        std::fs::write(
            d.join("objectInfo150.txt"),
            "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n2\t0.1072\t6046\t612\tbuilding;edifice\n",
        )
        .unwrap();
        let tr = Dataset::ade20k(&d, "training", false).unwrap();
        let va = Dataset::ade20k(&d, "validation", false).unwrap();
        assert_eq!((tr.len(), va.len()), (3, 2));
        assert_eq!(tr.class_names(), ["other", "wall", "building"]);
        std::fs::remove_file(d.join("objectInfo150.txt")).unwrap();
        std::fs::write(
            d.join("objectInfo150.csv"),
            "Idx,Ratio,Train,Val,Stuff,Name\n1,0.1576,11664,1172,1,wall\n2,0.1072,6046,612,1,\"building;edifice\"\n",
        )
        .unwrap();
        let va = Dataset::ade20k(&d, "validation", false).unwrap();
        assert_eq!(va.class_names(), ["other", "wall", "building"]);
        let err = Dataset::ade20k(&d, "test", false).unwrap_err().to_string();
        assert!(err.contains("no split `test`"), "{err}");
        std::fs::write(d.join("objectInfo150.csv"), "Idx,Name\n2,wall\n").unwrap();
        let err = Dataset::ade20k(&d, "training", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("objectInfo150.csv") && err.contains("line 2"),
            "{err}"
        );
    }
}
