//! The device-generic SAE step (candle ops, what runs on a GPU), run with `Device::Cpu`, against
//! the CPU-specialised sparse kernels: loss terms and weights within 1e-4 after several steps,
//! for every recipe. Plus the exact chunked top-k against a plain sort.

mod common;

use candle_core::{Device, Tensor};
use common::max_diff;
use saev::__private::{topk_rows, uniforms, DeviceState, Recipe, Scratch, TrainState};
use saev::sae::{Kernels, TrainActivation};

fn recipe(activation: TrainActivation) -> Recipe {
    Recipe {
        activation,
        groups: Vec::new(),
        aux_k: 0,
        aux_coef: 1.0 / 32.0,
        dead_window_patches: 1_000_000,
        unit_norm_decoder: true,
        max_grad_norm: None,
        kernels: Kernels::Auto,
        dense_above: 0.05,
        relu_init_density: None,
    }
}

/// A small SAE and a few batches with structure (sparse combinations of planted atoms + noise).
fn setup(recipe: Recipe, d: usize, s: usize) -> (TrainState, Vec<Vec<f32>>) {
    let w_enc = uniforms(1, s * d, 1.0 / (d as f32).sqrt());
    let w_dec = uniforms(2, s * d, 1.0 / (d as f32).sqrt());
    let b_enc = uniforms(3, s, 0.05);
    let b_dec = uniforms(4, d, 0.05);
    let st = TrainState::new(w_enc, b_enc, w_dec, b_dec, recipe).expect("valid state");
    let atoms = uniforms(5, 16 * d, 1.0);
    let batches = (0..5u64)
        .map(|b| {
            let n = 48;
            let mut x = uniforms(100 + b, n * d, 0.1);
            let pick = uniforms(200 + b, n * 3, 1.0);
            for r in 0..n {
                for j in 0..3 {
                    let a = ((pick[r * 3 + j] + 1.0) * 7.99) as usize % 16;
                    let c = 1.0 + pick[(r * 3 + j + 1) % (n * 3)].abs();
                    for t in 0..d {
                        x[r * d + t] += c * atoms[a * d + t];
                    }
                }
            }
            x
        })
        .collect();
    (st, batches)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-6)
}

/// Five steps each way; every step's loss terms and firing counts, then all weights and the
/// counters, must agree.
fn assert_equivalent(name: &str, recipe: Recipe, lambda: f64) {
    let (d, s) = (24, 96);
    let (cpu0, batches) = setup(recipe, d, s);
    let mut cpu = cpu0.clone();
    let mut host = cpu0.clone();
    let dev = Device::Cpu;
    let mut gpu = DeviceState::new(&host, &dev).expect("to device");
    let mut scratch = Scratch::default();
    let mut aux_seen = false;
    for (i, x) in batches.iter().enumerate() {
        let n = x.len() / d;
        let lr = 1e-3;
        let (a, fa) = cpu.step(x, n, lr, lambda, &mut scratch).expect("cpu step");
        let xt = Tensor::from_slice(x, (n, d), &dev).expect("batch");
        let (b, fb) = gpu.step(&mut host, &xt, lr, lambda).expect("device step");
        for (what, p, q) in [
            ("loss", a.loss, b.loss),
            ("mse", a.mse, b.mse),
            ("nmse", a.nmse, b.nmse),
            ("l0", a.l0, b.l0),
            ("l1", a.l1, b.l1),
            ("aux", a.aux, b.aux),
        ] {
            assert!(
                rel(p, q) < 1e-4,
                "{name}, step {i}: {what} cpu {p} vs device {q}"
            );
        }
        assert_eq!(fa, fb, "{name}, step {i}: firing counts");
        aux_seen |= a.aux > 0.0;
    }
    gpu.write_back(&mut host).expect("write back");
    assert!(gpu.all_finite().expect("finite check"));
    for (what, p, q) in [
        ("W_enc", &cpu.w_enc, &host.w_enc),
        ("b_enc", &cpu.b_enc, &host.b_enc),
        ("W_dec", &cpu.w_dec, &host.w_dec),
        ("b_dec", &cpu.b_dec, &host.b_dec),
        ("log_threshold", &cpu.log_threshold, &host.log_threshold),
        ("Adam m of W_enc", &cpu.adam_m[0], &host.adam_m[0]),
        ("Adam v of W_dec", &cpu.adam_v[2], &host.adam_v[2]),
    ] {
        let diff = max_diff(p, q);
        assert!(diff < 1e-4, "{name}: {what} differs by {diff}");
    }
    // The weights did move (a test that cannot pass by doing nothing).
    assert!(
        max_diff(&cpu0.w_dec, &host.w_dec) > 1e-4,
        "{name}: no update"
    );
    assert_eq!(cpu.t, host.t);
    assert_eq!(
        aux_seen,
        cpu0.recipe.aux_k > 0,
        "{name}: AuxK ran iff asked"
    );
    if !cpu0.log_threshold.is_empty() {
        assert!(max_diff(&cpu0.log_threshold, &host.log_threshold) > 1e-3);
    }
    assert_eq!(cpu.since_fired, host.since_fired, "{name}: dead counters");
    assert!(
        (cpu.threshold - host.threshold).abs() <= 1e-5 * cpu.threshold.abs().max(1.0),
        "{name}: BatchTopK threshold {} vs {}",
        cpu.threshold,
        host.threshold
    );
}

