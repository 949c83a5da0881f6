//! Helpers at the bottom of the dependency order: every other module may use them, they use
//! none of the others (only `error`).

pub(crate) mod cache;
pub(crate) mod checkpoint;
pub(crate) mod display;
pub(crate) mod files;
pub(crate) mod image_io;
pub(crate) mod paths;
pub(crate) mod progress;
pub(crate) mod rng;
pub(crate) mod torch_load;
