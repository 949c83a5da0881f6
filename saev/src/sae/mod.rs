//! Sparse autoencoders: the [`Sae`](model::Sae) handle with its checkpoint format, and reading
//! the Python saev's `sae.pt` checkpoints ([`py_import`], read by `util::torch_load`). The
//! trainer builds on these (#4).

pub(crate) mod device_step;
pub(crate) mod eval;
pub(crate) mod linalg;
pub(crate) mod model;
pub(crate) mod paper_step;
pub(crate) mod py_import;
pub(crate) mod row_select;
pub(crate) mod screen;
pub(crate) mod step;
pub(crate) mod train_checkpoint;
pub(crate) mod train_config;
pub(crate) mod train_history;
pub(crate) mod trainer;

pub use eval::{Evaluation, ALMOST_DEAD_FREQ, DENSE_FREQ};
pub use model::{Sae, SaeActivation, SaeConfig, SaeNorm, SAE_SCHEMA};
pub use py_import::{import_python_sae, resolve_sae};
pub use step::{Kernels, TrainActivation};
pub use trainer::{
    fresh_run_dir, train_saes, train_saes_on, train_saes_with, Compute, Init, LrSchedule, Setting,
    TrainConfig, TrainRun,
};
