#!/usr/bin/env python3
"""Python saev `sae.pt` checkpoints, one per header generation, and what the real loader makes of each.

Writes tests/fixtures/sae-headers/:
  <name>.pt                 one checkpoint per header generation (d_model 8, d_sae 32, k 3); the
                            header is written by that era's own `dump` (run from a `git archive` of
                            the saev repository at that commit), except the two marked synthetic,
                            whose shape no committed `dump` ever wrote but the HEAD loader accepts
  reference.safetensors     `x` [16, 8] and, for every checkpoint the HEAD loader accepts,
                            `<name>.f_x` [16, 32] and `<name>.x_hat` [16, 8] from HEAD `load` +
                            `.eval()` + forward (`x_hat` = `x_hats[:, -1]`); plus
                            `schema5-batchtopk.f_x_train`, the same forward left in training mode
                            (the mode `load` returns), which is a batch-level top-(k*16)
  era-reference.safetensors `<name>.era_f_x`, `<name>.era_x_hat`: the forward of the code that wrote
                            the file, for every checkpoint where it differs from HEAD or HEAD rejects it
  manifest.json             per checkpoint: generation, writer, header line, HEAD outcome (config it
                            builds, or the exception it raises), whether the era forward equals HEAD's
Generations (see manifest.json / README.md there for the table):
  paper (saev 0.1.0 from PyPI), paper-l1 (saev@8d7a118, pre-0.1.0 keys), schema 1 with "cls" naming
  the activation config (saev@1c842cc Relu, saev@f5d892c TopK), schema 1 with "cls":
  "SparseAutoencoderConfig" (synthetic), schema 2 (saev@70cd3b4 d_vit, saev@d4cc39a d_model),
  schema 3 (saev@4ab5d33 TopK, json.dumps; saev@c3dd0ae BatchTopK, orjson), schema 4 (saev@513cd52
  TopK, saev@ce1add2 BatchTopK with threshold and AbsBatchTopK, synthetic legacy "kind"/sparsity),
  schema 5 (saev@027f95a "kind", saev@527c0df AuxK.dead_threshold_tokens, HEAD Relu/TopK/BatchTopK
  with threshold 0.5 and 0.0).
Weights are random with fixed seeds; row 0 of x is zero so that h_x[0] == b_enc exactly, and
b_enc[7] = 0.5 in the BatchTopK checkpoints, equal to the threshold of the two that carry 0.5,
which pins `>` versus `>=`. b_enc is shifted negative so TopK rows keep negative values.

Needs torch, safetensors, numpy, orjson, scipy (in the running interpreter) and saev's own
dependencies beartype, einops, jaxtyping, tyro (importable, e.g. via --pythonpath), a git directory
of OSU-NLP-Group/saev holding the commits named in FIXTURES, and the saev 0.1.0 wheel (`pip download
--no-deps saev==0.1.0`). saev's source is extracted to a temporary directory, never into this repo.
Deterministic: running it twice writes identical bytes. CI never runs this.

  python3 scripts/make_sae_header_fixtures.py --saev-git /path/to/saev/.git \
      --saev-wheel saev-0.1.0-py3-none-any.whl [--pythonpath DIR] [--head COMMIT]
"""

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sae-headers"
HEAD_DEFAULT = "3d73f1f7122738563404e4c50a98d897aa18a7d0"  # saev main, 2026-03-11
D, D_SAE, K, BATCH = 8, 32, 3, 16
THRESHOLD = 0.5

