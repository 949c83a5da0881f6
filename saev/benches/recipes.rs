//! Benchmark: every SAE training recipe on one store, side by side — held-out NMSE, explained
//! variance, L0, never-fired ("dead") and dense latents, and wall time — so a recipe change is
//! one command away from its numbers (issue #16).
//!
//! ```text
//! cargo bench -p saev --bench recipes -- STORE [N_PATCHES] [EXPANSION]
//! ```
//! Defaults: 2M patches, 16× (the quickstart's budget). Recipes: the paper's ReLU + L1
//! (untied Kaiming init), saev's sparse ReLU (tied init, first-batch bias start), TopK k 32
//! with the paper-era untied init and a fixed 2^20-patch dead window (saev's recipe before
//! issue #16), TopK k 32 and BatchTopK k 32 with today's defaults (tied init, dead window
//! scaled to the run, AuxK, batch 2048), and JumpReLU. Prints the processor too.

use std::time::Instant;

use saev::sae::{Init, Setting, TrainActivation};
use saev::{ActivationStore, TrainConfig};

fn cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn main() -> saev::Result<()> {
    saev::tune_allocator();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(store) = args.first() else {
        eprintln!("usage: cargo bench -p saev --bench recipes -- STORE [N_PATCHES] [EXPANSION]");
        return Ok(());
    };
    let store = ActivationStore::open(store)?;
    let n_patches: u64 = args
        .get(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let expansion: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(16);
    println!(
        "{store:?}; {n_patches} patches, {expansion}×; {} ({} threads)",
        cpu(),
        rayon::current_num_threads()
    );
    let setting = |lr: f64, lambda: f64| Setting {
        lr,
        lambda,
        k: None,
    };
    let topk = TrainConfig::topk(-2, 32)
        .with_expansion(expansion)
        .with_n_patches(n_patches)
        .with_warmup(100, 0)
        .with_sweep(vec![setting(2e-3, 0.0)]);
    // saev's TopK before issue #16: untied Kaiming init, a fixed 2^20-patch dead window,
    // batch 4096 at lr 3e-3.
    let mut old_topk = topk
        .clone()
        .with_batch_size(4096)
        .with_sweep(vec![setting(3e-3, 0.0)]);
    old_topk.init = Some(Init::Kaiming);
    old_topk.dead_window_patches = Some(1 << 20);
    let relu = TrainConfig::new(-2)
        .with_expansion(expansion)
        .with_n_patches(n_patches)
        .with_warmup(100, 100)
        .with_sweep(vec![setting(1e-3, 8e-4)]);
    let sparse_relu = TrainConfig::sparse_relu(-2)
        .with_expansion(expansion)
        .with_n_patches(n_patches)
        .with_sweep(vec![setting(1e-3, 7e-3)]);
    let mut batch_topk = topk.clone();
    batch_topk.activation = TrainActivation::BatchTopK { k: 32 };
    // λ 0.3 lands near L0 32 on the quickstart store.
    let jump = TrainConfig::jump_relu(-2)
        .with_expansion(expansion)
        .with_n_patches(n_patches)
        .with_warmup(100, 100)
        .with_sweep(vec![setting(1e-3, 0.3)]);
    let recipes = [
        ("ReLU + L1 (paper)", relu),
        (
            "ReLU + L1 λ 7e-3 (sparse_relu: tied, first-batch bias)",
            sparse_relu,
        ),
        (
            "TopK 32, untied init, 2^20 window, batch 4096 (before)",
            old_topk,
        ),
        ("TopK 32 (tied init, scaled window)", topk),
        ("BatchTopK 32 (tied init, scaled window)", batch_topk),
        ("JumpReLU λ 0.3 (first-batch thresholds)", jump),
    ];
    println!("\n| recipe | held-out NMSE | explained var. | L0 | dead | dense | time |\n|---|---|---|---|---|---|---|");
    let root = std::env::temp_dir().join(format!("saev-bench-recipes-{}", std::process::id()));
    for (i, (name, cfg)) in recipes.into_iter().enumerate() {
        let t0 = Instant::now();
        let run = saev::train_saes(&store, &cfg, root.join(i.to_string()))?;
        let dt = t0.elapsed().as_secs_f64();
        let d_sae = run.saes[0].d_sae();
        match &run.evals[0] {
            Some(e) => println!(
                "| {name} | {:.4} | {:.4} | {:.1} | {} of {d_sae} ({:.1}%) | {} | {dt:.0} s |",
                e.nmse,
                e.explained_variance,
                e.l0,
                e.n_dead,
                100.0 * e.n_dead as f64 / d_sae as f64,
                e.n_dense
            ),
            None => println!("| {name} | (no held-out examples) | | | | | {dt:.0} s |"),
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
