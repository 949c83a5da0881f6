//! A checked weights source for candle's `VarBuilder`: one safetensors file, a sharded
//! checkpoint (`model.safetensors.index.json`), or tensors already in memory (a torch pickle read
//! without executing code, or another layout renamed to the HF keys).
//!
//! candle's own mmaped backend reports a missing key or a wrong shape as a string. This backend
//! validates the files when they are opened (a truncated or foreign file is an
//! [`Error::Safetensors`] naming it) and records the first missing tensor or wrong shape as a
//! typed [`Error`] with the file and the key, which the loader returns instead of candle's text.
//!
//! ```no_run
//! # use saev::__private::weights::CheckedWeights;
//! let w = CheckedWeights::open("model/model.safetensors")?;
//! let vb = w.var_builder(&candle_core::Device::Cpu);
//! # Ok::<(), saev::Error>(())
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, IoContext, Result};

/// A memory-mapped, validated safetensors file that records typed lookup errors.
#[derive(Clone)]
pub struct CheckedWeights {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    src: Src,
    first_error: Mutex<Option<Error>>,
}

enum Src {
    Mmap(MmapedSafetensors),
    Memory(HashMap<String, Tensor>),
}

/// Validate a safetensors file's header and that every tensor lies inside it.
fn validate(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).with_path(path)?;
    // SAFETY: the file is opened read-only; like every mmap user we rely on nobody truncating
    // it while it is mapped.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.with_path(path)?;
    safetensors::SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(())
}

impl CheckedWeights {
    /// Memory-map and validate `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        validate(&path)?;
        // SAFETY: as in `validate`.
        let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(Self::with_src(path, Src::Mmap(st)))
    }

    /// A sharded checkpoint: `index` is `model.safetensors.index.json`
    /// (`{"weight_map": {key: shard file}}`); every shard it names is validated and mapped.
    pub fn open_sharded(index: impl AsRef<Path>) -> Result<Self> {
        let index = index.as_ref().to_path_buf();
        let v: serde_json::Value = crate::util::files::read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Config {
                path: index.clone(),
                field: "weight_map".into(),
                msg: "missing or not an object".into(),
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = Vec::new();
        for (key, f) in map {
            let name = f
                .as_str()
                .filter(|n| !n.contains('/') && !n.contains(".."))
                .ok_or_else(|| Error::Config {
                    path: index.clone(),
                    field: format!("weight_map.{key}"),
                    msg: format!("{f} is not a file name beside the index"),
                })?;
            let p = dir.join(name);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        if files.is_empty() {
            return Err(Error::Config {
                path: index,
                field: "weight_map".into(),
                msg: "empty".into(),
            });
        }
        for f in &files {
            validate(f)?;
        }
        // SAFETY: as in `validate`.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::Safetensors {
            path: index.clone(),
            msg: e.to_string(),
        })?;
        // Every key of the index must be in its shard.
        for key in map.keys() {
            if st.get(key).is_err() {
                return Err(Error::MissingTensor {
                    path: index.clone(),
                    key: key.clone(),
                });
            }
        }
        Ok(Self::with_src(index, Src::Mmap(st)))
    }

    /// Tensors already in memory (keys as the model expects them); `path` names their source in
    /// errors.
    pub fn from_tensors(path: impl AsRef<Path>, tensors: HashMap<String, Tensor>) -> Self {
        Self::with_src(path.as_ref().to_path_buf(), Src::Memory(tensors))
    }

    fn with_src(path: PathBuf, src: Src) -> Self {
        Self {
            inner: Arc::new(Inner {
                path,
                src,
                first_error: Mutex::new(None),
            }),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Names of all tensors in the file.
    pub fn keys(&self) -> Vec<String> {
        match &self.inner.src {
            Src::Mmap(st) => st.tensors().into_iter().map(|(k, _)| k).collect(),
            Src::Memory(m) => m.keys().cloned().collect(),
        }
    }

    /// A `VarBuilder` over this file producing f32 tensors on `device`.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// The first typed error recorded by a lookup, if any (taken: later calls get `None`).
    pub fn take_error(&self) -> Option<Error> {
        self.inner
            .first_error
            .lock()
            .ok()
            .and_then(|mut e| e.take())
    }

    fn record(&self, err: Error) -> candle_core::Error {
        let msg = err.to_string();
        if let Ok(mut slot) = self.inner.first_error.lock() {
            slot.get_or_insert(err);
        }
        candle_core::Error::Msg(msg)
    }
}

impl SimpleBackend for CheckedWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        // NaN or infinite weights make every activation NaN: refused where they enter.
        let bad = t
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .position(|v| !v.is_finite());
        if let Some(i) = bad {
            return Err(self.record(Error::Checkpoint {
                path: self.inner.path.clone(),
                msg: format!("tensor `{name}` holds a non-finite value at flat index {i}"),
            }));
        }
        if t.shape() != &s {
            return Err(self.record(Error::Shape {
                what: format!("{}: tensor `{name}`", self.inner.path.display()),
                expected: s.dims().to_vec(),
                actual: t.dims().to_vec(),
            }));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if !self.contains_tensor(name) {
            return Err(self.record(Error::MissingTensor {
                path: self.inner.path.clone(),
                key: name.to_string(),
            }));
        }
        match &self.inner.src {
            Src::Mmap(st) => st.load(name, dev)?.to_dtype(dtype),
            Src::Memory(m) => m[name].to_device(dev)?.to_dtype(dtype),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.inner.src {
            Src::Mmap(st) => st.get(name).is_ok(),
            Src::Memory(m) => m.contains_key(name),
        }
    }
}
