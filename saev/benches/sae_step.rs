//! Benchmark: one SAE training step at d = 384, d_sae = 6144, batch 4096 (the paper's ViT-S
//! sizes), for the sparse-aware kernels against their dense form and against torch.
//!
//! `cargo bench -p saev --bench sae_step` prints patches/s (median of timed steps) for:
//! ReLU + L1 with L0 ≈ 1% of d_sae (b_enc shifted so, as in a trained SAE), sparse and dense
//! kernels; TopK k = 32 (plain and with AuxK on 1,024 dead latents); BatchTopK k = 32. Set
//! `SAEV_BENCH_TORCH_PYTHON=/path/to/python` (torch + saev 0.1.0) to time saev 0.1.0's ReLU
//! step and dense torch TopK, TopK + AuxK and BatchTopK steps on the same sizes in the same
//! run, and print the ratios.
//! `SAEV_BENCH_ONLY=<a case's name>` (or `<prefix>*`) times only that case (to profile one).
//! On AMX, TopK and ReLU select from an exact bf16 screen of the encoder (`sae::screen`);
//! `SAEV_SAE_SCREEN=off` times them on the f32 encoder GEMM instead (to compare).

use std::process::Command;
use std::time::Instant;

use saev::{
    __private::Recipe, __private::Scratch, __private::TrainState, sae::Kernels,
    sae::TrainActivation,
};

const D: usize = 384;
const S: usize = 6144;
const B: usize = 4096;
const ITERS: usize = 6;

fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Sum of 4 uniforms: roughly Gaussian, mean 0, variance 1/3.
            let mut v = 0f32;
            for k in 0..4 {
                v += ((s >> (16 * k)) & 0xffff) as f32 / 65535.0 - 0.5;
            }
            v * scale
        })
        .collect()
}

fn recipe(activation: TrainActivation, kernels: Kernels, aux_k: usize) -> Recipe {
    Recipe {
        activation,
        groups: vec![],
        aux_k,
        aux_coef: 1.0 / 32.0,
        dead_window_patches: 1,
        unit_norm_decoder: true,
        max_grad_norm: None,
        kernels,
        dense_above: 0.05,
        relu_init_density: None,
    }
}

fn state(r: Recipe, x: &[f32], target_l0: Option<f64>) -> TrainState {
    let bound = 1.0 / (D as f32).sqrt();
    let mut st = TrainState::new(
        rnd(S * D, 1, bound * 1.7),
        vec![0.0; S],
        rnd(S * D, 2, bound * 1.7),
        vec![0.0; D],
        r,
    )
    .expect("sizes are consistent");
    if let Some(l0) = target_l0 {
        // Shift b_enc so that about `l0` latents per row are positive on this batch.
        let mut pre: Vec<f32> = x[..256 * D]
            .chunks_exact(D)
            .flat_map(|row| {
                st.w_enc
                    .chunks_exact(D)
                    .map(|w| row.iter().zip(w).map(|(a, b)| a * b).sum::<f32>())
                    .collect::<Vec<_>>()
            })
            .collect();
        pre.sort_by(|a, b| b.total_cmp(a));
        let cut = pre[(l0 / S as f64 * pre.len() as f64) as usize];
        st.b_enc.iter_mut().for_each(|b| *b = -cut);
    }
    st
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(name: &str, st: impl FnOnce() -> TrainState, x: &[f32]) -> f64 {
    // `SAEV_BENCH_ONLY="topk k=32"`: only the case of that name ("topk*": every case whose
    // name starts so), for profiling one.
    let wanted = |o: &str| match o.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == o,
    };
    if std::env::var("SAEV_BENCH_ONLY").is_ok_and(|o| !wanted(&o)) {
        return f64::NAN;
    }
    let mut st = st();
    let mut scratch = Scratch::default();
    let mut ts = Vec::new();
    let mut l0 = 0.0;
    for i in 0..2 + ITERS {
        // Mark a quarter of the latents dead each step so AuxK (when on) always has work.
        for c in st.since_fired.iter_mut().step_by(6) {
            *c = u64::MAX / 2;
        }
        let t0 = Instant::now();
        let (stats, _) = st.step(x, B, 1e-5, 4e-4, &mut scratch).expect("bench step");
        if i >= 2 {
            ts.push(t0.elapsed().as_secs_f64());
        }
        l0 = stats.l0;
    }
    let rate = B as f64 / median(ts);
    println!("saev  {name}: {rate:.0} patches/s (L0 {l0:.1})");
    rate
}

fn main() {
    saev::tune_allocator();
    let x = rnd(B * D, 7, 2.0);
    let relu_sparse = time(
        "relu L0≈1% sparse kernels",
        || {
            state(
                recipe(TrainActivation::Relu, Kernels::Auto, 0),
                &x,
                Some(61.0),
            )
        },
        &x,
    );
    time(
        "relu L0≈1% dense kernels",
        || {
            state(
                recipe(TrainActivation::Relu, Kernels::Dense, 0),
                &x,
                Some(61.0),
            )
        },
        &x,
    );
    time(
        "relu L0≈10% (auto → dense)",
        || {
            state(
                recipe(TrainActivation::Relu, Kernels::Auto, 0),
                &x,
                Some(614.0),
            )
        },
        &x,
    );
    let topk = time(
        "topk k=32",
        || {
            state(
                recipe(TrainActivation::TopK { k: 32 }, Kernels::Auto, 0),
                &x,
                None,
            )
        },
        &x,
    );
    let auxk = time(
        "topk k=32 + auxk 192 (1,024 dead)",
        || {
            state(
                recipe(TrainActivation::TopK { k: 32 }, Kernels::Auto, 192),
                &x,
                None,
            )
        },
        &x,
    );
    let batch_topk = time(
        "batchtopk k=32",
        || {
            state(
                recipe(TrainActivation::BatchTopK { k: 32 }, Kernels::Auto, 0),
                &x,
                None,
            )
        },
        &x,
    );
    if let Ok(python) = std::env::var("SAEV_BENCH_TORCH_PYTHON") {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/bench_torch_sae.py");
        let out = Command::new(python)
            .arg(script)
            .args(["--iters", &ITERS.to_string()])
            .output()
            .expect("running the torch bench script");
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}{}", String::from_utf8_lossy(&out.stderr));
        let rate = |key: &str| {
            text.lines()
                .find(|l| l.contains(key))
                .and_then(|l| l.split(": ").nth(1))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let Some(t) = rate("relu step") {
            println!("ratio relu (L0≈1%) vs saev 0.1.0: {:.2}×", relu_sparse / t);
        }
        if let Some(t) = rate("dense topk k=32 step") {
            println!("ratio topk k=32 vs dense torch topk: {:.2}×", topk / t);
        }
        if let Some(t) = rate("+ auxk") {
            println!(
                "ratio topk + auxk vs dense torch topk + auxk: {:.2}×",
                auxk / t
            );
        }
        if let Some(t) = rate("dense batchtopk") {
            println!(
                "ratio batchtopk vs dense torch batchtopk: {:.2}×",
                batch_topk / t
            );
        }
    }
}
