//! The paper-era ReLU training step against the real saev 0.1.0 (torch): loss terms per step and
//! weights after 6 fused-Adam steps with lr warm-up, two sweep settings on the same batches.
//! Fixture: `scripts/make_trainer_fixtures.py`.

mod common;

use common::max_rel_diff;

use std::path::Path;

use saev::candle_core::Device;

#[test]
fn relu_step_matches_saev_010() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/trainer/saev010-relu.safetensors");
    let t = saev::candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let settings = [(1e-3, 4e-4), (3e-3, 1.6e-2)];
    let batches = &t["batches"];
    for (k, (lr, lambda)) in settings.into_iter().enumerate() {
        let w = |n: &str| t[&format!("s{k}.init.{n}")].clone();
        let mut step = saev::PaperReluStep::new(
            w("W_enc"),
            w("b_enc"),
            w("W_dec"),
            w("b_dec"),
            lr,
            lambda,
            3,
        )
        .unwrap();
        for s in 0..6 {
            let x = batches.get(s).unwrap();
            let terms = step.step(&x).unwrap();
            for (name, got) in [
                ("mse", terms.mse),
                ("sparsity", terms.sparsity),
                ("loss", terms.loss),
                ("l0", terms.l0),
                ("l1", terms.l1),
            ] {
                let want: f32 = t[&format!("s{k}.step{s}.{name}")]
                    .get(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
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
}
