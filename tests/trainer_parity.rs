//! The paper-era ReLU training step against the real saev 0.1.0 (torch): loss terms per step and
//! weights after 6 fused-Adam steps with lr warm-up, two sweep settings on the same batches.
//! Fixture: `scripts/make_trainer_fixtures.py`.

mod common;

use common::max_rel_diff;

use std::path::Path;

use common::TestResult;
use saev::candle_core::Device;

#[test]
fn relu_step_matches_saev_010() -> TestResult {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/trainer/saev010-relu.safetensors");
    let t = saev::candle_core::safetensors::load(&path, &Device::Cpu)?;
    let settings = [(1e-3, 4e-4), (3e-3, 1.6e-2)];
    let batches = &t["batches"];
    for (k, (lr, lambda)) in settings.into_iter().enumerate() {
        let w = |n: &str| t[&format!("s{k}.init.{n}")].clone();
        let mut step = saev::__private::PaperReluStep::new(
            w("W_enc"),
            w("b_enc"),
            w("W_dec"),
            w("b_dec"),
            lr,
            lambda,
            3,
        )?;
        for s in 0..6 {
            let x = batches.get(s)?;
            let terms = step.step(&x)?;
            for (name, got) in [
                ("mse", terms.mse),
                ("sparsity", terms.sparsity),
                ("loss", terms.loss),
                ("l0", terms.l0),
                ("l1", terms.l1),
            ] {
                let want: f32 = t[&format!("s{k}.step{s}.{name}")].get(0)?.to_scalar()?;
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1e-6),
                    "setting {k} step {s} {name}: {got} vs {want}"
                );
            }
        }
        for (name, got) in [
            ("W_enc", &step.w_enc),
            ("b_enc", &step.b_enc),
            ("W_dec", &step.w_dec),
            ("b_dec", &step.b_dec),
        ] {
            let r = max_rel_diff(got, &t[&format!("s{k}.final.{name}")]);
            assert!(r <= 1e-4, "setting {k} final {name}: max rel diff {r}");
            eprintln!("setting {k} final {name}: max |diff| / max |ref| = {r:.2e}");
        }
    }
    Ok(())
}

/// The fast trainer's step (sparse-aware kernels, both paths) on the same fixture.
#[test]
fn fast_step_matches_saev_010() -> TestResult {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/trainer/saev010-relu.safetensors");
    let t = saev::candle_core::safetensors::load(&path, &Device::Cpu)?;
    let settings = [(1e-3, 4e-4), (3e-3, 1.6e-2)];
    let batches = &t["batches"];
    let flat =
        |x: &saev::candle_core::Tensor| -> Vec<f32> { x.flatten_all().unwrap().to_vec1().unwrap() };
    for kernels in [saev::sae::Kernels::Sparse, saev::sae::Kernels::Dense] {
        for (k, (lr, lambda)) in settings.into_iter().enumerate() {
            let w = |n: &str| t[&format!("s{k}.init.{n}")].clone();
            let (d, s) = w("W_enc").dims2()?;
            let recipe = saev::__private::Recipe {
                activation: saev::sae::TrainActivation::Relu,
                groups: vec![],
                aux_k: 0,
                aux_coef: 0.0,
                dead_window_patches: u64::MAX,
                unit_norm_decoder: true,
                max_grad_norm: None,
                kernels,
                dense_above: 0.05,
                relu_init_density: None,
            };
            let mut st = saev::__private::TrainState::new(
                flat(&w("W_enc").t()?),
                flat(&w("b_enc")),
                flat(&w("W_dec")),
                flat(&w("b_dec")),
                recipe,
            )?;
            let mut scratch = saev::__private::Scratch::default();
            for step in 0..6 {
                let x = batches.get(step)?;
                let n = x.dims()[0];
                // The paper's warm-up: lr grows linearly from 0 over 3 steps.
                let lr_t = lr * (step as f64 / 3.0).min(1.0);
                let (terms, _) = st.step(&flat(&x), n, lr_t, lambda, &mut scratch)?;
                for (name, got) in [
                    ("mse", terms.mse),
                    ("sparsity", terms.lambda * terms.l1),
                    ("loss", terms.loss),
                    ("l0", terms.l0),
                    ("l1", terms.l1),
                ] {
                    let want: f32 = t[&format!("s{k}.step{step}.{name}")].get(0)?.to_scalar()?;
                    assert!(
                        (got as f32 - want).abs() <= 1e-4 * want.abs().max(1e-6),
                        "{kernels:?} setting {k} step {step} {name}: {got} vs {want}"
                    );
                }
            }
            let dev = Device::Cpu;
            let got_enc =
                saev::candle_core::Tensor::from_vec(st.w_enc.clone(), (s, d), &dev)?.t()?;
            for (name, got) in [
                ("W_enc", got_enc),
                (
                    "b_enc",
                    saev::candle_core::Tensor::from_vec(st.b_enc.clone(), s, &dev)?,
                ),
                (
                    "W_dec",
                    saev::candle_core::Tensor::from_vec(st.w_dec.clone(), (s, d), &dev)?,
                ),
                (
                    "b_dec",
                    saev::candle_core::Tensor::from_vec(st.b_dec.clone(), d, &dev)?,
                ),
            ] {
                let r = max_rel_diff(&got, &t[&format!("s{k}.final.{name}")]);
                assert!(
                    r <= 1e-4,
                    "{kernels:?} setting {k} final {name}: max rel diff {r}"
                );
                eprintln!("{kernels:?} setting {k} final {name}: max |diff| / max |ref| = {r:.2e}");
            }
        }
    }
    Ok(())
}
