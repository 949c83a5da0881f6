//! The training step against independent references: candle's autograd on the dense model,
//! closed forms, and the dense kernels for the sparse ones.

use super::*;
use crate::sae::linalg::select_topk_masked;
use candle_core::{Device, Tensor, Var};

fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let z = crate::util::rng::splitmix64(seed.wrapping_mul(1_000_003) + i as u64);
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

/// Indices (row-major flat) kept by a plain sort: per row top k (or over the whole batch),
/// positive only, optionally among `allowed` latents — an independent restatement.
fn chosen(pre: &[f32], s: usize, k: usize, batch: bool, allowed: Option<&[bool]>) -> Vec<bool> {
    let mut keep = vec![false; pre.len()];
    let ok = |i: usize| pre[i] > 0.0 && allowed.is_none_or(|a| a[i % s]);
    let mut take = |mut ids: Vec<usize>, k: usize| {
        ids.retain(|&i| ok(i));
        ids.sort_by(|&a, &b| pre[b].total_cmp(&pre[a]).then(a.cmp(&b)));
        for &i in ids.iter().take(k) {
            keep[i] = true;
        }
    };
    if batch {
        take((0..pre.len()).collect(), k * pre.len() / s);
    } else {
        for r in 0..pre.len() / s {
            take((r * s..(r + 1) * s).collect(), k);
        }
    }
    keep
}