# name, generation, era ("pypi-0.1.0", a commit, or None for synthetic), how to build it.
FIXTURES = [
    dict(name="paper", gen="no schema (saev 0.1.0, paper era)", era="pypi-0.1.0", module="saev.nn",
         act="Relu", build="pypi"),
    dict(name="paper-l1", gen="no schema (pre-0.1.0: l1_coeff, use_ghost_grads)", era="8d7a118",
         module="saev.nn", act="Relu", build="v2024_11_03", stub=["wids"]),
    dict(name="schema1-cls-relu", gen="schema 1, cls = activation config class", era="1c842cc",
         module="saev.nn.modeling", act="Relu", cfg="m.Relu(d_vit=8, exp_factor=4)"),
    dict(name="schema1-cls-topk", gen="schema 1, cls = activation config class", era="f5d892c",
         module="saev.nn.modeling", act="TopK", cfg="m.TopK(d_vit=8, exp_factor=4, top_k=3)"),
    dict(name="schema1-config", gen="schema 1, cls = SparseAutoencoderConfig (synthetic)", era=None,
         act="TopK", build="synthetic_schema1_config"),
    dict(name="schema2-dvit", gen="schema 2, d_vit + exp_factor", era="70cd3b4",
         module="saev.nn.modeling", act="TopK",
         cfg="m.SparseAutoencoderConfig(d_vit=8, exp_factor=4, activation=m.TopK(top_k=3))"),
    dict(name="schema2", gen="schema 2, d_model + exp_factor", era="d4cc39a",
         module="saev.nn.modeling", act="Relu",
         cfg="m.SparseAutoencoderConfig(d_model=8, exp_factor=4, activation=m.Relu())"),
    dict(name="schema3", gen="schema 3, d_model + exp_factor (json.dumps)", era="4ab5d33",
         module="saev.nn.modeling", act="TopK",
         cfg="m.SparseAutoencoderConfig(d_model=8, exp_factor=4, activation=m.TopK(top_k=3))"),
    dict(name="schema3-batchtopk", gen="schema 3, BatchTopK without threshold (orjson)", era="c3dd0ae",
         module="saev.nn.modeling", act="BatchTopK",
         cfg="m.SparseAutoencoderConfig(d_model=8, exp_factor=4, activation=m.BatchTopK(top_k=3))"),
    dict(name="schema4", gen="schema 4, d_model + d_sae", era="513cd52", module="saev.nn.modeling",
         act="TopK", cfg="m.SparseAutoencoderConfig(d_model=8, d_sae=32, activation=m.TopK(top_k=3))"),
    dict(name="schema4-batchtopk", gen="schema 4, BatchTopK with momentum + threshold buffer",
         era="ce1add2", module="saev.nn.modeling", act="BatchTopK", threshold=THRESHOLD,
         cfg="m.SparseAutoencoderConfig(d_model=8, d_sae=32, activation=m.BatchTopK(top_k=3))"),
    dict(name="schema4-absbatchtopk", gen="schema 4, AbsBatchTopK", era="ce1add2",
         module="saev.nn.modeling", act="AbsBatchTopK",
         cfg="m.SparseAutoencoderConfig(d_model=8, d_sae=32, activation=m.AbsBatchTopK(top_k=3))"),
    dict(name="schema4-kind", gen="schema 4, legacy kind + legacy sparsity dict (synthetic)", era=None,
         act="Relu", build="synthetic_schema4_kind"),
    dict(name="schema5-kind", gen="schema 5, legacy kind", era="027f95a", module="saev.nn.modeling",
         act="TopK", cfg="m.SparseAutoencoderConfig(d_model=8, d_sae=32, activation=m.TopK(top_k=3))"),
    dict(name="schema5-auxk-dead-threshold", gen="schema 5, AuxK.dead_threshold_tokens", era="527c0df",
         module="saev.nn.modeling", act="TopK",
         cfg="m.SparseAutoencoderConfig(d_model=8, d_sae=32, activation=m.TopK(top_k=3))"),
    dict(name="schema5-relu", gen="schema 5 (HEAD)", era="HEAD", module="saev.nn.modeling", act="Relu",
         cfg="m.SparseAutoencoderConfig(d_model=8, d_sae=32, activation=m.Relu())"),
    dict(name="schema5-topk", gen="schema 5 (HEAD)", era="HEAD", module="saev.nn.modeling", act="TopK",
         cfg="m.SparseAutoencoderConfig(d_model=8, d_sae=32, activation=m.TopK(top_k=3))"),
    dict(name="schema5-batchtopk", gen="schema 5 (HEAD), threshold 0.5", era="HEAD",
         module="saev.nn.modeling", act="BatchTopK", threshold=THRESHOLD,
         cfg="m.SparseAutoencoderConfig(d_model=8, d_sae=32, activation=m.BatchTopK(top_k=3))"),
    dict(name="schema5-batchtopk-threshold0", gen="schema 5 (HEAD), threshold 0 (ReLU fallback)",
         era="HEAD", module="saev.nn.modeling", act="BatchTopK", threshold=0.0,
         cfg="m.SparseAutoencoderConfig(d_model=8, d_sae=32, activation=m.BatchTopK(top_k=3))"),
]


