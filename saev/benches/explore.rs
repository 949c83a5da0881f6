//! Benchmark: the feature pass against the bare SAE encode on the same store.
//!
//! `cargo bench -p saev --bench explore` prints patches/s for (a) reading the store in order and
//! encoding every patch (normalise, `x W_enc + b_enc` GEMM, ReLU) and (b) the full feature pass
//! (the same plus frequency / mean / max / histogram / top-k bookkeeping), and their ratio.
//! Store: `SAEV_BENCH_STORE=<dir>` (layer -2; e.g. DINOv2-S/14 on Fashion-MNIST), else a
//! synthetic 400-example, 256-patch, d = 384 store. SAE: d_sae 6144, ReLU, b_enc shifted so that
//! about 1% of latents fire (a trained SAE's sparsity).

use std::time::Instant;

use saev::candle_core::{DType, Device, Tensor};
use saev::{
    explore::FeatureConfig, sae::SaeActivation, sae::SaeConfig, store::Metadata, ActivationStore,
    Features, Sae,
};

fn synthetic(root: &std::path::Path) -> ActivationStore {
    let (n, p, d) = (400usize, 256usize, 384usize);
    let md = Metadata {
        family: "dinov2".into(),
        ckpt: "synthetic".into(),
        layers: vec![-2],
        content_tokens_per_example: p,
        cls_token: true,
        d_model: d,
        n_examples: n,
        max_tokens_per_shard: 2_000_000,
        data: "synthetic".into(),
        dataset: "synthetic".into(),
        pixel_agg: "majority".into(),
        dtype: "float32".into(),
        protocol: saev::store::PROTOCOL.into(),
    };
    let dir = root.join(md.hash());
    if let Ok(s) = ActivationStore::open(&dir) {
        return s;
    }
    let acts: Vec<f32> = Tensor::randn(0f32, 1.0, (n * (p + 1) * d,), &Device::Cpu)
        .and_then(|t| t.to_vec1())
        .expect("random data");
    let mut w = saev::store::StoreWriter::create(root, md, None).expect("store");
    w.write_examples(0, &acts).expect("write");
    ActivationStore::open(w.finish().expect("finish")).expect("open")
}

fn main() -> saev::Result<()> {
    saev::tune_allocator();
    let store = match std::env::var("SAEV_BENCH_STORE") {
        Ok(dir) => ActivationStore::open(dir)?,
        Err(_) => synthetic(&std::env::temp_dir().join("saev-bench-explore")),
    };
    let (d, s) = (store.d_model(), 6144);
    let norm = store.norm_stats(-2, saev::store::Tokens::Patches)?;
    let w_enc = (Tensor::randn(0f32, 1.0, (d, s), &Device::Cpu)? / (d as f64).sqrt())?;
    // b_enc: −2.33 σ of the pre-activation (≈ 1% of a unit Gaussian above it).
    let b_enc = Tensor::full(-2.33f32, s, &Device::Cpu)?;
    let sae = Sae::new(
        SaeConfig {
            schema: saev::sae::SAE_SCHEMA,
            d_model: d,
            d_sae: s,
            activation: SaeActivation::Relu,
            norm: Some(saev::sae::SaeNorm {
                mean: norm.mean.clone(),
                scalar: norm.scalar,
            }),
            provenance: serde_json::json!({"layer": -2}),
        },
        w_enc,
        Tensor::zeros(s, DType::F32, &Device::Cpu)?.broadcast_add(&b_enc)?,
        Tensor::zeros((s, d), DType::F32, &Device::Cpu)?,
        Tensor::zeros(d, DType::F32, &Device::Cpu)?,
    )?;
    let n = (store.n_examples() * store.n_patches()) as f64;
    let enc = saev::__private::Encoder::new(&sae)?;
    let per = (4096 / store.n_patches()).max(1);
    let mut best_bare = 0f64;
    let mut best_pass = 0f64;
    let mut fired = 0usize;
    for _ in 0..3 {
        let t0 = Instant::now();
        let mut codes = Vec::new();
        for (_, mut x) in store.ordered(-2, saev::store::Tokens::Patches, per)? {
            enc.encode(&mut x, &mut codes);
            fired += codes.iter().filter(|&&v| v > 0.0).count();
        }
        best_bare = best_bare.max(n / t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let f = Features::compute(&sae, &store, -2, &FeatureConfig::default())?;
        best_pass = best_pass.max(n / t0.elapsed().as_secs_f64());
        assert!(f.live().len() > s / 2);
    }
    println!(
        "store {}: {} patches, L0 ≈ {:.1} ({:.2}% of d_sae)",
        store.dir().display(),
        n,
        fired as f64 / n / 3.0,
        100.0 * fired as f64 / n / 3.0 / s as f64
    );
    println!("bare encode (ordered read + normalise + GEMM + ReLU): {best_bare:.0} patches/s");
    println!("feature pass (+ stats, histogram, top-16): {best_pass:.0} patches/s");
    println!(
        "ratio: {:.0}% of bare encode",
        100.0 * best_pass / best_bare
    );
    Ok(())
}
