//! Benchmark: shuffled loader throughput from a page-cached store vs this machine's memcpy.
//!
//! `cargo bench -p saev --bench store` writes a synthetic store (1,000 examples × 257 tokens ×
//! d 384 ≈ 395 MB) under the temp dir, reads it once so it is page-cached, then times one epoch of
//! shuffled batches of 4096 patch vectors and a 256 MB memcpy, and prints both in GB/s and
//! patches/s. Then from disk (root only: it empties the page cache): the shards read
//! sequentially against the shuffled loader's first epoch from an empty cache
//! (`SAEV_BENCH_STORE=<dir>` for a real store).

use std::time::Instant;

use saev::{
    store::LoaderConfig, store::Metadata, store::Shuffle, store::StoreWriter, store::Tokens,
    ActivationStore,
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
    cold(&store)
}

/// Empty the kernel's page cache (root only; Linux). False when not allowed.
fn drop_page_cache() -> bool {
    // `sync` first, so dirty pages can be dropped too.
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// From disk: the store's shards read sequentially after the page cache is emptied, against the
/// shuffled loader's first epoch from an empty cache (what a store larger than RAM sees all the
/// time). `SAEV_BENCH_STORE=<dir>` measures a real store instead of the synthetic one.
fn cold(synthetic: &ActivationStore) -> saev::Result<()> {
    let dir = match std::env::var_os("SAEV_BENCH_STORE") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => synthetic.dir().to_path_buf(),
    };
    let store = ActivationStore::open(&dir)?;
    if !drop_page_cache() {
        println!(
            "from disk: skipped (emptying the page cache needs root: /proc/sys/vm/drop_caches)"
        );
        return Ok(());
    }
    let mut shards: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| saev::Error::Io {
            path: dir.clone(),
            source: e,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    shards.sort();
    // Only the bytes the store holds (a shard is pre-sized for its capacity: its tail is a hole,
    // which reads as zeros without touching the disk).
    let mut left = (store.n_examples() * store.tokens_per_example() * store.layers().len()) as u64
        * store.d_model() as u64
        * 4;
    let t0 = Instant::now();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    for p in &shards {
        use std::io::Read;
        let io = |e| saev::Error::Io {
            path: p.clone(),
            source: e,
        };
        let mut f = std::fs::File::open(p).map_err(io)?;
        while left > 0 {
            let want = buf.len().min(left as usize);
            let got = f.read(&mut buf[..want]).map_err(io)?;
            if got == 0 {
                break;
            }
            (bytes, left) = (bytes + got as u64, left - got as u64);
        }
    }
    let seq = bytes as f64 / t0.elapsed().as_secs_f64() / 1e9;
    println!(
        "from disk: {} shard file(s), the store's {:.2} GB read sequentially at {seq:.2} GB/s",
        shards.len(),
        bytes as f64 / 1e9
    );
    // Each loader opens the store afresh: pages a live mapping holds are not dropped.
    drop(store);
    // The first quarter of an epoch from an empty cache: later the cache holds most of a store
    // this size, which a store larger than RAM never has.
    for shuffle in [Shuffle::Global, Shuffle::blocks()] {
        let store = ActivationStore::open(&dir)?;
        let bpp = (store.d_model() * 4) as f64;
        drop_page_cache();
        let cfg = LoaderConfig::new(-2)
            .with_batch_size(4096)
            .with_tokens(Tokens::Patches)
            .with_seed(1)
            .with_shuffle(shuffle);
        let loader = store.shuffled(&cfg, 0)?;
        let quarter = (loader.n_batches() / 4).max(1);
        let t0 = Instant::now();
        let mut rows = 0usize;
        for b in loader.take(quarter) {
            rows += b.n;
            std::hint::black_box(&b.acts_nd);
        }
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "from disk: shuffled loader {shuffle:?}, first quarter of an epoch: {:.3}M patches/s = {:.2} GB/s ({:.0}% of sequential)",
            rows as f64 / dt / 1e6,
            rows as f64 * bpp / dt / 1e9,
            100.0 * rows as f64 * bpp / dt / 1e9 / seq
        );
    }
    Ok(())
}
