//! Sparse autoencoders. So far: reading the Python saev's `sae.pt` checkpoints
//! ([`torch_load`]); the `Sae` handle and trainer build on it (issue #4).

pub mod torch_load;
