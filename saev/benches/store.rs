//! Benchmark: shuffled loader throughput from a page-cached store vs this machine's memcpy.
//!
//! `cargo bench -p saev --bench store` writes a synthetic store (1,000 examples × 257 tokens ×
//! d 384 ≈ 395 MB) under the temp dir, reads it once so it is page-cached, then times one epoch of
//! shuffled batches of 4096 patch vectors and a 256 MB memcpy, and prints both in GB/s and
//! patches/s.

use std::time::Instant;

use saev::{
    store::LoaderConfig, store::Metadata, store::StoreWriter, store::Tokens, ActivationStore,
};

fn main() -> saev::Result<()> {
    saev::tune_allocator();
    let (n, t, d) = (1000usize, 257usize, 384usize);
    let md = Metadata {
        family: "dinov2".into(),
        ckpt: "synthetic".into(),
        layers: vec![-2],
        content_tokens_per_example: t - 1,
        cls_token: true,
        d_model: d,
        n_examples: n,
        max_tokens_per_shard: 2_400_000,
        data: "bench".into(),
        dataset: "bench".into(),
        pixel_agg: "majority".into(),
        dtype: "float32".into(),
        protocol: saev::store::PROTOCOL.into(),
    };
    let root = std::env::temp_dir().join("saev-bench-store");
    let dir = root.join(md.hash());
    if !dir.join("shards.json").exists() {
        let _ = std::fs::remove_dir_all(&root);
        let mut w = StoreWriter::create(&root, md, None)?;
        for e0 in (0..n).step_by(50) {
            let acts: Vec<f32> = (0..50 * t * d)
                .map(|i| ((e0 * t * d + i) % 1013) as f32 * 1e-3)
                .collect();
            w.write_examples(e0, &acts)?;
        }
        w.finish()?;
    }
    let store = ActivationStore::open(&dir)?;
    // Warm the page cache and the mapping.
    let mut s = 0f32;
    for e in 0..n {
        s += store.example(e)?.iter().step_by(1024).sum::<f32>();
    }
    std::hint::black_box(s);

    let bytes_per_patch = (d * 4) as f64;
    for threads in [1usize, 2] {
        let buf = vec![1u8; 256 << 20];
        let mut dst = vec![0u8; 256 << 20];
        let reps = 8;
        dst.copy_from_slice(&buf); // fault the destination pages in before timing
        let t0 = Instant::now();
        for _ in 0..reps {
            if threads == 1 {
                dst.copy_from_slice(&buf);
            } else {
                let (a, b) = dst.split_at_mut(128 << 20);
                std::thread::scope(|sc| {
                    sc.spawn(|| a.copy_from_slice(&buf[..128 << 20]));
                    sc.spawn(|| b.copy_from_slice(&buf[128 << 20..]));
                });
            }
            std::hint::black_box(&dst);
        }
        let gbs = (reps as f64 * (256u64 << 20) as f64) / t0.elapsed().as_secs_f64() / 1e9;
        println!(
            "memcpy 256 MB, {threads} thread(s): {gbs:.1} GB/s = {:.1}M patches/s at d={d}",
            gbs * 1e9 / bytes_per_patch / 1e6
        );
    }
    for epoch in 0..3 {
        let cfg = LoaderConfig::new(-2)
            .with_batch_size(4096)
            .with_tokens(Tokens::Patches)
            .with_seed(1);
        let t0 = Instant::now();
        let mut rows = 0usize;
        for b in store.shuffled(&cfg, epoch)? {
            rows += b.n;
            std::hint::black_box(&b.acts_nd);
        }
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "shuffled loader epoch {epoch}: {rows} patches, batch 4096: {:.2}M patches/s = {:.1} GB/s",
            rows as f64 / dt / 1e6,
            rows as f64 * bytes_per_patch / dt / 1e9
        );
    }
    Ok(())
}