def make_inputs():
    """x and one weight set per fixture, seeded; W_dec rows unit-norm like a trained saev SAE."""
    import torch

    g = torch.Generator().manual_seed(20241031)
    x = torch.randn(BATCH, D, generator=g)
    x[0] = 0.0
    tensors = {"x": x}
    for i, fx in enumerate(FIXTURES):
        g = torch.Generator().manual_seed(1000 + i)
        w_dec = torch.randn(D_SAE, D, generator=g)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        b_enc = torch.randn(D_SAE, generator=g) * 0.5 - 1.0
        if "threshold" in fx:
            b_enc[7] = THRESHOLD
        tensors[f"{fx['name']}/W_enc"] = torch.randn(D, D_SAE, generator=g) * 0.5
        tensors[f"{fx['name']}/b_enc"] = b_enc
        tensors[f"{fx['name']}/W_dec"] = w_dec
        tensors[f"{fx['name']}/b_dec"] = torch.randn(D, generator=g) * 0.5
        if "threshold" in fx:
            tensors[f"{fx['name']}/activation.threshold"] = torch.tensor(float(fx["threshold"]))
    return tensors


# ---------------------------------------------------------------------------------------------
# Worker side: runs in a subprocess whose sys.path holds one saev source tree.
# ---------------------------------------------------------------------------------------------


def _set_weights(sae, tensors, name):
    """Replace every parameter/buffer with a fresh copy (breaks any W_enc/W_dec storage sharing)."""
    import torch

    for key in list(sae.state_dict().keys()):
        *path, leaf = key.split(".")
        mod = sae
        for p in path:
            mod = getattr(mod, p)
        value = tensors[f"{name}/{key}"].clone()
        if leaf in mod._parameters:
            mod._parameters[leaf] = torch.nn.Parameter(value)
        else:
            mod._buffers[leaf] = value
    extra = {k.split("/", 1)[1] for k in tensors if k.startswith(name + "/")} - set(sae.state_dict())
    assert not extra, f"{name}: era model has no slot for {extra}"


def _path_arg(fn, path):
    """Old dumps/loads are beartyped on `str` or `pathlib.Path`; pass what the signature wants."""
    import inspect

    ann = next(iter(inspect.signature(fn).parameters.values())).annotation
    return path if ann is pathlib.Path else str(path)


def _shapes(state_dict):
    return {k: "x".join(map(str, v.shape)) or "scalar" for k, v in state_dict.items()}


def _describe(err):
    """One line: exception type and message, whitespace collapsed (state_dict errors span lines)."""
    return f"{type(err).__name__}: " + " ".join(str(err).split())[:300]


def _forward(sae, x):
    import torch

    with torch.no_grad():
        out = sae(x)
    if hasattr(out, "f_x"):
        f_x, x_hat = out.f_x, out.x_hats
    else:
        x_hat, f_x = out[0], out[1]
    if x_hat.ndim == 3:
        x_hat = x_hat[:, -1, :]
    return f_x.contiguous(), x_hat.contiguous()


