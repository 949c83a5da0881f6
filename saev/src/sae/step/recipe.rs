//! A training recipe: the non-linearity, the kernels, and everything about one SAE's objective
//! and update except the learning rate and λ (which vary per step).

use serde::{Deserialize, Serialize};

/// The sparsifying non-linearity being trained.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TrainActivation {
    /// ReLU with an L1 penalty λ.
    Relu,
    /// Per-row top `k`.
    TopK {
        /// Latents kept per row.
        k: usize,
    },
    /// Batch top `k · n`; the inference threshold is an EMA of the smallest kept value.
    BatchTopK {
        /// Mean latents kept per row.
        k: usize,
    },
    /// JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"): `f = pre · H(pre − θ)` with a
    /// learned threshold θ per latent, trained against an L0 penalty `λ · ‖f‖₀ / d_model` (the
    /// paper's λ, whose MSE is summed over the d_model dimensions where saev's is averaged).
    /// H has no gradient; θ learns through the paper's straight-through estimator, a rectangle
    /// kernel of width `bandwidth` around it.
    JumpRelu {
        /// Width ε of the straight-through rectangle. Default 0.1 (see [`TrainActivation::jump_relu`]).
        #[serde(default = "default_bandwidth")]
        bandwidth: f32,
        /// θ of every latent at the start, when `init_density` is None. Default 0.1.
        #[serde(default = "default_init_threshold")]
        init_threshold: f32,
        /// Start each latent's θ where it fires on this fraction of the first batch (its
        /// `(1 − density)` quantile). Default 0.01 (L0 ≈ 1% of d_sae at the start); None =
        /// `init_threshold` for every latent, as the paper.
        #[serde(default = "default_init_density")]
        init_density: Option<f32>,
    },
}

// The paper's 0.001 suits its activations' scale; saev's inputs have mean norm √d_model
// (values O(1) per dimension, pre-activations O(1)), where a window of 0.001 catches so few
// pre-activations that θ barely moves: on the planted-dictionary test θ stayed at its start and
// L0 at 58 of 64 latents; 0.1 for both recovers every atom at the data's L0.
fn default_bandwidth() -> f32 {
    0.1
}

fn default_init_threshold() -> f32 {
    0.1
}

fn default_init_density() -> Option<f32> {
    Some(0.01)
}

impl TrainActivation {
    /// JumpReLU with saev's defaults for its normalised inputs: bandwidth ε = 0.1, initial
    /// θ = 0.1 (the paper's 0.001 for both is for its activations' scale).
    pub fn jump_relu() -> Self {
        TrainActivation::JumpRelu {
            bandwidth: default_bandwidth(),
            init_threshold: default_init_threshold(),
            init_density: default_init_density(),
        }
    }
}

/// Which kernels compute the decoder side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernels {
    /// Sparse when the code's density is ≤ the recipe's `dense_above`.
    Auto,
    /// Always sparse.
    Sparse,
    /// Always dense GEMMs.
    Dense,
}

/// Everything about one SAE's objective and update except lr and λ (which vary per step).
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// Non-linearity.
    pub activation: TrainActivation,
    /// Matryoshka prefix ends (ascending, last = d_sae); empty = one group.
    pub groups: Vec<usize>,
    /// AuxK latents per row (0 = off).
    pub aux_k: usize,
    /// AuxK coefficient α.
    pub aux_coef: f64,
    /// A latent silent for this many patches is dead (AuxK, history).
    pub dead_window_patches: u64,
    /// Unit-norm decoder rows before each step and parallel-gradient removal.
    pub unit_norm_decoder: bool,
    /// Clip the global gradient norm to this (None = no clipping).
    pub max_grad_norm: Option<f64>,
    /// Kernel choice.
    pub kernels: Kernels,
    /// Density above which `Auto` uses dense GEMMs.
    pub dense_above: f64,
    /// ReLU's data-driven start: at the first step each latent's `b_enc` is lowered by its
    /// `(1 − p)` quantile of pre-activations on that batch, so it starts firing on a fraction
    /// `p` of the patches (None: the paper's zero bias, half of the latents firing at first).
    pub relu_init_density: Option<f32>,
}