fn reference(st: &TrainState, x: &[f32], n: usize, lambda: f64) -> Grads {
    let (d, s) = (st.d, st.s);
    let dev = Device::Cpu;
    let t = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &dev).unwrap();
    let we = Var::from_tensor(&t(&st.w_enc, &[s, d])).unwrap();
    let be = Var::from_tensor(&t(&st.b_enc, &[s])).unwrap();
    let wd = Var::from_tensor(&t(&st.w_dec, &[s, d])).unwrap();
    let bd = Var::from_tensor(&t(&st.b_dec, &[d])).unwrap();
    let xt = t(x, &[n, d]);
    let pre = xt
        .broadcast_sub(bd.as_tensor())
        .unwrap()
        .matmul(&we.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(be.as_tensor())
        .unwrap();
    let pre_v: Vec<f32> = pre.flatten_all().unwrap().to_vec1().unwrap();
    // JumpReLU: θ = exp(ln θ) as a variable; the paper's straight-through estimator written
    // as a surrogate, (θ − sg(θ)) · c, whose value is 0 and whose θ-gradient is c.
    let lt = Var::from_tensor(&t(&st.log_threshold, &[st.log_threshold.len()])).unwrap();
    let theta_v = st.thresholds();
    let mask: Vec<bool> = match st.recipe.activation {
        TrainActivation::Relu => pre_v.iter().map(|&v| v > 0.0).collect(),
        TrainActivation::TopK { k } => chosen(&pre_v, s, k, false, None),
        TrainActivation::BatchTopK { k } => chosen(&pre_v, s, k, true, None),
        TrainActivation::JumpRelu { .. } => pre_v
            .iter()
            .enumerate()
            .map(|(i, &v)| v > theta_v[i % s])
            .collect(),
    };
    let as_t = |m: &[bool]| {
        t(
            &m.iter()
                .map(|&b| f32::from(u8::from(b)))
                .collect::<Vec<_>>(),
            &[n, s],
        )
    };
    let mut f = (&pre * as_t(&mask)).unwrap();
    let mut l0_surrogate = None;
    if let TrainActivation::JumpRelu { bandwidth, .. } = st.recipe.activation {
        // K((pre − θ)/ε)/ε: the rectangle of width ε around θ.
        let k_v: Vec<f32> = pre_v
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if (v - theta_v[i % s]).abs() < bandwidth / 2.0 {
                    1.0 / bandwidth
                } else {
                    0.0
                }
            })
            .collect();
        let theta = lt.as_tensor().exp().unwrap();
        let zero_with_grad = (&theta - theta.detach())
            .unwrap()
            .broadcast_as((n, s))
            .unwrap();
        let theta_b: Vec<f32> = (0..n * s).map(|i| theta_v[i % s]).collect();
        // ∂f/∂θ = −θ K/ε; ∂H/∂θ = −K/ε.
        let df_dtheta = (t(&k_v, &[n, s]) * t(&theta_b, &[n, s]))
            .unwrap()
            .neg()
            .unwrap();
        f = (f + (&zero_with_grad * df_dtheta).unwrap()).unwrap();
        let dh_dtheta = t(&k_v, &[n, s]).neg().unwrap();
        let count = mask.iter().filter(|&&m| m).count() as f64;
        let l0 = ((zero_with_grad * dh_dtheta).unwrap().sum_all().unwrap() + count).unwrap();
        l0_surrogate = Some((l0 / n as f64).unwrap());
    }
    let ends = st.group_ends();
    let g = ends.len() as f64;
    let mut loss = Tensor::zeros((), candle_core::DType::F32, &dev).unwrap();
    let mut last = None;
    for &e in &ends {
        let xh = f
            .narrow(1, 0, e)
            .unwrap()
            .matmul(&wd.as_tensor().narrow(0, 0, e).unwrap())
            .unwrap()
            .broadcast_add(bd.as_tensor())
            .unwrap();
        let mse = (&xh - &xt).unwrap().sqr().unwrap().mean_all().unwrap();
        loss = (loss + (mse / g).unwrap()).unwrap();
        last = Some(xh);
    }
    if matches!(st.recipe.activation, TrainActivation::Relu) {
        let l1 = (f.sum_all().unwrap() / n as f64).unwrap();
        loss = (loss + (l1 * lambda).unwrap()).unwrap();
    }
    if let Some(l0) = l0_surrogate {
        // The paper's λ: L0 against MSE summed over d, so λ/d against saev's mean MSE.
        loss = (loss + (l0 * (lambda / d as f64)).unwrap()).unwrap();
    }
    if st.recipe.aux_k > 0 {
        let resid = (&xt - last.unwrap()).unwrap().detach();
        let rv: Vec<f32> = resid.flatten_all().unwrap().to_vec1().unwrap();
        let z_var = total_variance(&rv, n, d);
        let am = chosen(&pre_v, s, st.recipe.aux_k, false, Some(&st.dead_mask()));
        let z = (&pre * as_t(&am)).unwrap();
        let eh = z.matmul(wd.as_tensor()).unwrap();
        let a = ((eh - resid).unwrap().sqr().unwrap().sum_all().unwrap() / z_var).unwrap();
        loss = (loss + (a * st.recipe.aux_coef).unwrap()).unwrap();
    }
    let gr = loss.backward().unwrap();
    let get = |v: &Var| -> Vec<f32> {
        gr.get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut w_dec = get(&wd);
    if st.recipe.unit_norm_decoder {
        for (g, w) in w_dec.chunks_mut(d).zip(st.w_dec.chunks(d)) {
            let p: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
            g.iter_mut().zip(w).for_each(|(g, w)| *g -= p * w);
        }
    }
    Grads {
        w_enc: get(&we),
        b_enc: get(&be),
        w_dec,
        b_dec: get(&bd),
        log_threshold: if st.log_threshold.is_empty() {
            Vec::new()
        } else {
            get(&lt)
        },
    }
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let m = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |x, (p, q)| x.max((p - q).abs())) / m
}