def worker_era(job):
    """Build the SAE with the era's classes, dump it with the era's `dump`, reload with the era's `load`."""
    import importlib
    import types

    import torch
    from safetensors.torch import load_file, save_file

    for name in job["fx"].get("stub", []):
        sys.modules[name] = types.ModuleType(name)
    fx, path, sha = job["fx"], pathlib.Path(job["path"]), job["sha"]
    tensors = load_file(job["inputs"])
    m = importlib.import_module(fx["module"])
    if hasattr(m, "__version__"):
        m.__version__ = job["version"]
    if hasattr(m, "current_git_commit"):
        m.current_git_commit = lambda: sha
    if hasattr(m, "helpers"):
        m.helpers.current_git_commit = lambda: sha

    build = fx.get("build")
    if build == "pypi":
        config = importlib.import_module("saev.config")
        sae = m.SparseAutoencoder(config.SparseAutoencoder(d_vit=D, exp_factor=4))
        _set_weights(sae, tensors, fx["name"])
        m.dump(str(path), sae)
    elif build == "v2024_11_03":
        config = importlib.import_module("saev.config")
        sae = m.SparseAutoencoder(d_vit=D, exp_factor=4, l1_coeff=0.00008, use_ghost_grads=True)
        _set_weights(sae, tensors, fx["name"])
        with tempfile.TemporaryDirectory() as tmp:
            m.dump(config.Train(ckpt_path=tmp), sae, "run")
            path.write_bytes((pathlib.Path(tmp) / "run" / "sae.pt").read_bytes())
    else:
        cfg = eval(fx["cfg"], {"m": m})
        sae = m.SparseAutoencoder(cfg)
        _set_weights(sae, tensors, fx["name"])
        m.dump(_path_arg(m.dump, path), sae)

    # Era forward: the in-memory SAE that was dumped (some eras cannot `load` their own files:
    # saev@4ab5d33 writes schema 3 but its `load` stops at schema 2).
    sae.eval()
    f_x, x_hat = _forward(sae, tensors["x"])
    try:
        loaded = m.load(_path_arg(m.load, path))
        loaded.eval()
        same = all(torch.equal(a, b) for a, b in zip((f_x, x_hat), _forward(loaded, tensors["x"])))
        status = "ok" if same else "loads, but forward differs from the dumped SAE"
    except Exception as err:  # noqa: BLE001
        status = _describe(err)
    save_file({"f_x": f_x, "x_hat": x_hat}, job["result"], metadata={"era_load": status})


def worker_head(job):
    """Load every checkpoint with HEAD `load`; eval-mode forward; record config or exception."""
    import dataclasses
    import importlib

    import torch
    from safetensors.torch import load_file, save_file

    m = importlib.import_module("saev.nn.modeling")
    x = load_file(job["inputs"])["x"]
    report, out = {}, {}
    for name in job["names"]:
        path = pathlib.Path(job["dir"]) / f"{name}.pt"
        try:
            sae = m.load(path)
        except Exception as err:  # noqa: BLE001 -- recording what the loader raises is the point
            report[name] = {"ok": False, "error": _describe(err)}
            continue
        act = sae.cfg.activation
        rec = {
            "ok": True,
            "training_after_load": sae.training,
            "d_model": sae.cfg.d_model,
            "d_sae": sae.cfg.d_sae,
            "activation": type(act).__name__,
            "activation_params": {
                f.name: repr(getattr(act, f.name)) for f in dataclasses.fields(act)
            },
            "state_dict": _shapes(sae.state_dict()),
        }
        if hasattr(sae.activation, "threshold"):
            rec["threshold"] = float(sae.activation.threshold)
        sae.eval()
        with torch.no_grad():
            h_x = sae(x).h_x
        f_x, x_hat = _forward(sae, x)
        rec["f_x_has_negatives"] = bool((f_x < 0).any())
        rec["h_x_row0_equals_b_enc"] = bool(torch.equal(h_x[0], sae.b_enc.detach()))
        out[f"{name}.f_x"], out[f"{name}.x_hat"] = f_x, x_hat
        if rec["activation"] == "BatchTopK":
            f_x_train = _forward(m.load(path), x)[0]  # training mode, as `load` returns it
            rec["f_x_train_nnz"] = int((f_x_train != 0).sum())
            out[f"{name}.f_x_train"] = f_x_train
        report[name] = rec
    save_file(out, job["result"])
    pathlib.Path(job["report"]).write_text(json.dumps(report))


# ---------------------------------------------------------------------------------------------
# Driver side.
# ---------------------------------------------------------------------------------------------


class _Sae:
    """Plain module holding tensors as Parameters so `state_dict()` is what `torch.save` saw."""

    def __new__(cls, tensors):
        import torch

        mod = torch.nn.Module()
        for k, v in tensors.items():
            setattr(mod, k, torch.nn.Parameter(v.clone()))
        return mod