#[test]
fn relu_l1_matches_the_cpu_kernels() {
    assert_equivalent("relu", recipe(TrainActivation::Relu), 4e-3);
    let mut r = recipe(TrainActivation::Relu);
    r.relu_init_density = Some(0.1);
    r.max_grad_norm = Some(0.05);
    assert_equivalent("relu, data-driven start, clipped", r, 4e-3);
}

#[test]
fn topk_and_auxk_match_the_cpu_kernels() {
    assert_equivalent("topk", recipe(TrainActivation::TopK { k: 6 }), 0.0);
    let mut r = recipe(TrainActivation::TopK { k: 6 });
    r.aux_k = 12;
    // Every latent silent for one batch counts as dead: AuxK runs from the second step.
    r.dead_window_patches = 48;
    assert_equivalent("topk + auxk", r, 0.0);
}

#[test]
fn batch_topk_matches_the_cpu_kernels() {
    assert_equivalent(
        "batch_topk",
        recipe(TrainActivation::BatchTopK { k: 6 }),
        0.0,
    );
}

#[test]
fn jump_relu_matches_the_cpu_kernels() {
    assert_equivalent("jump_relu", recipe(TrainActivation::jump_relu()), 0.3);
}

#[test]
fn matryoshka_groups_match_the_cpu_kernels() {
    let mut r = recipe(TrainActivation::TopK { k: 6 });
    r.groups = vec![12, 40, 96];
    r.kernels = Kernels::Sparse;
    assert_equivalent("matryoshka topk (sparse kernels)", r, 0.0);
}

#[test]
fn chunked_topk_is_exact() {
    // Wider than a sort chunk (4096), with a ragged last chunk.
    let (n, s, k) = (3, 9000, 40);
    let v = uniforms(9, n * s, 1.0);
    let x = Tensor::from_slice(&v, (n, s), &Device::Cpu).expect("tensor");
    let (vals, idx) = topk_rows(&x, k).expect("topk");
    let vals: Vec<Vec<f32>> = vals.to_vec2().expect("vals");
    let idx: Vec<Vec<u32>> = idx.to_vec2().expect("idx");
    for r in 0..n {
        let mut row: Vec<(f32, u32)> = v[r * s..(r + 1) * s]
            .iter()
            .enumerate()
            .map(|(i, &x)| (x, i as u32))
            .collect();
        row.sort_by(|a, b| b.0.total_cmp(&a.0));
        let want_v: Vec<f32> = row[..k].iter().map(|p| p.0).collect();
        let want_i: Vec<u32> = row[..k].iter().map(|p| p.1).collect();
        assert_eq!(vals[r], want_v, "row {r} values");
        assert_eq!(idx[r], want_i, "row {r} ids");
    }
    assert!(topk_rows(&x, s + 1).is_err());
}
