//! A checked safetensors source for candle's `VarBuilder`.
//!
//! candle's own mmaped backend reports a missing key or a wrong shape as a string. This backend
//! validates the file when it is opened (a truncated or foreign file is an
//! [`Error::Safetensors`] naming it) and records the first missing tensor or wrong shape as a
//! typed [`Error`] with the file and the key, which the loader returns instead of candle's text.
//!
//! ```no_run
//! # use saev::__private::weights::CheckedWeights;
//! let w = CheckedWeights::open("model/model.safetensors")?;
//! let vb = w.var_builder(&candle_core::Device::Cpu);
//! # Ok::<(), saev::Error>(())
//! ```

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
    st: MmapedSafetensors,
    first_error: Mutex<Option<Error>>,
}

impl CheckedWeights {
    /// Memory-map and validate `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).with_path(&path)?;
        // SAFETY: the file is opened read-only; like every mmap user we rely on nobody truncating
        // it while it is mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_path(&path)?;
        // Validate the header and that every tensor's bytes are inside the file.
        safetensors::SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        drop(mmap);
        // SAFETY: as above.
        let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                st,
                first_error: Mutex::new(None),
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Names of all tensors in the file.
    pub fn keys(&self) -> Vec<String> {
        self.inner
            .st
            .tensors()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
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
        if self.inner.st.get(name).is_err() {
            return Err(self.record(Error::MissingTensor {
                path: self.inner.path.clone(),
                key: name.to_string(),
            }));
        }
        self.inner.st.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.st.get(name).is_ok()
    }
}