def write_synthetic(fx, tensors, path):
    """Header shapes the HEAD loader has a branch for but no committed `dump` wrote."""
    import orjson
    import torch

    n = fx["name"]
    w = {k: tensors[f"{n}/{k}"] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if fx["build"] == "synthetic_schema1_config":
        # Schema 1 era (json.dumps, W_enc first); cfg as SparseAutoencoderConfig had it on
        # 2025-07-31 (saev@8d38c23) but with d_model: with d_vit the HEAD loader raises.
        header = {
            "schema": 1,
            "cfg": {"d_model": D, "exp_factor": 4, "n_reinit_samples": 524288,
                    "remove_parallel_grads": True, "normalize_w_dec": True, "seed": 0,
                    "activation": {"cls": "TopK", "params": {"top_k": K}}},
            "cls": "SparseAutoencoderConfig",
            "commit": "unknown",
            "lib": "0.1.0",
        }
        line = (json.dumps(header) + "\n").encode("utf-8")
    else:
        # Schema 4 era (orjson, saev@513cd52 cfg fields) with an activation serialised by
        # dataclasses.asdict from classes that carried `kind` and a kind-less nested sparsity.
        header = {
            "schema": 4,
            "cfg": {"d_model": D, "d_sae": D_SAE, "n_reinit_samples": 524288,
                    "remove_parallel_grads": True, "normalize_w_dec": True, "seed": 0,
                    "activation": {"cls": "Relu",
                                   "params": {"kind": "relu", "sparsity": {"coeff": 0.0004}}}},
            "commit": "unknown",
            "lib": "0.1.0",
        }
        line = orjson.dumps(header, option=orjson.OPT_APPEND_NEWLINE)
    with open(path, "wb") as fd:
        fd.write(line)
        torch.save(_Sae(w).state_dict(), fd)


def extract(git_dir, commit, dest):
    """`git archive` the package (src/saev or saev) and pyproject.toml of one commit into dest."""
    tree = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "--name-only", commit],
                          check=True, capture_output=True, text=True).stdout.split()
    pkg = "src/saev" if "src" in tree else "saev"
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "--git-dir", git_dir, "archive", commit, pkg, "pyproject.toml"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    version = "0.1.0"
    for line in (dest / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            version = line.split("=", 1)[1].strip().strip('"')
            break
    return (dest / "src" if pkg == "src/saev" else dest), version


def run_worker(kind, job, pythonpath):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath), PYTHONHASHSEED="0")
    me = str(pathlib.Path(__file__).resolve())
    proc = subprocess.run([sys.executable, me, "--worker", kind], input=json.dumps(job), text=True,
                          env=env, capture_output=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed for {job.get('fx', {}).get('name', 'HEAD')}:\n"
                         f"{proc.stderr}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saev-git", required=True, help="git dir of OSU-NLP-Group/saev")
    ap.add_argument("--saev-wheel", required=True, help="saev-0.1.0-py3-none-any.whl")
    ap.add_argument("--pythonpath", action="append", default=[],
                    help="extra import path for beartype/einops/jaxtyping/tyro (repeatable)")
    ap.add_argument("--head", default=HEAD_DEFAULT, help="saev commit taken as HEAD")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [str(pathlib.Path(p).resolve()) for p in args.pythonpath]
    git_dir = str(pathlib.Path(args.saev_git).resolve())
    short = lambda c: subprocess.run(  # noqa: E731
        ["git", "--git-dir", git_dir, "rev-parse", "--short=7", c],
        check=True, capture_output=True, text=True).stdout.strip()

    with tempfile.TemporaryDirectory(prefix="saev-eras-") as tmp:
        tmp = pathlib.Path(tmp)
        inputs = make_inputs()
        save_file(inputs, tmp / "inputs.safetensors")
        trees = {}
        wheel = tmp / "pypi-0.1.0"
        with zipfile.ZipFile(args.saev_wheel) as zf:
            zf.extractall(wheel)
        trees["pypi-0.1.0"] = (wheel, "0.1.0")
        for c in sorted({fx["era"] for fx in FIXTURES if fx["era"] not in (None, "pypi-0.1.0")}):
            commit = args.head if c == "HEAD" else c
            trees[c] = extract(git_dir, commit, tmp / c)
        head_src = trees["HEAD"][0]

        manifest, era_out = {}, {}
        for fx in FIXTURES:
            path = out / f"{fx['name']}.pt"
            entry = {"generation": fx["gen"], "activation_written": fx["act"]}
            if fx["era"] is None:
                write_synthetic(fx, inputs, path)
                entry["written_by"] = "synthetic (this script); no committed dump wrote this shape"
            else:
                src, version = trees[fx["era"]]
                commit = args.head if fx["era"] == "HEAD" else fx["era"]
                sha = "" if fx["era"] == "pypi-0.1.0" else short(commit)
                job = {"fx": fx, "path": str(path), "sha": sha, "version": version,
                       "inputs": str(tmp / "inputs.safetensors"),
                       "result": str(tmp / f"{fx['name']}.era.safetensors")}
                run_worker("era", job, extra + [str(src)])
                era_out[fx["name"]] = load_file(job["result"])
                with safe_open(job["result"], "pt") as f:
                    entry["era_load_own_file"] = f.metadata()["era_load"]
                entry["written_by"] = ("saev 0.1.0 (PyPI) nn.dump" if fx["era"] == "pypi-0.1.0"
                                       else f"saev@{sha} nn.dump")
            with open(path, "rb") as fd:
                entry["header"] = fd.readline().decode("utf-8").rstrip("\n")
                entry["state_dict_in_file"] = _shapes(torch.load(io.BytesIO(fd.read()), weights_only=True))
            entry["bytes"] = path.stat().st_size
            manifest[fx["name"]] = entry

        job = {"names": [fx["name"] for fx in FIXTURES], "dir": str(out),
               "inputs": str(tmp / "inputs.safetensors"), "result": str(tmp / "head.safetensors"),
               "report": str(tmp / "head.json")}
        run_worker("head", job, extra + [str(head_src)])
        head = load_file(job["result"])
        report = json.loads((tmp / "head.json").read_text())

    ref = {"x": inputs["x"]}
    era_ref = {}
    for fx in FIXTURES:
        n, entry, rec = fx["name"], manifest[fx["name"]], report[fx["name"]]
        entry["head_load"] = rec
        if rec["ok"]:
            ref[f"{n}.f_x"], ref[f"{n}.x_hat"] = head[f"{n}.f_x"], head[f"{n}.x_hat"]
            if f"{n}.f_x_train" in head and n == "schema5-batchtopk":
                ref[f"{n}.f_x_train"] = head[f"{n}.f_x_train"]
        if n in era_out:
            same = rec["ok"] and torch.equal(era_out[n]["f_x"], head[f"{n}.f_x"]) and torch.equal(
                era_out[n]["x_hat"], head[f"{n}.x_hat"])
            entry["era_forward_equals_head"] = bool(same) if rec["ok"] else None
            if not same:
                era_ref[f"{n}.era_f_x"] = era_out[n]["f_x"]
                era_ref[f"{n}.era_x_hat"] = era_out[n]["x_hat"]
        # Fixture sanity: the properties the importer tests lean on must actually be present.
        if rec["ok"] and rec["activation"] == "TopK":
            assert rec["f_x_has_negatives"], f"{n}: TopK kept no negative pre-activation"
        if rec["ok"] and rec.get("threshold", 0) > 0:
            assert rec["h_x_row0_equals_b_enc"] and inputs[f"{n}/b_enc"][7] == rec["threshold"]
            assert head[f"{n}.f_x"][0, 7] == 0, f"{n}: h == threshold was kept"

    save_file(ref, out / "reference.safetensors", metadata={"saev_head": args.head})
    save_file(era_ref, out / "era-reference.safetensors", metadata={"saev_head": args.head})
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items()]
    (out / "manifest.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    for p in out.glob("*.safetensors"):
        p.chmod(0o644)
    for fx in FIXTURES:
        rec = manifest[fx["name"]]["head_load"]
        state = (f"ok {rec['activation']}" if rec["ok"] else rec["error"])[:90]
        print(f"{fx['name']:30s} {manifest[fx['name']]['bytes']:6d} B  {state}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        job = json.loads(sys.stdin.read())
        {"era": worker_era, "head": worker_head}[sys.argv[2]](job)
    else:
        main()