/// A sparse-kernel state of `(d, s)` with random weights (`seed` for the encoder, fixed
/// seeds for the rest) and every third latent dead, so AuxK has work.
fn test_state(
    activation: TrainActivation,
    groups: Vec<usize>,
    aux_k: usize,
    unit_norm_decoder: bool,
    (d, s): (usize, usize),
    seed: u64,
) -> TrainState {
    let recipe = Recipe {
        activation,
        groups,
        aux_k,
        aux_coef: 1.0 / 32.0,
        dead_window_patches: 100,
        unit_norm_decoder,
        max_grad_norm: None,
        kernels: Kernels::Sparse,
        dense_above: 0.05,
        relu_init_density: None,
    };
    let mut st = TrainState::new(
        rnd(s * d, seed, 0.4),
        rnd(s, 2, 0.1),
        rnd(s * d, 3, 0.4),
        rnd(d, 4, 0.2),
        recipe,
    )
    .unwrap();
    for i in (0..s).step_by(3) {
        st.since_fired[i] = 1000;
    }
    st
}

thread_local! {
    /// Rows per pass of the latent-major gradient pass, for tests on small batches.
    pub(super) static CHUNK_ROWS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The latent-major gradient pass taken in chunks of rows gives the one-pass gradients bit
/// for bit (the sums per latent keep their order), for chunk sizes that do and do not
/// divide the batch — with AuxK and groups, whose passes share the code.
#[test]
fn chunked_gradient_passes_give_the_one_pass_result() {
    let (n, d, s) = (23, 8, 24);
    for (ci, (act, groups, aux_k)) in [
        (TrainActivation::Relu, vec![], 0),
        (TrainActivation::TopK { k: 4 }, vec![8, 24], 2),
    ]
    .into_iter()
    .enumerate()
    {
        let st = test_state(act, groups, aux_k, true, (d, s), 11 + ci as u64);
        let x = rnd(n * d, 15 + ci as u64, 1.5);
        let mut scratch = Scratch::default();
        let (_, one) = st.gradients(&x, n, 0.05, &mut scratch).unwrap();
        assert!(
            chunk_rows(d) >= n,
            "the default takes this batch in one pass"
        );
        for rows in [1, 5, 22] {
            CHUNK_ROWS.set(Some(rows));
            let (_, g) = st.gradients(&x, n, 0.05, &mut scratch).unwrap();
            CHUNK_ROWS.set(None);
            for (name, a, b) in [
                ("w_enc", &g.w_enc, &one.w_enc),
                ("b_enc", &g.b_enc, &one.b_enc),
                ("w_dec", &g.w_dec, &one.w_dec),
            ] {
                assert!(a.iter().any(|&v| v != 0.0), "case {ci} {name}: all zero");
                assert_eq!(a, b, "case {ci} {name}, chunks of {rows} rows");
            }
        }
    }
}

#[test]
fn sparse_dense_and_autograd_gradients_agree() {
    let (n, d, s) = (16, 8, 24);
    let cases = [
        (TrainActivation::Relu, vec![], 0),
        (TrainActivation::Relu, vec![6, 12, 24], 0),
        (TrainActivation::TopK { k: 3 }, vec![], 4),
        (TrainActivation::TopK { k: 4 }, vec![8, 24], 2),
        (TrainActivation::BatchTopK { k: 3 }, vec![], 0),
        (TrainActivation::BatchTopK { k: 2 }, vec![4, 10, 24], 3),
        (
            TrainActivation::JumpRelu {
                bandwidth: 0.4,
                init_threshold: 0.1,
                init_density: None,
            },
            vec![],
            0,
        ),
        (
            TrainActivation::JumpRelu {
                bandwidth: 0.3,
                init_threshold: 0.2,
                init_density: None,
            },
            vec![6, 12, 24],
            2,
        ),
    ];
    for (ci, (act, groups, aux_k)) in cases.into_iter().enumerate() {
        let mut st = test_state(act, groups, aux_k, ci % 2 == 0, (d, s), 1 + ci as u64);
        st.normalise_decoder();
        // Thresholds spread over 0.05..0.65, so the STE window catches some entries.
        for (i, lt) in st.log_threshold.iter_mut().enumerate() {
            *lt = (0.05 + 0.6 * ((i * 7) % s) as f32 / s as f32).ln();
        }
        let x = rnd(n * d, 5 + ci as u64, 1.5);
        let mut scratch = Scratch::default();
        let (ss, gs) = st.gradients(&x, n, 0.05, &mut scratch).unwrap();
        st.recipe.kernels = Kernels::Dense;
        let (sd, gd) = st.gradients(&x, n, 0.05, &mut scratch).unwrap();
        assert!(!ss.dense && sd.dense);
        assert!(
            (ss.loss - sd.loss).abs() <= 1e-6 * ss.loss.abs(),
            "case {ci}: loss"
        );
        let gr = reference(&st, &x, n, 0.05);
        for (name, a, b, r) in [
            ("w_enc", &gs.w_enc, &gd.w_enc, &gr.w_enc),
            ("b_enc", &gs.b_enc, &gd.b_enc, &gr.b_enc),
            ("w_dec", &gs.w_dec, &gd.w_dec, &gr.w_dec),
            ("b_dec", &gs.b_dec, &gd.b_dec, &gr.b_dec),
            (
                "log_threshold",
                &gs.log_threshold,
                &gd.log_threshold,
                &gr.log_threshold,
            ),
        ] {
            assert_eq!((a.len(), b.len()), (r.len(), r.len()), "case {ci} {name}");
            assert!(
                rel(a, b) <= 1e-5,
                "case {ci} {name}: sparse vs dense {}",
                rel(a, b)
            );
            assert!(
                rel(a, r) <= 1e-5,
                "case {ci} {name}: sparse vs autograd {}",
                rel(a, r)
            );
        }
        if aux_k > 0 {
            assert!(ss.aux > 0.0, "case {ci}: AuxK had dead latents to use");
        }
        if !st.log_threshold.is_empty() {
            assert!(
                gs.log_threshold.iter().filter(|&&g| g != 0.0).count() >= s / 4,
                "case {ci}: the STE window caught too few latents to test"
            );
        }
    }
}

/// The encoder of a TopK / ReLU / TopK + AuxK step at sizes where the bf16 screen runs (on
/// AMX; elsewhere both sides are the f32 path) selects what the f32 GEMM's pre-activations
/// select, with their values up to f32 rounding.
#[test]
fn the_screened_encoder_selects_what_the_f32_encoder_selects() {
    let (n, d, s) = (600, 64, 1024);
    let x = rnd(n * d, 7, 1.0);
    let cases = [
        (TrainActivation::TopK { k: 16 }, 0),
        (TrainActivation::Relu, 0),
        (TrainActivation::TopK { k: 16 }, 4),
    ];
    for (act, aux_k) in cases {
        let recipe = Recipe {
            activation: act,
            groups: vec![],
            aux_k,
            aux_coef: 1.0 / 32.0,
            dead_window_patches: 100,
            unit_norm_decoder: true,
            max_grad_norm: None,
            kernels: Kernels::Auto,
            dense_above: 0.05,
            relu_init_density: None,
        };
        // b_enc −0.7: a ReLU keeps about 2% (pre-activations have std ≈ 0.33).
        let mut st = TrainState::new(
            rnd(s * d, 1, 0.125),
            vec![-0.7; s],
            rnd(s * d, 3, 0.125),
            rnd(d, 4, 0.1),
            recipe,
        )
        .unwrap();
        // A third of the latents dead, for AuxK.
        for c in st.since_fired.iter_mut().step_by(3) {
            *c = 1000;
        }
        let mut scratch = Scratch::default();
        let enc = st.encode(&x, n, &mut scratch);
        let got = enc.f;
        let mut pre = Vec::new();
        st.pre_activations(&x, n, &mut pre, true);
        let keep = match act {
            TrainActivation::TopK { k } => chosen(&pre, s, k, false, None),
            _ => pre.iter().map(|&v| v > 0.0).collect(),
        };
        let want: Vec<usize> = (0..n * s).filter(|&i| keep[i]).collect();
        let got_at: Vec<usize> = (0..n)
            .flat_map(|r| got.row(r).0.iter().map(move |&j| r * s + j as usize))
            .collect();
        assert_eq!(got_at, want, "{act:?}");
        assert!(want.len() > n, "{act:?}: {} selected", want.len());
        for (&at, &v) in got_at.iter().zip(&got.val) {
            assert!(
                (v - pre[at]).abs() <= 1e-5,
                "{act:?} at {at}: {v} vs {}",
                pre[at]
            );
        }
        let dead = st.dead_mask();
        assert_eq!(enc.aux.is_some(), aux_k > 0);
        if let Some(aux) = enc.aux {
            let want = select_topk_masked(&pre, s, aux_k, &dead);
            assert_eq!((&aux.ptr, &aux.idx), (&want.ptr, &want.idx), "AuxK");
            assert!(aux.idx.iter().all(|&j| dead[j as usize]) && aux.nnz() > n);
            for (a, b) in aux.val.iter().zip(&want.val) {
                assert!((a - b).abs() <= 1e-5, "AuxK: {a} vs {b}");
            }
        }
    }
}

/// ReLU's first-batch start: with `b_enc` lowered by each latent's `(1 − p)` quantile (rank
/// `round((1 − p)(n − 1))` of `n` pre-activations), exactly the `n − 1 − rank` rows above it
/// fire on that batch — 20 of 201 at p = 0.1 — whatever the weights (21 when rounding leaves
/// the quantile's own row, now at 0, a hair above); without it, about half.
#[test]
fn relu_first_batch_start_fires_each_latent_on_its_density() {
    let (d, s, n) = (6, 16, 201);
    let recipe = |p: Option<f32>| Recipe {
        activation: TrainActivation::Relu,
        groups: vec![],
        aux_k: 0,
        aux_coef: 0.0,
        dead_window_patches: 1 << 20,
        unit_norm_decoder: true,
        max_grad_norm: None,
        kernels: Kernels::Auto,
        dense_above: 0.05,
        relu_init_density: p,
    };
    let x = rnd(n * d, 9, 1.0);
    let mk = |p| {
        TrainState::new(
            rnd(s * d, 5, 0.5),
            rnd(s, 6, 0.3),
            rnd(s * d, 7, 0.5),
            rnd(d, 8, 0.1),
            recipe(p),
        )
        .unwrap()
    };
    let mut sc = Scratch::default();
    let (_, fired) = mk(Some(0.1)).step(&x, n, 0.0, 0.0, &mut sc).unwrap();
    assert!(fired.iter().all(|&c| c == 20 || c == 21), "{fired:?}");
    assert!(
        fired.iter().filter(|&&c| c == 20).count() > s / 2,
        "{fired:?}"
    );
    let (_, fired) = mk(None).step(&x, n, 0.0, 0.0, &mut sc).unwrap();
    let mean = fired.iter().sum::<u32>() as f64 / s as f64;
    assert!(mean > 40.0, "{fired:?}");
}

#[test]
fn bad_groups_and_shapes_are_errors() {
    let recipe = Recipe {
        activation: TrainActivation::Relu,
        groups: vec![8, 4],
        aux_k: 0,
        aux_coef: 0.0,
        dead_window_patches: 1,
        unit_norm_decoder: true,
        max_grad_norm: None,
        kernels: Kernels::Auto,
        dense_above: 0.05,
        relu_init_density: None,
    };
    let mk =
        |r: Recipe| TrainState::new(vec![0.0; 16], vec![0.0; 8], vec![0.0; 16], vec![0.0; 2], r);
    assert!(mk(recipe.clone()).is_err());
    let ok = mk(Recipe {
        groups: vec![],
        ..recipe
    })
    .unwrap();
    let mut sc = Scratch::default();
    assert!(matches!(
        ok.gradients(&[0.0; 5], 2, 0.0, &mut sc),
        Err(Error::Shape { .. })
    ));
}
