//! The Slurm array scripts (`scripts/slurm/`), run as the scheduler would: every task's command
//! line with `SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT` set, then the merge. Recording in
//! 3 parts and merging gives the same store, byte for byte, as one run; training a 4-setting
//! sweep as 2 groups gives the same SAEs as one run of the whole sweep.

mod common;

use common::TestResult;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_saev")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/slurm")
        .join(name)
}

/// Run `bash script` with `env`, as task `task` of `n` (None: not an array task).
fn run(script_name: &str, env: &[(&str, &Path)], args: &str, task: Option<(usize, usize)>) {
    let mut c = Command::new("bash");
    c.arg(script(script_name))
        .env("SAEV", bin())
        .env("SAEV_ARGS", args)
        .env("SAEV_PROGRESS", "off")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("SLURM_ARRAY_TASK_MIN")
        .env_remove("SLURM_ARRAY_TASK_MAX");
    for (k, v) in env {
        c.env(k, v);
    }
    if let Some((i, n)) = task {
        c.env("SLURM_ARRAY_TASK_ID", i.to_string())
            .env("SLURM_ARRAY_TASK_COUNT", n.to_string())
            .env("SLURM_ARRAY_TASK_MIN", "0")
            .env("SLURM_ARRAY_TASK_MAX", (n - 1).to_string());
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{script_name} {task:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `c` (a `saev` command, progress off); fail the test when it fails.
fn ok(c: &mut Command) {
    let out = c.env("SAEV_PROGRESS", "off").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn array_jobs_record_merge_and_train_like_one_run() -> TestResult {
    let dir = common::scratch("slurm");
    let fx = common::fixtures_root().join("backbone");
    let data = dir.join("images");
    std::fs::create_dir_all(&data)?;
    for i in 0..10 {
        let src = if i % 3 == 0 {
            "astronaut.png"
        } else {
            "chelsea.png"
        };
        std::fs::copy(fx.join(src), data.join(format!("{i:02}.png")))?;
    }
    let model = fx.join("tiny-dinov2");
    // 17 tokens per example, 2 examples per shard: 5 shards over 3 parts.
    let rec_args = "--size 16 --batch-size 3 --max-tokens-per-shard 34";
    let arr = dir.join("array");
    let env = [
        ("MODEL", model.as_path()),
        ("DATA", data.as_path()),
        ("OUT", arr.as_path()),
    ];
    for i in 0..3 {
        run("record.sbatch", &env, rec_args, Some((i, 3)));
    }
    run("merge.sbatch", &[("OUT", arr.as_path())], "", None);
    // One run of the same command line, without --part.
    let single = dir.join("single");
    ok(Command::new(bin())
        .args(["activations", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&single)
        .args(rec_args.split(' ')));
    let store_of = |root: &Path| -> PathBuf {
        std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.join("metadata.json").is_file())
            .unwrap_or_else(|| panic!("no store under {}", root.display()))
    };
    let (merged, one) = (store_of(&arr), store_of(&single));
    assert_eq!(merged.file_name(), one.file_name(), "same store hash");
    let (a, b) = (files(&merged), files(&one));
    assert_eq!(
        a.iter().map(|f| &f.0).collect::<Vec<_>>(),
        b.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert!(a.iter().filter(|f| f.0.starts_with("acts")).count() == 5);
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            x == y,
            "{name} differs between the merged and the single store"
        );
    }

    // Training: a 4-setting TopK sweep as 2 array tasks vs one run.
    let sweep = dir.join("sweep.json");
    std::fs::write(
        &sweep,
        r#"{"activation": {"kind": "top_k", "k": 4}, "expansion": 2, "batch_size": 16,
            "n_patches": 320, "n_lr_warmup": 2, "holdout_examples": 1, "ckpt_every": 5,
            "sweep": [{"lr": 1e-3, "lambda": 0}, {"lr": 3e-3, "lambda": 0},
                      {"lr": 1e-2, "lambda": 0}, {"lr": 3e-2, "lambda": 0}]}"#,
    )?;
    let runs = dir.join("runs");
    let env = [
        ("STORE", merged.as_path()),
        ("SWEEP", sweep.as_path()),
        ("OUT", runs.as_path()),
    ];
    for i in 0..2 {
        run("train.sbatch", &env, "", Some((i, 2)));
    }
    let all = dir.join("all");
    ok(Command::new(bin())
        .args(["train", "--store"])
        .arg(&merged)
        .arg("--sweep")
        .arg(&sweep)
        .arg("--out")
        .arg(&all));
    for (group, k) in [(0, 0), (0, 1), (1, 2), (1, 3)] {
        let g = std::fs::read(runs.join(format!("group-{group}/{k}/sae.safetensors")))?;
        let w = std::fs::read(all.join(format!("{k}/sae.safetensors")))?;
        assert!(
            g == w,
            "setting {k}: group {group}'s SAE differs from the whole sweep's"
        );
    }
    // Outside an array, `auto` says what is missing.
    let out = Command::new(bin())
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .args(["train", "--store"])
        .arg(&merged)
        .arg("--out")
        .arg(dir.join("x"))
        .args(["--group", "auto"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SLURM_ARRAY_TASK_ID") && err.contains("sbatch --array"),
        "{err}"
    );
    Ok(())
}
