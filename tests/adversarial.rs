//! Bad input, reruns and faults through the `saev` binary, as a hostile user would try them
//! (issue #13). Each case asserts a non-zero exit, no panic or hang, an error that names the
//! culprit, and that files that existed before are unchanged.

mod common;

use common::copy_dir;
use common::fixtures_root as fixtures;

use common::TestResult;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A fresh scratch directory for this test file.
fn scratch(name: &str) -> PathBuf {
    common::scratch(&format!("adv-{name}"))
}

/// The Python-written 2.1 store (d_model 8, layers [-2, -1], 7 examples of CLS + 4 patches,
/// shards of 3), copied so it can be damaged.
fn store_copy(dir: &Path) -> PathBuf {
    let src = common::py21_store();
    let to = dir.join("store");
    copy_dir(&src, &to);
    to
}

/// Run the binary (with its own cache) and kill it if it runs past 60 s.
fn saev(dir: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_saev"))
        .env("SAEV_CACHE", dir.join("cache"))
        .args(args.iter().map(|a| a.as_ref()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!(
                "saev {:?} hung",
                args.iter()
                    .map(|a| a.as_ref().to_owned())
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `saev activations --model MODEL --data DATA --out OUT EXTRA…` in `dir`.
fn activations(
    dir: &Path,
    model: &dyn AsRef<std::ffi::OsStr>,
    data: &dyn AsRef<std::ffi::OsStr>,
    out: &dyn AsRef<std::ffi::OsStr>,
    extra: &[&dyn AsRef<std::ffi::OsStr>],
) -> Output {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"activations",
        &"--model",
        model,
        &"--data",
        data,
        &"--out",
        out,
    ];
    args.extend_from_slice(extra);
    saev(dir, &args)
}

/// A clear failure: non-zero exit, no panic, the error names every `needles`.
fn refused(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "exit 0; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "error does not name `{n}`: {err}");
    }
    err
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn sweep(dir: &Path, json: &str) -> PathBuf {
    let p = dir.join("sweep.json");
    std::fs::write(&p, json).unwrap();
    p
}

const TOPK: &str = r#"{"activation": {"kind": "top_k", "k": 2}, "expansion": 2, "batch_size": 8,
    "n_patches": 64, "sweep": [{"lr": 1e-3}], "n_lr_warmup": 0, "ckpt_every": 1}"#;

// ---------------------------------------------------------------------------------------------
// A store is what its metadata says, exactly.

#[test]
fn edited_store_metadata_is_refused_by_shard_size() -> TestResult {
    for (field, value) in [
        ("d_model", serde_json::json!(16)),
        ("cls_token", serde_json::json!(false)),
        ("content_tokens_per_example", serde_json::json!(2)),
    ] {
        let dir = scratch(&format!("md-{field}"));
        let store = store_copy(&dir);
        edit_json(&store.join("metadata.json"), |v| v[field] = value.clone());
        let before = snapshot(&store);
        let sw = sweep(&dir, TOPK);
        let out = saev(
            &dir,
            &[
                &"train",
                &"--store",
                &store,
                &"--sweep",
                &sw,
                &"--out",
                &dir.join("run"),
            ],
        );
        refused(&out, &["acts00000"]);
        assert_eq!(snapshot(&store), before, "{field}: the store was changed");
    }
    Ok(())
}

/// A store of one partly filled shard (capacity 21 examples, 7 written; the file full size):
/// with d_model, cls_token or the token count edited, the file is still at least as long as
/// the rows metadata.json now describes, and was read as them. Refused by size now.
#[test]
fn an_edited_one_shard_store_is_refused_by_shard_size() -> TestResult {
    for (field, value) in [
        ("d_model", serde_json::json!(16)),
        ("cls_token", serde_json::json!(false)),
        ("content_tokens_per_example", serde_json::json!(3)),
    ] {
        let dir = scratch(&format!("one-{field}"));
        let store = store_copy(&dir);
        let mut rows = Vec::new();
        for i in 0..3 {
            let f = store.join(format!("acts{i:06}.bin"));
            let b = std::fs::read(&f)?;
            rows.extend_from_slice(&b[..[3, 3, 1][i] * 320]);
            std::fs::remove_file(f)?;
        }
        rows.resize(21 * 320, 0);
        std::fs::write(store.join("acts000000.bin"), &rows)?;
        std::fs::write(
            store.join("shards.json"),
            r#"[{"name": "acts000000.bin", "n_examples": 7}]"#,
        )?;
        edit_json(&store.join("metadata.json"), |v| {
            v["max_tokens_per_shard"] = serde_json::json!(210)
        });
        assert_eq!(saev::ActivationStore::open(&store)?.n_examples(), 7);
        edit_json(&store.join("metadata.json"), |v| v[field] = value.clone());
        let e = saev::ActivationStore::open(&store).unwrap_err().to_string();
        assert!(
            e.contains("acts000000.bin") && e.contains("bytes"),
            "{field}: {e}"
        );
    }
    Ok(())
}

#[test]
fn absurd_numbers_and_special_files_are_refused_before_allocating() -> TestResult {
    let dir = scratch("absurd");
    let store = store_copy(&dir);
    edit_json(&store.join("metadata.json"), |v| {
        v["d_model"] = serde_json::json!(1u64 << 62)
    });
    let out = saev(&dir, &[&"features", &"--sae", &dir, &"--store", &store]);
    refused(&out, &["d_model", "larger than saev accepts"]);
    // A FIFO in place of a shard: refused, no hang.
    let dir = scratch("fifo");
    let store = store_copy(&dir);
    std::fs::remove_file(store.join("acts000001.bin"))?;
    let ok = Command::new("mkfifo")
        .arg(store.join("acts000001.bin"))
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        let sw = sweep(&dir, TOPK);
        let out = saev(
            &dir,
            &[
                &"train",
                &"--store",
                &store,
                &"--sweep",
                &sw,
                &"--out",
                &dir.join("run"),
            ],
        );
        refused(&out, &["acts000001.bin", "not a regular file"]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Arguments out of range.

#[test]
fn out_of_range_arguments_name_the_valid_range() -> TestResult {
    let dir = scratch("args");
    let store = store_copy(&dir);
    let out = saev(
        &dir,
        &[
            &"train",
            &"--store",
            &store,
            &"--out",
            &dir.join("r"),
            &"--n-patches",
            &"0",
        ],
    );
    refused(&out, &["--n-patches", "0"]);
    let out = saev(
        &dir,
        &[
            &"activations",
            &"--data",
            &dir,
            &"--out",
            &dir.join("a"),
            &"--limit",
            &"0",
        ],
    );
    refused(&out, &["--limit", "at least 1"]);
    let out = saev(
        &dir,
        &[
            &"causal",
            &"--sae",
            &dir,
            &"--store",
            &store,
            &"--head",
            &dir,
            &"--latents",
            &"1",
            &"--mult",
            &"NaN",
        ],
    );
    refused(&out, &["--mult", "NaN"]);
    // A model input whose attention scores would not fit in memory (it aborted allocating).
    let model = fixtures().join("backbone/tiny-dinov2");
    let img = fixtures().join("backbone/chelsea.png");
    let out = saev(
        &dir,
        &[&"record", &"--model", &model, &"--size", &"5600", &img],
    );
    refused(&out, &["--size", "5600", "at most"]);
    for (json, field) in [
        (
            r#"{"activation": {"kind": "top_k", "k": 0}, "sweep": [{"lr": 1e-3}]}"#,
            "activation.k",
        ),
        (r#"{"expansion": 0, "sweep": [{"lr": 1e-3}]}"#, "expansion"),
        (r#"{"sweep": [{"lr": -1.0}]}"#, "sweep[0].lr"),
        (
            r#"{"activation": {"kind": "top_k", "k": 4}, "sweep": [{"lr": 1e-3, "k": 0}]}"#,
            "sweep[0].k",
        ),
        (r#"{"sweep": []}"#, "sweep"),
        (
            r#"{"lr_min_frac": 2.0, "sweep": [{"lr": 1e-3}]}"#,
            "lr_min_frac",
        ),
        (
            r#"{"activation": {"kind": "top_k", "k": 1000000}, "sweep": [{"lr": 1e-3}]}"#,
            "activation.k",
        ),
        // TopK has no λ: a λ sweep copied from the ReLU example trained identical SAEs.
        (
            r#"{"activation": {"kind": "top_k", "k": 4}, "sweep": [{"lr": 1e-3, "lambda": 0}, {"lr": 1e-3, "lambda": 5}]}"#,
            "sweep[1].lambda",
        ),
    ] {
        let sw = sweep(&dir, json);
        let run = dir.join(format!("run-{}", field.replace(['[', ']', '.'], "_")));
        let out = saev(
            &dir,
            &[
                &"train", &"--store", &store, &"--sweep", &sw, &"--out", &run,
            ],
        );
        refused(&out, &[field]);
        assert!(
            !run.exists(),
            "{field}: nothing is written for a bad config"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Outputs are bound to their inputs; nothing is overwritten that saev did not write.

#[test]
fn runs_refuse_other_stores_and_foreign_directories() -> TestResult {
    let dir = scratch("bind");
    let store = store_copy(&dir);
    let sw = sweep(&dir, TOPK);
    let run = dir.join("run");
    let out = saev(
        &dir,
        &[
            &"train", &"--store", &store, &"--sweep", &sw, &"--out", &run,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was written into the store (the normalisation statistics are cached elsewhere).
    assert!(!store.join("norm--2-patches.json").exists());
    // The held-out NMSE-vs-L0 chart of the sweep, beside its SAEs.
    let svg = std::fs::read_to_string(run.join("frontier.svg"))?;
    assert!(svg.contains("held-out NMSE vs L0 (1 SAE)"), "{svg}");
    // The same command on another store (one example's values changed size: another store).
    let other = dir.join("other");
    copy_dir(&store, &other);
    edit_json(&other.join("metadata.json"), |v| {
        v["data"] = serde_json::json!("another dataset")
    });
    let before = snapshot(&run);
    let out = saev(
        &dir,
        &[
            &"train", &"--store", &other, &"--sweep", &sw, &"--out", &run,
        ],
    );
    refused(&out, &["another store", "state.json"]);
    assert_eq!(snapshot(&run), before, "the run was changed");
    // Asked for, a fresh sub-directory: the other store's run goes to run/run-1, the old run is
    // untouched, and the same command again resumes (finishes) run-1 rather than adding run-2.
    for _ in 0..2 {
        let out = saev(
            &dir,
            &[
                &"train", &"--store", &other, &"--sweep", &sw, &"--out", &run, &"--fresh",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(run.join("run-1/0/sae.safetensors").is_file());
    assert!(!run.join("run-2").exists());
    let _ = std::fs::remove_dir_all(run.join("run-1"));
    assert_eq!(snapshot(&run), before, "the run was changed");
    // A directory of someone else's files.
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign)?;
    std::fs::write(foreign.join("thesis.tex"), b"\\documentclass{article}")?;
    let out = saev(
        &dir,
        &[
            &"train", &"--store", &store, &"--sweep", &sw, &"--out", &foreign,
        ],
    );
    refused(&out, &["foreign", "did not write"]);
    assert_eq!(std::fs::read_dir(&foreign)?.count(), 1);
    // The browser over a directory it did not write.
    let out = saev(
        &dir,
        &[
            &"browse",
            &"--sae",
            &run.join("0"),
            &"--store",
            &store,
            &"--out",
            &foreign,
        ],
    );
    refused(&out, &["foreign", "did not write", "--force"]);
    assert_eq!(std::fs::read_dir(&foreign)?.count(), 1);
    // A feature pass computed on another store is not reused: the other store gets its own,
    // beside it (this refused, and recomputing for one store replaced the other's pass).
    let ok = saev(
        &dir,
        &[&"features", &"--sae", &run.join("0"), &"--store", &store],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = saev(
        &dir,
        &[&"features", &"--sae", &run.join("0"), &"--store", &other],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fp_of = |p: &Path| -> Result<String, Box<dyn std::error::Error>> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p)?)?;
        Ok(v["store_fingerprint"].as_str().unwrap_or("").to_string())
    };
    let (this_fp, other_fp) = (
        saev::ActivationStore::open(&store)?.fingerprint(),
        saev::ActivationStore::open(&other)?.fingerprint(),
    );
    assert_ne!(this_fp, other_fp);
    assert_eq!(fp_of(&run.join("0/features.json"))?, this_fp);
    let beside: Vec<PathBuf> = std::fs::read_dir(run.join("0"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("features-") && n.ends_with(".json")
            })
        })
        .collect();
    assert_eq!(beside.len(), 1, "{beside:?}");
    assert_eq!(fp_of(&beside[0])?, other_fp);
    // Recomputing either store's pass keeps the other's.
    let ok = saev(
        &dir,
        &[&"features", &"--sae", &run.join("0"), &"--store", &store],
    );
    assert!(ok.status.success());
    assert_eq!(fp_of(&run.join("0/features.json"))?, this_fp);
    assert_eq!(fp_of(&beside[0])?, other_fp);
    // A checkpoint whose per-setting lists were emptied.
    let state = run.join("checkpoint/state.json");
    edit_json(&state, |v| v["threshold"] = serde_json::json!([]));
    let out = saev(
        &dir,
        &[
            &"train", &"--store", &store, &"--sweep", &sw, &"--out", &run,
        ],
    );
    refused(&out, &["state.json", "threshold"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Finite numbers, checked where they enter.

/// A copy of the tiny DINOv2 in `dir/model` with weight `key` replaced by `f(weight)`.
fn tiny_dinov2_with(
    dir: &Path,
    key: &str,
    f: impl FnOnce(&saev::candle_core::Tensor) -> saev::candle_core::Result<saev::candle_core::Tensor>,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    use saev::candle_core::{safetensors, Device};
    let model = dir.join("model");
    copy_dir(&fixtures().join("backbone/tiny-dinov2"), &model);
    let st = model.join("model.safetensors");
    let mut t = safetensors::load(&st, &Device::Cpu)?;
    let w = f(&t[key])?;
    t.insert(key.to_string(), w);
    safetensors::save(&t, &st)?;
    Ok(model)
}

#[test]
fn non_finite_weights_configs_and_data_are_named() -> TestResult {
    use saev::candle_core::{safetensors, Device, Tensor};
    let dir = scratch("finite");
    // A NaN in a model weight.
    let key = "encoder.layer.1.mlp.fc1.weight";
    let model = tiny_dinov2_with(&dir, key, |w| {
        let mut v: Vec<f32> = w.flatten_all()?.to_vec1()?;
        v[5] = f32::NAN;
        Tensor::from_vec(v, w.dims(), &Device::Cpu)
    })?;
    let img = fixtures().join("backbone/astronaut.png");
    let out = saev(
        &dir,
        &[&"record", &"--model", &model, &"--size", &"16", &img],
    );
    refused(&out, &["model.safetensors", key, "non-finite"]);
    // A negative LayerNorm epsilon.
    let model2 = dir.join("model2");
    copy_dir(&fixtures().join("backbone/tiny-dinov2"), &model2);
    edit_json(&model2.join("config.json"), |v| {
        v["layer_norm_eps"] = serde_json::json!(-1e-6)
    });
    let out = saev(
        &dir,
        &[&"record", &"--model", &model2, &"--size", &"16", &img],
    );
    refused(&out, &["config.json", "layer_norm_eps"]);
    // NaN activations in a store: training stops at step 0 naming the example and token.
    let store = store_copy(&dir);
    let shard = store.join("acts000000.bin");
    let mut bytes = std::fs::read(&shard)?;
    for e in 0..3 {
        // example e, layer -2 (position 0), token 2 (a patch), dimension 3
        let at = ((e * 2 * 5 + 2) * 8 + 3) * 4;
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&shard, &bytes)?;
    let sw = sweep(&dir, TOPK);
    let out = saev(
        &dir,
        &[
            &"train",
            &"--store",
            &store,
            &"--sweep",
            &sw,
            &"--out",
            &dir.join("run"),
        ],
    );
    refused(&out, &["non-finite", "dimension 3"]);
    // A NaN in an SAE tensor.
    let sae_dir = dir.join("sae");
    let topk = fixtures().join("sae-headers/schema5-topk.pt");
    let ok = saev(&dir, &[&"sae", &"import", &topk, &"--out", &sae_dir]);
    assert!(ok.status.success());
    let st = sae_dir.join("sae.safetensors");
    let mut t = safetensors::load(&st, &Device::Cpu)?;
    let w = t["W_dec"].clone();
    let mut v: Vec<f32> = w.flatten_all()?.to_vec1()?;
    v[7] = f32::INFINITY;
    t.insert("W_dec".into(), Tensor::from_vec(v, w.dims(), &Device::Cpu)?);
    safetensors::save(&t, &st)?;
    let clean = store_copy(&scratch("finite-clean"));
    let out = saev(&dir, &[&"features", &"--sae", &sae_dir, &"--store", &clean]);
    refused(&out, &["sae.safetensors", "W_dec", "non-finite"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// No panic, no abort on hostile files.

#[test]
fn hostile_files_are_errors_not_panics() -> TestResult {
    let dir = scratch("hostile");
    // An IDX file with a zero side.
    let idx = dir.join("bad-images-idx3-ubyte");
    let mut b = vec![0u8, 0, 8, 3];
    for d in [2u32, 0, 28] {
        b.extend_from_slice(&d.to_be_bytes());
    }
    std::fs::write(&idx, &b)?;
    let model = fixtures().join("backbone/tiny-dinov2");
    let out = activations(&dir, &model, &idx, &dir.join("a"), &[&"--size", &"16"]);
    refused(&out, &["bad-images-idx3-ubyte", "none zero"]);
    // A small PNG declaring a 1 × 65000 image: refused by the decoder's limits, no abort.
    let png = dir.join("tall.png");
    saev::image::GrayImage::new(1, 65000).save(&png)?;
    let out = saev(
        &dir,
        &[&"record", &"--model", &model, &"--size", &"16", &png],
    );
    refused(&out, &["tall.png"]);
    Ok(())
}

/// A NaN in a shard (example 4, patch 1 = token 2 with CLS, layer -2 of the Python-written store) is named where
/// it is, by training and by the feature pass, and no statistics are cached from it (it used
/// to surface as a "diverged" loss blamed on the learning rate, cache null statistics that
/// broke every later run, and vanish from the feature pass).
#[test]
fn a_nan_in_a_shard_is_named_where_it_is() -> TestResult {
    let dir = scratch("nan-shard");
    let store = store_copy(&dir);
    // [3 examples, 2 layers, 5 tokens, 8 dims] per shard: example 4 is row 1 of shard 1.
    let (row, layer, token, dim) = (1usize, 0usize, 2usize, 5usize);
    let at = (((row * 2 + layer) * 5 + token) * 8 + dim) * 4;
    let shard = store.join("acts000001.bin");
    let mut b = std::fs::read(&shard)?;
    b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&shard, b)?;
    let sw = sweep(&dir, TOPK);
    for _ in 0..2 {
        let out = saev(
            &dir,
            &[
                &"train",
                &"--store",
                &store,
                &"--sweep",
                &sw,
                &"--out",
                &dir.join("run"),
            ],
        );
        let e = refused(
            &out,
            &["acts000001.bin", "example 4", "token 1", "non-finite"],
        );
        assert!(!e.contains("diverged"), "{e}");
    }
    // The feature pass of an SAE of this width (the paper-era fixture, d 8).
    let out = saev(
        &dir,
        &[
            &"features",
            &"--sae",
            &fixtures().join("sae-headers/paper.pt"),
            &"--store",
            &store,
        ],
    );
    refused(
        &out,
        &["acts000001.bin", "example 4", "token 1", "non-finite"],
    );
    Ok(())
}

/// A NaN in a training checkpoint is refused where it is read (it resumed into a NaN loss,
/// reported as divergence).
#[test]
fn a_nan_in_a_training_checkpoint_is_named() -> TestResult {
    let dir = scratch("nan-ckpt");
    let store = store_copy(&dir);
    let sw = sweep(&dir, TOPK);
    let run = dir.join("run");
    let args: [&dyn AsRef<std::ffi::OsStr>; 7] = [
        &"train", &"--store", &store, &"--sweep", &sw, &"--out", &run,
    ];
    let out = saev(&dir, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = run.join("checkpoint/state.safetensors");
    let mut b = std::fs::read(&st)?;
    let n = u64::from_le_bytes(b[..8].try_into()?) as usize;
    let at = 8 + n + 4 * 5;
    b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&st, b)?;
    let e = refused(&saev(&dir, &args), &["state.safetensors", "non-finite"]);
    assert!(!e.contains("diverged"), "{e}");
    Ok(())
}

/// Ctrl-C (SIGINT) during training writes a checkpoint and stops with status 130; the same
/// command resumes from it (a killed run used to lose every step since the last `ckpt_every`).
#[test]
fn an_interrupted_training_run_checkpoints_and_resumes() -> TestResult {
    let dir = scratch("sigint");
    let store = store_copy(&dir);
    // Long enough to be interrupted (≈10⁶ steps), no step-count checkpoints.
    let sw = sweep(
        &dir,
        r#"{"activation": {"kind": "top_k", "k": 2}, "expansion": 2, "batch_size": 8,
        "n_patches": 10000000, "sweep": [{"lr": 1e-3}], "n_lr_warmup": 0, "ckpt_every": 0}"#,
    );
    let run = dir.join("run");
    let step_of = || -> u64 {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("checkpoint/state.json")).unwrap())
                .unwrap();
        v["step"].as_u64().unwrap()
    };
    let mut steps = Vec::new();
    for _ in 0..2 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_saev"))
            .env("SAEV_CACHE", dir.join("cache"))
            .args([
                "train".as_ref(),
                "--store".as_ref(),
                store.as_os_str(),
                "--sweep".as_ref(),
                sw.as_os_str(),
                "--out".as_ref(),
                run.as_os_str(),
            ] as [&std::ffi::OsStr; 7])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(2500));
        assert!(child.try_wait()?.is_none(), "finished before the signal");
        let ok = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()?;
        assert!(ok.success());
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{err}");
        assert!(
            err.contains("interrupted") && err.contains("checkpoint"),
            "{err}"
        );
        steps.push(step_of());
    }
    assert!(
        steps[0] > 0 && steps[1] > steps[0],
        "resumed and went on: {steps:?}"
    );
    Ok(())
}

/// `probe --out` never writes over a head or someone's files (it used to replace both).
#[test]
fn probe_refuses_an_existing_head_and_foreign_files() -> TestResult {
    let dir = scratch("probe-out");
    let store = store_copy(&dir);
    for (name, file, needle) in [
        ("head", "head.json", "already holds a head"),
        ("notes", "notes.txt", "not an empty directory"),
    ] {
        let out_dir = dir.join(name);
        std::fs::create_dir_all(&out_dir)?;
        std::fs::write(out_dir.join(file), "mine")?;
        let out = saev(&dir, &[&"probe", &"--store", &store, &"--out", &out_dir]);
        refused(&out, &[out_dir.to_str().unwrap(), needle]);
        assert_eq!(std::fs::read_to_string(out_dir.join(file))?, "mine");
    }
    Ok(())
}

/// A config file's `layer` is the layer trained when --layer is not given (the flag's default
/// used to override it silently); the flag still wins.
#[test]
fn the_config_files_layer_is_trained_unless_the_flag_says_otherwise() -> TestResult {
    let dir = scratch("cfg-layer");
    let store = store_copy(&dir);
    let sw = sweep(&dir, &TOPK.replacen('{', r#"{"layer": -1, "#, 1));
    for (flag, want) in [(None, -1i64), (Some("-2"), -2)] {
        let run = dir.join(format!("run{want}"));
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"train", &"--store", &store, &"--sweep", &sw, &"--out", &run,
        ];
        if let Some(l) = &flag {
            args.extend([&"--layer" as &dyn AsRef<std::ffi::OsStr>, l]);
        }
        let out = saev(&dir, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sae: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("0/sae.json"))?)?;
        assert_eq!(sae["provenance"]["layer"], want, "{sae}");
    }
    Ok(())
}

/// An SAE whose normalisation mean has another width than the SAE is refused naming its
/// sae.json (the error named no file).
#[test]
fn a_norm_of_another_width_names_the_sae_file() -> TestResult {
    let dir = scratch("norm-width");
    let store = store_copy(&dir);
    let sae_dir = import_topk(&dir);
    edit_json(&sae_dir.join("sae.json"), |v| {
        v["norm"] = serde_json::json!({"mean": [0.0, 0.0], "scalar": 1.0})
    });
    let out = saev(&dir, &[&"features", &"--sae", &sae_dir, &"--store", &store]);
    refused(&out, &["sae.json", "norm.mean has 2 values"]);
    Ok(())
}

/// An SAE directory the feature pass cannot be saved into (read-only, or here a directory in
/// the way of its temporary file, which stops root too) still explores, from memory;
/// `features` prints its summary and then reports the failure.
#[test]
fn an_unwritable_sae_directory_still_explores() -> TestResult {
    let dir = scratch("ro-sae");
    let store = store_copy(&dir);
    let sae_dir = import_topk(&dir);
    std::fs::create_dir_all(sae_dir.join("features.safetensors.tmp"))?;
    // The explorer (what browse, causal and the notebooks open) computes and keeps it.
    let ex = saev::Explorer::open(&sae_dir, &saev::ActivationStore::open(&store)?)?;
    assert_eq!(ex.features().d_sae(), ex.sae().d_sae());
    assert!(!sae_dir.join("features.json").exists());
    let out = saev(&dir, &[&"features", &"--sae", &sae_dir, &"--store", &store]);
    let e = refused(&out, &["features.safetensors.tmp"]);
    assert!(e.contains("live of"), "the summary comes first: {e}");
    Ok(())
}

/// `--out` of a grouped sweep, run without `--group`: says so and how to resume (it called
/// saev's own runs files saev did not write).
#[test]
fn a_grouped_sweeps_directory_says_how_to_resume() -> TestResult {
    let dir = scratch("grouped");
    let store = store_copy(&dir);
    let sw = sweep(
        &dir,
        &TOPK.replace(
            r#""sweep": [{"lr": 1e-3}]"#,
            r#""sweep": [{"lr": 1e-3}, {"lr": 3e-3}]"#,
        ),
    );
    let run = dir.join("run");
    let out = saev(
        &dir,
        &[
            &"train", &"--store", &store, &"--sweep", &sw, &"--out", &run, &"--group", &"0/2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = saev(
        &dir,
        &[
            &"train", &"--store", &store, &"--sweep", &sw, &"--out", &run,
        ],
    );
    refused(&out, &["grouped sweep", "--group"]);
    Ok(())
}

/// The schema-5 TopK fixture (d 8) imported into `dir/sae`.
fn import_topk(dir: &Path) -> PathBuf {
    let sae_dir = dir.join("sae");
    let topk = fixtures().join("sae-headers/schema5-topk.pt");
    let ok = saev(dir, &[&"sae", &"import", &topk, &"--out", &sae_dir]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    sae_dir
}

/// Six images recorded as two parts (`--part i/2`, three shards of two examples).
fn record_two_parts(dir: &Path) -> Vec<PathBuf> {
    let data = fixtures().join("backbone");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..6 {
        std::fs::copy(
            data.join(["astronaut.png", "chelsea.png"][i % 2]),
            imgs.join(format!("{i}.png")),
        )
        .unwrap();
    }
    let model = data.join("tiny-dinov2");
    let mut parts = Vec::new();
    for i in 0..2 {
        let out = activations(
            dir,
            &model,
            &imgs,
            &dir.join("parts"),
            &[
                &"--size",
                &"16",
                &"--max-tokens-per-shard",
                &"51",
                &"--part",
                &format!("{i}/2"),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parts.push(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ));
    }
    parts
}

/// Copies of `parts` under `dir/parts` (same names).
fn copy_parts(dir: &Path, parts: &[PathBuf]) -> Vec<PathBuf> {
    parts
        .iter()
        .map(|p| {
            let c = dir.join("parts").join(p.file_name().unwrap());
            copy_dir(p, &c);
            c
        })
        .collect()
}

/// `saev activations merge` of `parts` is refused naming `needles`, and leaves every part as
/// it was.
fn merge_refused_untouched(dir: &Path, parts: &[PathBuf], needles: &[&str]) {
    let before: Vec<_> = parts.iter().map(|p| snapshot(p)).collect();
    let out = merge(dir, parts);
    refused(&out, needles);
    for (p, b) in parts.iter().zip(&before) {
        assert_eq!(&snapshot(p), b, "{} was changed", p.display());
    }
}

fn merge(dir: &Path, parts: &[PathBuf]) -> Output {
    saev(
        dir,
        &[
            &"activations",
            &"merge",
            &parts[0],
            &parts[1],
            &"--out",
            &dir.join("merged"),
        ],
    )
}

/// A part whose labels were truncated: the merge refuses before moving anything.
#[test]
fn merge_validates_every_part_before_moving() -> TestResult {
    let dir = scratch("merge");
    let parts = record_two_parts(&dir);
    // Truncate a shard of part 1.
    let victim = std::fs::read_dir(&parts[1])?
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "bin"))
        .unwrap();
    let len = std::fs::metadata(&victim)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)?
        .set_len(len / 2)?;
    merge_refused_untouched(
        &dir,
        &parts,
        &[victim.file_name().unwrap().to_str().unwrap(), "truncated"],
    );
    Ok(())
}

/// Parts recorded from different files (another copy of the dataset with the same count, or
/// an image changed between parts): the metadata agree, the provenance does not — refused
/// before anything moves (the first part's file list was kept, silently).
#[test]
fn merge_refuses_parts_of_different_files() -> TestResult {
    let dir = scratch("merge-prov");
    let parts = record_two_parts(&dir);
    let prov = parts[1].join("provenance.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&prov)?)?;
    // Another copy's file times alone (each cluster node's own copy) are no difference.
    v["stamp"] = serde_json::json!("another-stamp");
    std::fs::write(&prov, v.to_string())?;
    let copies = scratch("merge-prov-stamp");
    let out = merge(&copies, &copy_parts(&copies, &parts));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another file in the list is.
    let first = v["sources"][0].as_str().unwrap().to_string();
    v["sources"][0] = serde_json::json!(format!("{first}.other.png"));
    std::fs::write(&prov, v.to_string())?;
    merge_refused_untouched(&dir, &parts, &[prov.to_str().unwrap(), "different files"]);
    Ok(())
}

/// Patch labels in one part only: refused before anything moves (the other part's examples
/// used to merge as class 0, silently).
#[test]
fn merge_refuses_side_files_in_some_parts_only() -> TestResult {
    let dir = scratch("merge-sides");
    let parts = record_two_parts(&dir);
    let md: serde_json::Value =
        serde_json::from_slice(&std::fs::read(parts[0].join("metadata.json"))?)?;
    let n = md["n_examples"].as_u64().unwrap() * md["content_tokens_per_example"].as_u64().unwrap();
    std::fs::write(parts[0].join("labels.bin"), vec![1u8; n as usize])?;
    let p1 = parts[1].join("labels.bin");
    merge_refused_untouched(
        &dir,
        &parts,
        &[p1.to_str().unwrap(), "missing in this part"],
    );
    Ok(())
}

/// A merge interrupted after moving some shards (simulated: one shard moved by hand, as the
/// merge moves it) finishes on a rerun, to the store an uninterrupted merge makes.
#[test]
fn an_interrupted_merge_finishes_on_a_rerun() -> TestResult {
    let dir = scratch("merge-rerun");
    let parts = record_two_parts(&dir);
    let whole = scratch("merge-rerun-whole");
    let copies = copy_parts(&whole, &parts);
    let out = merge(&whole, &copies);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());

    let md: serde_json::Value =
        serde_json::from_slice(&std::fs::read(parts[0].join("metadata.json"))?)?;
    let hash = want.file_name().unwrap().to_owned();
    let target = dir.join("merged").join(&hash);
    std::fs::create_dir_all(&target)?;
    let shard = std::fs::read_dir(&parts[1])?
        .map(|e| e.unwrap().file_name())
        .find(|n| n.to_string_lossy().ends_with(".bin"))
        .unwrap();
    std::fs::rename(parts[1].join(&shard), target.join(&shard))?;
    assert_eq!(md["family"], "dinov2");
    let out = merge(&dir, &parts);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let strip = |v: Vec<(PathBuf, Vec<u8>)>, root: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        v.into_iter()
            .map(|(p, b)| (p.strip_prefix(root).unwrap().to_path_buf(), b))
            .collect()
    };
    assert_eq!(
        strip(snapshot(&target), &target),
        strip(snapshot(&want), &want)
    );
    assert!(
        parts.iter().all(|p| !p.exists()),
        "parts removed after the merge"
    );
    // Running the same merge again says where the store went.
    refused(
        &merge(&dir, &parts),
        &["already merged into", target.to_str().unwrap()],
    );
    Ok(())
}

/// A writer killed after its progress file and before metadata.json resumes to the bytes of an
/// uninterrupted run (it used to re-record everything and then fail). Provenance paths are
/// absolute, so the store finds its images from any working directory.
#[test]
fn writer_killed_before_its_metadata_resumes_to_identical_bytes() -> TestResult {
    use sha2::{Digest, Sha256};
    let dir = scratch("killpoint");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs)?;
    let data = fixtures().join("backbone");
    for i in 0..5 {
        std::fs::copy(
            data.join(["astronaut.png", "chelsea.png"][i % 2]),
            imgs.join(format!("{i}.png")),
        )?;
    }
    let model = data.join("tiny-dinov2");
    // Relative --data from inside `dir`: recorded absolute.
    let record = |root: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_saev"))
            .current_dir(&dir)
            .env("SAEV_CACHE", dir.join("cache"))
            .args([
                "activations",
                "--data",
                "imgs",
                "--size",
                "16",
                "--out",
                root,
                "--model",
            ])
            .arg(&model)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let a = record("a");
    let prov = std::fs::read_to_string(dir.join(&a).join("provenance.json"))?;
    assert!(prov.contains(&imgs.display().to_string()), "{prov}");
    // The state a kill leaves: the store directory with only the progress file.
    let b = dir.join("b").join(a.file_name().unwrap());
    std::fs::create_dir_all(&b)?;
    let fp = format!("{:x}", Sha256::digest(format!("{prov}|16x16").as_bytes()));
    std::fs::write(
        b.join(".saev-progress.json"),
        format!(r#"{{"version":1,"fingerprint":"{fp}","batch_size":32,"n_done":0}}"#),
    )?;
    let b2 = record("b");
    assert_eq!(b2, Path::new("b").join(a.file_name().unwrap()));
    let strip = |v: Vec<(PathBuf, Vec<u8>)>, root: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        v.into_iter()
            .map(|(p, bytes)| (p.strip_prefix(root).unwrap().to_path_buf(), bytes))
            .collect()
    };
    assert_eq!(
        strip(snapshot(&dir.join(&b2)), &dir.join(&b2)),
        strip(snapshot(&dir.join(&a)), &dir.join(&a))
    );
    // Killed after metadata.json and before provenance.json.
    let c = dir.join("c").join(a.file_name().unwrap());
    std::fs::create_dir_all(&c)?;
    std::fs::copy(dir.join(&a).join("metadata.json"), c.join("metadata.json"))?;
    std::fs::write(
        c.join(".saev-progress.json"),
        format!(r#"{{"version":1,"fingerprint":"{fp}","batch_size":32,"n_done":0}}"#),
    )?;
    let c2 = record("c");
    assert_eq!(
        strip(snapshot(&dir.join(&c2)), &dir.join(&c2)),
        strip(snapshot(&dir.join(&a)), &dir.join(&a))
    );
    Ok(())
}

/// A symlink loop in an image folder does not multiply examples; a provenance source like
/// `/#0` is an error, not a walk over the whole file system.
#[test]
fn symlink_loops_and_directory_sources_are_harmless() -> TestResult {
    let dir = scratch("links");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(imgs.join("sub"))?;
    let data = fixtures().join("backbone");
    std::fs::copy(data.join("astronaut.png"), imgs.join("a.png"))?;
    std::fs::copy(data.join("chelsea.png"), imgs.join("sub/b.png"))?;
    std::os::unix::fs::symlink(&imgs, imgs.join("sub/loop"))?;
    let ds = saev::Dataset::open(&imgs, None, false)?;
    assert_eq!(ds.len(), 2, "{}", ds.describe());
    // A store whose provenance points at a directory.
    let store = store_copy(&dir);
    let sources: Vec<String> = (0..7).map(|_| "/#0".to_string()).collect();
    let prov = serde_json::json!({"version": 1, "classes": [], "sources": sources, "labels": vec![serde_json::Value::Null; 7]});
    std::fs::write(store.join("provenance.json"), prov.to_string())?;
    let out = import_and_browse(
        &dir,
        &fixtures().join("sae-headers/schema5-topk.pt"),
        &store,
        "1",
    );
    refused(&out, &["/#0"]);
    Ok(())
}

/// A truncated JPEG is refused (Pillow refuses it) instead of decoding to grey rows.
#[test]
fn truncated_jpeg_is_refused() -> TestResult {
    let dir = scratch("jpeg");
    let img = saev::load_image(fixtures().join("backbone/chelsea.png"))?;
    let full = dir.join("cat.jpg");
    img.save(&full)?;
    assert!(saev::load_image(&full).is_ok());
    let bytes = std::fs::read(&full)?;
    let cut = dir.join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3])?;
    let model = fixtures().join("backbone/tiny-dinov2");
    let out = saev(
        &dir,
        &[&"record", &"--model", &model, &"--size", &"16", &cut],
    );
    refused(&out, &["cut.jpg", "truncated"]);
    Ok(())
}

/// `--skip-bad` drops a JPEG cut short (it used to check the header only, and the recording
/// then stopped at that file) and keeps one with data after its end marker (a motion photo's
/// video), which decodes as Pillow decodes it.
#[test]
fn skip_bad_drops_a_cut_jpeg_and_keeps_a_motion_photo() -> TestResult {
    let dir = scratch("jpeg-skip");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs)?;
    let img = saev::load_image(fixtures().join("backbone/chelsea.png"))?;
    let full = imgs.join("a-cat.jpg");
    img.save(&full)?;
    let bytes = std::fs::read(&full)?;
    std::fs::write(imgs.join("b-cut.jpg"), &bytes[..bytes.len() * 2 / 3])?;
    // A PNG cut short too.
    let png = std::fs::read(fixtures().join("backbone/chelsea.png"))?;
    std::fs::write(imgs.join("d-cut.png"), &png[..png.len() / 2])?;
    let mut motion = bytes.clone();
    motion.extend_from_slice(b"\0\0\0\x18ftypmp42 and a video after it");
    std::fs::write(imgs.join("c-motion.jpg"), &motion)?;
    let model = fixtures().join("backbone/tiny-dinov2");
    let out_dir = dir.join("acts");
    let out = activations(
        &dir,
        &model,
        &imgs,
        &out_dir,
        &[&"--size", &"16", &"--skip-bad"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("skipping unreadable image") && err.contains("b-cut.jpg"),
        "{err}"
    );
    assert!(err.contains("d-cut.png"), "{err}");
    assert!(
        !err.contains("a-cat.jpg") && !err.contains("c-motion.jpg"),
        "{err}"
    );
    let store = std::fs::read_dir(&out_dir)?
        .map(|e| e.unwrap().path())
        .find(|p| p.join("metadata.json").exists())
        .expect("a store");
    let store = saev::ActivationStore::open(store)?;
    assert_eq!(store.n_examples(), 2);
    // The motion photo's pixels are the plain JPEG's: the same activations.
    assert_eq!(store.example(0)?, store.example(1)?);
    Ok(())
}

/// Import a Python `sae.pt` and browse it on `store` (at most `pages` latent pages).
fn import_and_browse(dir: &Path, pt: &Path, store: &Path, pages: &str) -> Output {
    let sae_dir = dir.join("sae");
    assert!(saev(dir, &[&"sae", &"import", &pt, &"--out", &sae_dir])
        .status
        .success());
    saev(
        dir,
        &[
            &"browse",
            &"--sae",
            &sae_dir,
            &"--store",
            &store,
            &"--out",
            &dir.join("site"),
            &"--max-pages",
            &pages,
        ],
    )
}

/// A file name that is not UTF-8 is recorded losslessly (`b64:` in provenance.json), and the
/// store finds the image again (here through the browser's exemplar grids).
#[test]
fn non_utf8_file_names_are_recorded_losslessly() -> TestResult {
    use std::os::unix::ffi::OsStrExt;
    let dir = scratch("nonutf8");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs)?;
    let data = fixtures().join("backbone");
    let odd = imgs.join(std::ffi::OsStr::from_bytes(b"caf\xe9.png"));
    std::fs::copy(data.join("chelsea.png"), &odd)?;
    std::fs::copy(data.join("astronaut.png"), imgs.join("plain.png"))?;
    let model = data.join("tiny-dinov2-reg");
    let out = activations(&dir, &model, &imgs, &dir.join("acts"), &[&"--size", &"16"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let prov = std::fs::read_to_string(store.join("provenance.json"))?;
    assert!(prov.contains("b64:"), "{prov}");
    let out = import_and_browse(&dir, &fixtures().join("notebook/topk-d32.pt"), &store, "3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// An image that fails to decode part-way through a recording, with readers running ahead of the
/// model: a clear error naming the file, and every reader stops (no hang waiting for a model
/// that has stopped taking batches).
#[test]
fn a_bad_image_mid_recording_stops_every_reader() -> TestResult {
    let dir = scratch("bad-mid-recording");
    let data = fixtures().join("backbone");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs)?;
    for i in 0..40 {
        std::fs::copy(data.join("astronaut.png"), imgs.join(format!("{i:02}.png")))?;
    }
    // Damage the middle of image 20's compressed data: its header and end stay intact (so the
    // dataset opens), its decoding fails. The model (at 224 px, 3,137 tokens) is slower than the
    // readers, which wait at the edge of their window when it fails.
    let bad = imgs.join("20.png");
    let mut bytes = std::fs::read(&bad)?;
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&bad, bytes)?;
    let out = activations(
        &dir,
        &data.join("tiny-dinov2"),
        &imgs,
        &dir.join("acts"),
        &[&"--batch-size", &"1", &"--readers", &"4"],
    );
    refused(&out, &["20.png"]);
    Ok(())
}

/// A model whose finite weights overflow: the recording stops at the first batch with an error
/// naming the example and where in it, writes nothing of that batch, and leaves the run
/// resumable (its progress file at 0). The error comes from the store's writer thread while the
/// model and the readers run ahead: every thread stops.
#[test]
fn activations_that_overflow_are_named_and_nothing_is_written() -> TestResult {
    use saev::candle_core::{Device, Tensor};
    let dir = scratch("overflow");
    let model = tiny_dinov2_with(&dir, "encoder.layer.0.mlp.fc2.weight", |w| {
        Tensor::full(f32::MAX, w.dims(), &Device::Cpu)?.contiguous()
    })?;
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs)?;
    for i in 0..12 {
        std::fs::copy(
            fixtures().join("backbone/astronaut.png"),
            imgs.join(format!("{i:02}.png")),
        )?;
    }
    let out = activations(
        &dir,
        &model,
        &imgs,
        &dir.join("acts"),
        &[&"--size", &"16", &"--batch-size", &"2"],
    );
    refused(
        &out,
        &[
            "non-finite activation",
            "example 0",
            "00.png",
            "nothing of this batch was written",
        ],
    );
    let store = std::fs::read_dir(dir.join("acts"))?
        .next()
        .ok_or("no store directory")??
        .path();
    let progress: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join(".saev-progress.json"))?)?;
    assert_eq!(progress["n_done"], 0, "{progress}");
    Ok(())
}
