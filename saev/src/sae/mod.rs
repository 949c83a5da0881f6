//! Sparse autoencoders: the [`Sae`](model::Sae) handle with its checkpoint format, and reading
//! the Python saev's `sae.pt` checkpoints ([`py_import`], read by `util::torch_load`). The
//! trainer builds on these (#4).

pub mod eval;
pub(crate) mod linalg;
pub mod model;
pub mod paper_step;
pub mod py_import;
pub mod step;
pub mod trainer;
