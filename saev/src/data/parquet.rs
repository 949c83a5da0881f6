//! Hugging Face parquet image datasets, read with polars: one file or a folder of
//! `*.parquet` shards (sorted), an image column — the `datasets` Image feature
//! `struct<bytes: binary, path: string>`, or plain binary — and an optional integer label column
//! (`label` or `labels`).
//!
//! Opening reads only the label column; images are read one file at a time when first needed
//! (the two most recent files stay cached), so memory stays bounded by a file's image bytes.
//!
//! ```text
//! let src = ParquetSource::open(Path::new("cifar10/plain_text/"))?;
//! let png: Vec<u8> = src.image_bytes(17)?;
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use polars::prelude::*;

use crate::error::{Error, IoContext, Result};

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

type Images = Arc<Vec<Option<Vec<u8>>>>;

/// An opened parquet dataset.
#[derive(Debug)]
pub(crate) struct ParquetSource {
    files: Vec<PathBuf>,
    /// (file, row) of each example.
    index: Vec<(u32, u32)>,
    pub(crate) labels: Option<Vec<u32>>,
    image_col: String,
    cache: Mutex<Vec<(usize, Images)>>,
}

fn read(path: &Path, columns: Option<Vec<String>>) -> Result<DataFrame> {
    let f = std::fs::File::open(path).with_path(path)?;
    ParquetReader::new(f)
        .with_columns(columns)
        .finish()
        .map_err(|e| bad(path, format!("parquet: {e}")))
}

fn image_column(schema: &Schema, path: &Path) -> Result<String> {
    for (name, dt) in schema.iter() {
        let ok = match dt {
            DataType::Binary => true,
            DataType::Struct(fields) => fields.iter().any(|f| f.name().as_str() == "bytes"),
            _ => false,
        };
        if ok {
            return Ok(name.to_string());
        }
    }
    Err(bad(
        path,
        "no image column (binary, or a struct with a `bytes` field)",
    ))
}

/// Labels are class indices; past this many classes a column holds ids, not classes.
const MAX_CLASSES: u32 = 1 << 20;

impl ParquetSource {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = if path.is_dir() {
            std::fs::read_dir(path)
                .with_path(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .collect()
        } else {
            vec![path.to_path_buf()]
        };
        files.sort();
        if files.is_empty() {
            return Err(bad(path, "no .parquet files"));
        }
        let f = std::fs::File::open(&files[0]).with_path(&files[0])?;
        let schema = ParquetReader::new(f)
            .schema()
            .map_err(|e| bad(&files[0], format!("parquet: {e}")))?;
        let schema = Schema::from_arrow_schema(&schema);
        let image_col = image_column(&schema, &files[0])?;
        let label_col = ["label", "labels"]
            .into_iter()
            .find(|c| schema.get(c).is_some_and(|dt| dt.is_integer()))
            .map(str::to_string);
        let mut index = Vec::new();
        let mut labels = label_col.as_ref().map(|_| Vec::new());
        for (fi, file) in files.iter().enumerate() {
            let cols = vec![label_col.clone().unwrap_or_else(|| image_col.clone())];
            let df = read(file, Some(cols))?;
            index.extend((0..df.height() as u32).map(|r| (fi as u32, r)));
            if let (Some(out), Some(col)) = (labels.as_mut(), &label_col) {
                let s = df
                    .column(col)
                    .and_then(|c| c.cast(&DataType::Int64))
                    .map_err(|e| bad(file, format!("label column `{col}`: {e}")))?;
                let ca = s.i64().map_err(|e| bad(file, e.to_string()))?;
                for v in (0..ca.len()).map(|k| ca.get(k)) {
                    let v = v.ok_or_else(|| bad(file, format!("null in label column `{col}`")))?;
                    out.push((v, fi));
                }
            }
        }
        // Hugging Face writes -1 for every row of an unlabelled split (a test set): no labels.
        // Any other negative label, or a mix, is an error; so is a label too large to be a
        // class index (the class list has one entry per index up to the largest).
        let labels = match labels {
            Some(l) if !l.is_empty() && l.iter().all(|&(v, _)| v == -1) => None,
            Some(l) => Some(
                l.into_iter()
                    .map(|(v, fi)| match u32::try_from(v) {
                        Ok(c) if c < MAX_CLASSES => Ok(c),
                        Ok(_) => Err(bad(
                            &files[fi],
                            format!("label {v} is not a class index below {MAX_CLASSES}"),
                        )),
                        Err(_) => Err(bad(
                            &files[fi],
                            format!(
                                "label {v} is negative (only an all -1 column, an unlabelled split, is accepted)"
                            ),
                        )),
                    })
                    .collect::<Result<Vec<u32>>>()?,
            ),
            None => None,
        };
        Ok(Self {
            files,
            index,
            labels,
            image_col,
            cache: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn source(&self, i: usize) -> String {
        // Past the end: no source, as for the other layouts.
        let Some(&(f, r)) = self.index.get(i) else {
            return String::new();
        };
        format!(
            "{}#{r}",
            crate::util::paths::path_to_text(&self.files[f as usize])
        )
    }

    fn file_images(&self, fi: usize) -> Result<Images> {
        if let Ok(cache) = self.cache.lock() {
            if let Some((_, imgs)) = cache.iter().find(|(f, _)| *f == fi) {
                return Ok(imgs.clone());
            }
        }
        let path = &self.files[fi];
        let df = read(path, Some(vec![self.image_col.clone()]))?;
        let col = df
            .column(&self.image_col)
            .map_err(|e| bad(path, e.to_string()))?
            .as_materialized_series()
            .clone();
        let bin = match col.dtype() {
            DataType::Struct(_) => col
                .struct_()
                .and_then(|s| s.field_by_name("bytes"))
                .map_err(|e| bad(path, e.to_string()))?,
            _ => col,
        };
        let ca = bin
            .binary()
            .map_err(|e| bad(path, format!("image bytes: {e}")))?;
        let imgs: Images = Arc::new(
            (0..ca.len())
                .map(|k| ca.get(k).map(<[u8]>::to_vec))
                .collect(),
        );
        if let Ok(mut cache) = self.cache.lock() {
            cache.push((fi, imgs.clone()));
            if cache.len() > 2 {
                cache.remove(0);
            }
        }
        Ok(imgs)
    }

    /// The encoded image of example `i`.
    pub(crate) fn image_bytes(&self, i: usize) -> Result<Vec<u8>> {
        let (f, r) = self.index[i];
        let imgs = self.file_images(f as usize)?;
        imgs.get(r as usize)
            .cloned()
            .flatten()
            .ok_or_else(|| bad(&self.files[f as usize], format!("row {r}: no image bytes")))
    }
}
