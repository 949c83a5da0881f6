//! Training a sweep on a store with a planted sparse dictionary: the loss falls, the λ warm-up
//! really ramps, each SAE is saved with its normalisation and reloads identically.

mod common;

use common::TensorExt;

use saev::candle_core::{Device, Tensor};
use saev::{ActivationStore, Metadata, Setting, StoreWriter, TrainConfig};

fn planted_store(root: &std::path::Path) -> ActivationStore {
    let (n, content, d) = (200usize, 8usize, 16usize);
    let md = Metadata {
        family: "dinov2".into(),
        ckpt: "synthetic".into(),
        layers: vec![-2],
        content_tokens_per_example: content,
        cls_token: true,
        d_model: d,
        n_examples: n,
        max_tokens_per_shard: 2_000,
        data: "planted".into(),
        dataset: "planted".into(),
        pixel_agg: "majority".into(),
        dtype: "float32".into(),
        protocol: saev::PROTOCOL.into(),
    };
    // 32 random unit atoms; each vector = 2 atoms with positive weights + an offset.
    let atoms: Vec<f32> = Tensor::randn(0f32, 1.0, (32, d), &Device::Cpu)
        .unwrap()
        .flat();
    let mut acts = Vec::new();
    let mut s = 12345u64;
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as usize
    };
    for _ in 0..n * (content + 1) {
        let (a, b) = (rnd() % 32, rnd() % 32);
        let (wa, wb) = (
            1.0 + (rnd() % 100) as f32 / 50.0,
            1.0 + (rnd() % 100) as f32 / 50.0,
        );
        for j in 0..d {
            acts.push(wa * atoms[a * d + j] + wb * atoms[b * d + j] + 5.0);
        }
    }
    let mut w = StoreWriter::create(root, md, None).unwrap();
    w.write_examples(0, &acts).unwrap();
    ActivationStore::open(w.finish().unwrap()).unwrap()
}

#[test]
fn sweep_trains_and_saves() {
    let dir = std::env::temp_dir().join(format!("saev-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = planted_store(&dir.join("store"));
    let cfg = TrainConfig::new(-2)
        .with_expansion(4)
        .with_batch_size(128)
        .with_n_patches(128 * 150)
        .with_warmup(10, 20)
        .with_sweep(vec![
            Setting {
                lr: 3e-3,
                lambda: 1e-3,
            },
            Setting {
                lr: 1e-3,
                lambda: 1e-2,
            },
        ]);
    let saes = saev::train_saes(&store, &cfg, &dir.join("run")).unwrap();
    assert_eq!(saes.len(), 2);
    let hist = std::fs::read_to_string(dir.join("run/history.csv")).unwrap();
    let rows: Vec<Vec<f64>> = hist
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    let of = |k: f64| {
        rows.iter()
            .filter(|r| r[2] == k)
            .cloned()
            .collect::<Vec<_>>()
    };
    let s0 = of(0.0);
    // Epochs of 1,600 patches end in a short batch, so 150+ steps: a row every 10.
    assert!(s0.len() >= 15, "{} rows", s0.len());
    let (first_mse, last_mse) = (s0[0][6], s0[s0.len() - 1][6]);
    assert!(last_mse < 0.3 * first_mse, "MSE {first_mse} -> {last_mse}");
    // λ ramps linearly over 20 steps, then stays.
    assert!(
        (s0[0][4] - 1e-3 / 20.0).abs() < 1e-9
            && (s0[1][4] - 11.0 * 1e-3 / 20.0).abs() < 1e-9
            && s0[5][4] == 1e-3,
        "{:?}",
        s0.iter().map(|r| r[4]).collect::<Vec<_>>()
    );
    // The larger λ gives sparser codes.
    let s1 = of(1.0);
    assert!(
        s1[s1.len() - 1][7] < s0[s0.len() - 1][7],
        "L0 {} vs {}",
        s1[s1.len() - 1][7],
        s0[s0.len() - 1][7]
    );
    // Saved with the store's normalisation; reloads to the same codes on raw inputs.
    let back = saev::Sae::load(&dir.join("run/0")).unwrap();
    assert_eq!(
        back.config().norm.as_ref().unwrap().scalar,
        store.norm_stats(-2, saev::Tokens::Patches).unwrap().scalar
    );
    let x = Tensor::from_vec(
        store.patch(3, -2, 1).unwrap().to_vec(),
        (1, 16),
        &Device::Cpu,
    )
    .unwrap();
    let a: Vec<f32> = saes[0].encode(&x).unwrap().flat();
    let b: Vec<f32> = back.encode(&x).unwrap().flat();
    assert_eq!(a, b);
    // Reconstruction of a raw vector through normalise → encode → decode is close.
    let xn = saes[0].normalize(&x).unwrap();
    let xh = saes[0].decode(&saes[0].encode(&x).unwrap()).unwrap();
    let err: f32 = (&xh - &xn)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let tot: f32 = xn.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(err < 0.5 * tot, "relative error {}", err / tot);
}
