//! The one checkpoint layout of saev's artefacts: `<stem>.safetensors` (named tensors) beside
//! `<stem>.json` (a header that carries a format version), in one directory. SAEs (`sae`),
//! heads (`head`), feature passes (`features`) and trainer state (`state`) all save and load
//! through here, so every one is written atomically (tensors first, the header last — a header
//! means a complete checkpoint), rejects versions it does not know and names the file, tensor
//! and shape at fault.
//!
//! ```ignore
//! checkpoint::save(dir, "head", &tensors, &meta)?;
//! let (meta, t): (HeadMeta, _) = checkpoint::load(dir, "head", "version", &[1, 2])?;
//! let w = t.get("W", &[d, c])?;
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{CandleContext, Error, IoContext, Result};
use crate::util::files::{read_json, rename_durably, sync_file, tmp_path, write_json};

/// Write `<dir>/<stem>.safetensors` then `<dir>/<stem>.json`, each atomically.
pub(crate) fn save<H: serde::Serialize>(
    dir: &Path,
    stem: &str,
    tensors: &HashMap<String, Tensor>,
    header: &H,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_path(dir)?;
    let st = dir.join(format!("{stem}.safetensors"));
    let tmp = tmp_path(&st);
    candle_core::safetensors::save(tensors, &tmp).context(format!("writing {}", tmp.display()))?;
    sync_file(&tmp)?;
    rename_durably(&tmp, &st)?;
    write_json(&dir.join(format!("{stem}.json")), header)
}

/// Read `<dir>/<stem>.json` (its `version_field` must be one of `known`) and the tensors of
/// `<dir>/<stem>.safetensors`.
pub(crate) fn load<H: serde::de::DeserializeOwned>(
    dir: &Path,
    stem: &str,
    version_field: &str,
    known: &[u64],
) -> Result<(H, Tensors)> {
    let header = read_header(&dir.join(format!("{stem}.json")), version_field, known)?;
    Ok((
        header,
        Tensors::open(dir.join(format!("{stem}.safetensors")))?,
    ))
}

/// Parse a versioned JSON header, refusing versions not in `known` (the error names the file,
/// the version found and the ones this saev reads).
pub(crate) fn read_header<H: serde::de::DeserializeOwned>(
    path: &Path,
    version_field: &str,
    known: &[u64],
) -> Result<H> {
    let v: serde_json::Value = read_json(path)?;
    let version = v.get(version_field).and_then(serde_json::Value::as_u64);
    if !version.is_some_and(|x| known.contains(&x)) {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!(
                "{version_field} {} (this saev reads {})",
                version.map_or_else(|| "missing".into(), |x| x.to_string()),
                known
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    serde_json::from_value(v).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The tensors of one safetensors file, looked up by name with their file in every error.
pub(crate) struct Tensors {
    path: PathBuf,
    map: HashMap<String, Tensor>,
}

impl Tensors {
    /// Read every tensor of `path` onto the CPU.
    pub(crate) fn open(path: PathBuf) -> Result<Self> {
        let map = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
            Error::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            }
        })?;
        Ok(Self { path, map })
    }

    /// Tensors read by another reader (e.g. a torch checkpoint) from `path`.
    pub(crate) fn from_map(path: PathBuf, map: HashMap<String, Tensor>) -> Self {
        Self { path, map }
    }

    /// The file read.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor `name` (in any float dtype), which must have exactly `shape`, as f32.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let x = self.raw(name)?;
        if x.dims() != shape {
            return Err(self.shape_error(format!("tensor `{name}`"), x, shape.to_vec()));
        }
        Ok(x.to_dtype(DType::F32)?)
    }

    /// Tensor `name` of `dtype` with `len` elements (any shape), flattened.
    pub(crate) fn get_flat(&self, name: &str, dtype: DType, len: usize) -> Result<Tensor> {
        let x = self.raw(name)?;
        if x.elem_count() != len || x.dtype() != dtype {
            let what = format!("tensor `{name}` ({:?}, {dtype:?} expected)", x.dtype());
            return Err(self.shape_error(what, x, vec![len]));
        }
        Ok(x.flatten_all()?)
    }

    /// Tensor `name` as `len` f32 values.
    pub(crate) fn vec_f32(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let x = self.raw(name)?;
        if x.elem_count() != len {
            return Err(self.shape_error(format!("tensor `{name}`"), x, vec![len]));
        }
        Ok(x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
    }

    fn raw(&self, name: &str) -> Result<&Tensor> {
        self.map.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            key: name.into(),
        })
    }

    fn shape_error(&self, what: String, x: &Tensor, expected: Vec<usize>) -> Error {
        Error::Shape {
            what: format!("{}: {what}", self.path.display()),
            expected,
            actual: x.dims().to_vec(),
        }
    }
}
