#!/usr/bin/env python3
"""Reference fixtures for checkpoint layouts saev does not load yet, made by the real libraries.

Every model is tiny and random (LayerNorm weights around 1, LayerScale around 0.6, everything else
N(0, 0.2^2)) so that every path carries signal. Writes tests/fixtures/layouts/:

  dinov2-hub-reg/   original DINOv2 repo (torch hub `dinov2_vit*14_reg`) layout, 4 registers,
                    interpolate_antialias=True, interpolate_offset=0.0:
                      model.pth       torch.save(model.state_dict()) (torch zip pickle)
                      config.json     OUR description of the architecture: the DINOv2 repo ships no
                                      config file (the hub entry point name fixes the architecture)
                      io.safetensors
  dinov2-hub/       the same without registers, interpolate_antialias=False,
                    interpolate_offset=0.1 (the `dinov2_vit*14` hub models)
  timm-vit/reg4-dinov2/       timm `vit_small_patch14_reg4_dinov2` shrunk
  timm-vit/clip-quickgelu/    timm `vit_base_patch16_clip_quickgelu_224.openai` shrunk (with head)
                    each: model.safetensors + config.json written by timm.models.save_for_hf
                    (architecture, num_classes, num_features, global_pool, model_args,
                    pretrained_cfg), plus io.safetensors
  open_clip/        open_clip CLIP with OpenAI ViT-B/16's structure (quick_gelu), tiny:
                      open_clip_pytorch_model.bin   torch.save(full CLIP state_dict) as hub repos do
                      open_clip_config.json         {"model_cfg", "preprocess_cfg"} (hub format)
                      io.safetensors                native size only (open_clip cannot resize)
  dinov3/           HF transformers DINOv3ViTModel (plain GELU MLP, like ViT-S/B/L):
                      config.json, model.safetensors (save_pretrained), io.safetensors
                      original/model.pth, original/config.json: the SAME weights in the original
                      facebookresearch/dinov3 layout (checked: its forward equals HF's)
  dinov3-gated/     the same with use_gated_mlp=True / hidden_act=silu (ViT-S+/H+/7B style),
                    original/ uses ffn_layer="swiglu" (w1/w2/w3)
  hf-formats/sharded/   tests/fixtures/backbone/tiny-dinov2 re-saved with max_shard_size: 2 shards
                        + model.safetensors.index.json + config.json
  hf-formats/bin/       the same weights as pytorch_model.bin (torch.save of the on-disk state
                        dict, what transformers < 5 wrote with safe_serialization=False)
                        Reference outputs: tests/fixtures/backbone/tiny-dinov2/io.safetensors.
  processors/<name>/preprocessor_config.json  as shipped by google/siglip-so400m-patch14-384 and
                        openai/clip-vit-large-patch14-336 (legacy int `size`/`crop_size`), and a
                        facebook/dinov2-style BitImageProcessor at 518; resolved.json is
                        transformers' to_dict() of what it loaded
  processors/pixel_values.safetensors  PIL-backend outputs on astronaut.png / chelsea.png:
                        `<name>.<photo>` = the resized+cropped image as u8 [3, H, W] (pixel_values
                        is exactly (u8 / 255 - mean) / std in f32, asserted here), and
                        `<name>.<photo>.rows16` = pixel_values[:, :16, :] as f32 (exact output)
  VERSIONS.json

io.safetensors keys, for <size> in {native, resized} (resized = a non-square size that needs
position-embedding interpolation / other RoPE grid; absent where the library cannot do it):
  <size>.pixel_values  [B, 3, H, W] f32
  <size>.embed         tokens entering block 0 (after pos-embed, registers, CLIP ln_pre)
  <size>.hidden.<i>    residual stream after block i (0-based), tokens in the model's own order
                       (CLS, registers, patches row-major)
  <size>.final         after the final norm, all tokens
  <size>.pooled        CLS after the final norm (timm: forward_head(pre_logits=True))
  <size>.head          timm CLIP head output (the projection) / open_clip `visual(x)` (= pooled @ proj)
  <size>.pos_embed     (DINOv2 hub, timm) the position embedding actually added, after resizing

Needs torch, transformers (>= 5, with DINOv3ViTModel), timm, open_clip_torch, safetensors,
pillow, scikit-image (only for the photos, already in tests/fixtures/backbone), and checkouts of
github.com/facebookresearch/dinov2 and github.com/facebookresearch/dinov3 (not on PyPI; only their
Python sources are imported, no weights are downloaded). xFormers must NOT be installed (the
plain-PyTorch attention path is the reference). CI never runs this: the outputs are committed.

    python scripts/make_layout_fixtures.py --dinov2-src /path/to/dinov2 --dinov3-src /path/to/dinov3
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
from functools import partial

os.environ.setdefault("XFORMERS_DISABLED", "1")

import numpy as np
import PIL
import PIL.Image
import torch
import transformers
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "layouts"
BACKBONE = ROOT / "tests" / "fixtures" / "backbone"

VERSIONS = {}


# --------------------------------------------------------------------------------------------- #
# helpers


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: LayerNorm weight ~ 1 + N(0, 0.2^2), LayerScale ~ 0.6 + N(0, 0.2^2)
    (clearly not identity, so skipping it shows), everything else ~ N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    norm_weights = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None:
            norm_weights.add(f"{mname}.weight" if mname else "weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            last = name.rsplit(".", 1)[-1]
            if name in norm_weights:
                p.copy_(1.0 + noise)
            elif last in ("gamma", "lambda1"):
                p.copy_(0.6 + noise)
            else:
                p.copy_(noise)


def f32(tensors: dict) -> dict:
    return {k: np.ascontiguousarray(v.detach().cpu().numpy() if torch.is_tensor(v) else v, dtype=np.float32)
            for k, v in tensors.items()}


def run_hooked(blocks, fn):
    """Run fn(); return (input of blocks[0], [output of each block], fn's result)."""
    outs, ins = [], []

    def post(_m, _i, o):
        outs.append((o[0] if isinstance(o, tuple) else o).detach().clone())

    def pre(_m, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        ins.append(x.detach().clone())

    hs = [b.register_forward_hook(post) for b in blocks]
    hs.append(blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            res = fn()
    finally:
        for h in hs:
            h.remove()
    assert len(outs) == len(blocks) and len(ins) == 1, (len(outs), len(ins))
    return ins[0], outs, res


def put_hidden(t: dict, size: str, embed, outs) -> None:
    t[f"{size}.embed"] = embed
    for i, h in enumerate(outs):
        t[f"{size}.hidden.{i}"] = h


def fresh(d: pathlib.Path) -> pathlib.Path:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def inputs(native_hw, resized_hw, seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    out = {"native": torch.randn(batch, 3, *native_hw, generator=g)}
    if resized_hw is not None:
        out["resized"] = torch.randn(1, 3, *resized_hw, generator=g)
    return out


def git_head(src: pathlib.Path) -> str:
    if (src / "COMMIT").exists():  # a plain copy of the sources with the commit noted beside them
        return (src / "COMMIT").read_text().strip()
    try:
        return subprocess.check_output(["git", "-C", str(src), "rev-parse", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def report(d: pathlib.Path):
    for p in sorted(d.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(OUT)}  {p.stat().st_size}")


# --------------------------------------------------------------------------------------------- #
# 1. original DINOv2 (torch hub) layout


def dinov2_hub(src: pathlib.Path):
    sys.path.insert(0, str(src))
    from dinov2.layers import MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models.vision_transformer import DinoVisionTransformer

    VERSIONS["dinov2_repo_commit"] = git_head(src)
    for name, regs, antialias, offset, seed, entry in [
        ("dinov2-hub-reg", 4, True, 0.0, 11, "dinov2_vits14_reg"),
        ("dinov2-hub", 0, False, 0.1, 12, "dinov2_vits14"),
    ]:
        # What dinov2/hub/backbones.py::_make_dinov2_model builds (vits14 with embed_dim etc. shrunk):
        # init_values=1.0, ffn_layer="mlp", block_chunks=0, MemEffAttention blocks.
        cfg = dict(
            img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4,
            init_values=1.0, ffn_layer="mlp", block_chunks=0, num_register_tokens=regs,
            interpolate_antialias=antialias, interpolate_offset=offset,
        )
        model = DinoVisionTransformer(
            **cfg, qkv_bias=True, proj_bias=True, ffn_bias=True,
            block_fn=partial(Block, attn_class=MemEffAttention),
        ).eval()
        randomize(model, seed)
        d = fresh(OUT / name)
        torch.save(model.state_dict(), d / "model.pth")
        desc = {
            "_comment": (
                "Written by saev's make_layout_fixtures.py: the DINOv2 repository ships NO config "
                "file; the torch hub entry point (dinov2/hub/backbones.py) fixes the architecture. "
                "This describes the tiny model in model.pth with DinoVisionTransformer's argument names."
            ),
            "format": "dinov2-hub",
            "hub_entry_point_like": entry,
            **cfg,
            "in_chans": 3,
            "qkv_bias": True, "proj_bias": True, "ffn_bias": True,
            "layer_norm_eps": 1e-6,
            "act_layer": "gelu (nn.GELU, exact erf)",
            "layerscale": "init_values (ls1.gamma / ls2.gamma present)",
        }
        (d / "config.json").write_text(json.dumps(desc, indent=1) + "\n")

        t = {}
        for size, px in inputs((56, 56), (42, 70), seed=seed + 100).items():
            embed, outs, ff = run_hooked(list(model.blocks), lambda: model.forward_features(px))
            t[f"{size}.pixel_values"] = px
            put_hidden(t, size, embed, outs)
            final = torch.cat([ff["x_norm_clstoken"][:, None], ff["x_norm_regtokens"], ff["x_norm_patchtokens"]], 1)
            assert torch.equal(ff["x_prenorm"], outs[-1])
            t[f"{size}.final"] = final
            with torch.no_grad():
                t[f"{size}.pooled"] = model(px)  # head is Identity: x_norm_clstoken
                x = torch.zeros(1, 1 + (px.shape[2] // 14) * (px.shape[3] // 14), 32)
                t[f"{size}.pos_embed"] = model.interpolate_pos_encoding(x, px.shape[2], px.shape[3])
        save_file(f32(t), d / "io.safetensors")
        report(d)
    sys.path.remove(str(src))


# --------------------------------------------------------------------------------------------- #
# 2. timm VisionTransformer


def timm_vit():
    import timm
    from timm.models import save_for_hf

    VERSIONS["timm"] = timm.__version__
    for name, arch, kw, native, resized, seed in [
        ("reg4-dinov2", "vit_small_patch14_reg4_dinov2",
         dict(img_size=56, embed_dim=32, depth=2, num_heads=4), (56, 56), (42, 70), 21),
        ("clip-quickgelu", "vit_base_patch16_clip_quickgelu_224.openai",
         dict(img_size=64, embed_dim=32, depth=2, num_heads=4, num_classes=16), (64, 64), (48, 80), 22),
    ]:
        # dynamic_img_size=True so that forward resamples pos_embed for other sizes (timm default
        # is a fixed size); it does not change the weights.
        model = timm.create_model(arch, pretrained=False, dynamic_img_size=True, **kw).eval()
        randomize(model, seed)
        d = fresh(OUT / "timm-vit" / name)
        # data_config: record the tiny native size as input_size (timm leaves the source tag's
        # 224 / 518 there when dynamic_img_size makes the input size non-fixed).
        save_for_hf(model, d, safe_serialization=True, data_config={"input_size": (3, *native)})
        # round trip through timm's own hub loader (config.json + model.safetensors)
        again = timm.create_model(f"local-dir:{d}", pretrained=True).eval() if _timm_local_dir() else None

        t = {}
        for size, px in inputs(native, resized, seed=seed + 100).items():
            embed, outs, feats = run_hooked(list(model.blocks), lambda: model.forward_features(px))
            t[f"{size}.pixel_values"] = px
            put_hidden(t, size, embed, outs)
            t[f"{size}.final"] = feats
            with torch.no_grad():
                t[f"{size}.pooled"] = model.forward_head(feats, pre_logits=True)
                if model.num_classes:
                    t[f"{size}.head"] = model.forward_head(feats)
                gh, gw = px.shape[2] // model.patch_embed.patch_size[0], px.shape[3] // model.patch_embed.patch_size[1]
                from timm.layers import resample_abs_pos_embed
                t[f"{size}.pos_embed"] = resample_abs_pos_embed(
                    model.pos_embed, new_size=(gh, gw), old_size=model.patch_embed.grid_size,
                    num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
                )
                if again is not None:
                    assert torch.allclose(again.forward_features(px), feats, atol=1e-6)
        save_file(f32(t), d / "io.safetensors")
        report(d)


def _timm_local_dir() -> bool:
    import inspect

    import timm.models._factory as f

    return "local-dir" in inspect.getsource(f)


# --------------------------------------------------------------------------------------------- #
# 3. open_clip


def open_clip_vit():
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf

    VERSIONS["open_clip"] = open_clip.__version__
    d = fresh(OUT / "open_clip")
    # OpenAI ViT-B-16-quickgelu.json with every size shrunk (head_width 8 -> 4 heads).
    model_cfg = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 8, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    preprocess = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    model = open_clip.create_model(f"local-dir:{d}", load_weights=False).eval()
    randomize(model, 31)
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    # Rewrite the config exactly as open_clip's save_for_hf does (indent=2), then round-trip load.
    save_config_for_hf(model, d / "open_clip_config.json", model_config=model_cfg)
    again = open_clip.create_model(f"local-dir:{d}").eval()

    v = model.visual
    t = {}
    for size, px in inputs((64, 64), None, seed=131).items():
        post = []
        h = v.ln_post.register_forward_hook(lambda _m, _i, o: post.append(o.detach().clone()))
        embed, outs, res = run_hooked(list(v.transformer.resblocks), lambda: v(px))
        h.remove()
        assert outs[0].shape[0] == px.shape[0], "expected batch-first tokens"
        t[f"{size}.pixel_values"] = px
        put_hidden(t, size, embed, outs)
        t[f"{size}.final"] = post[0]  # ln_post over all tokens (final_ln_after_pool=False)
        t[f"{size}.pooled"] = post[0][:, 0]
        t[f"{size}.head"] = res  # pooled @ visual.proj
        with torch.no_grad():
            assert torch.allclose(again.visual(px), res, atol=1e-6)
            assert torch.allclose(model.encode_image(px), res, atol=1e-6)
    save_file(f32(t), d / "io.safetensors")
    report(d)


# --------------------------------------------------------------------------------------------- #
# 4. DINOv3 (HF transformers) + the same weights in the original repo layout


def hf_to_original_dinov3(sd: dict, gated: bool) -> dict:
    """HF DINOv3ViTModel keys -> facebookresearch/dinov3 DinoVisionTransformer keys."""
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "storage_tokens": sd["embeddings.register_tokens"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, -1),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layer."))
    for i in range(n):
        a, b = f"model.layer.{i}.", f"blocks.{i}."
        q, k, v = (sd[a + f"attention.{p}_proj.weight"] for p in "qkv")
        out[b + "attn.qkv.weight"] = torch.cat([q, k, v], 0)
        qb, vb = sd[a + "attention.q_proj.bias"], sd[a + "attention.v_proj.bias"]
        out[b + "attn.qkv.bias"] = torch.cat([qb, torch.zeros_like(qb), vb], 0)
        out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones_like(qb), torch.zeros_like(qb), torch.ones_like(vb)])
        out[b + "attn.proj.weight"] = sd[a + "attention.o_proj.weight"]
        out[b + "attn.proj.bias"] = sd[a + "attention.o_proj.bias"]
        for s in ("1", "2"):
            out[b + f"norm{s}.weight"] = sd[a + f"norm{s}.weight"]
            out[b + f"norm{s}.bias"] = sd[a + f"norm{s}.bias"]
            out[b + f"ls{s}.gamma"] = sd[a + f"layer_scale{s}.lambda1"]
        mlp = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if gated else {"up_proj": "fc1", "down_proj": "fc2"}
        for hf, orig in mlp.items():
            for wb in ("weight", "bias"):
                out[b + f"mlp.{orig}.{wb}"] = sd[a + f"mlp.{hf}.{wb}"]
    return out


def dinov3(src: pathlib.Path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    sys.path.insert(0, str(src))
    from dinov3.models.vision_transformer import DinoVisionTransformer

    VERSIONS["dinov3_repo_commit"] = git_head(src)
    for name, gated, seed in [("dinov3", False, 41), ("dinov3-gated", True, 42)]:
        # hidden 32 / 2 heads -> head_dim 16 -> 4 RoPE periods per axis.
        # Gated: original SwiGLUFFN hidden = int(ffn_ratio * dim * 2 / 3) rounded up to 8;
        # ffn_ratio 3 -> int(64) = 64; the HF config stores that as intermediate_size.
        cfg = DINOv3ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64 if gated else 128, hidden_act="silu" if gated else "gelu",
            use_gated_mlp=gated, patch_size=16, image_size=64, num_register_tokens=4,
            layer_norm_eps=1e-5, layerscale_value=1e-5, rope_theta=100.0,
            query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True,
            pos_embed_rescale=2.0,
        )
        model = DINOv3ViTModel(cfg).eval()
        randomize(model, seed)
        d = fresh(OUT / name)
        model.save_pretrained(d)

        t = {}
        ins = inputs((64, 64), (48, 80), seed=seed + 100)
        for size, px in ins.items():
            embed, outs, out = run_hooked(list(model.model.layer), lambda: model(pixel_values=px, output_hidden_states=True))
            t[f"{size}.pixel_values"] = px
            put_hidden(t, size, embed, outs)
            for i, h in enumerate(out.hidden_states[1:] if len(out.hidden_states) == len(outs) + 1 else out.hidden_states):
                assert torch.equal(h, outs[i])
            t[f"{size}.final"] = out.last_hidden_state
            t[f"{size}.pooled"] = out.pooler_output
        save_file(f32(t), d / "io.safetensors")

        # Same weights, original layout; the original forward must match HF's.
        orig = DinoVisionTransformer(
            img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
            ffn_ratio=3 if gated else 4, ffn_layer="swiglu" if gated else "mlp",
            qkv_bias=True, proj_bias=True, ffn_bias=True, layerscale_init=1e-5,
            norm_layer="layernormbf16", n_storage_tokens=4, mask_k_bias=True,
            pos_embed_rope_base=100.0, pos_embed_rope_normalize_coords="separate",
            pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32",
        ).eval()
        orig.init_weights()
        sd = hf_to_original_dinov3(model.state_dict(), gated)
        sd["rope_embed.periods"] = orig.state_dict()["rope_embed.periods"]
        orig.load_state_dict(sd, strict=True)
        for size, px in ins.items():
            with torch.no_grad():
                ff = orig.forward_features(px)
                got = torch.cat([ff["x_norm_clstoken"][:, None], ff["x_storage_tokens"], ff["x_norm_patchtokens"]], 1)
            err = (got - t[f"{size}.final"]).abs().max().item()
            assert err < 1e-4, (name, size, err)
            print(f"  {name} {size}: original dinov3 forward vs HF max |diff| = {err:.2e}")
        od = fresh(d / "original")
        torch.save(orig.state_dict(), od / "model.pth")
        (od / "config.json").write_text(json.dumps({
            "_comment": (
                "Written by saev's make_layout_fixtures.py: the DINOv3 repository ships NO config "
                "file; hub entry points (dinov3/hub/backbones.py) fix the architecture. These are "
                "DinoVisionTransformer's arguments for model.pth (same weights as ../model.safetensors)."
            ),
            "format": "dinov3-hub",
            "img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "ffn_ratio": 3 if gated else 4, "ffn_layer": "swiglu" if gated else "mlp",
            "qkv_bias": True, "proj_bias": True, "ffn_bias": True, "layerscale_init": 1e-5,
            "norm_layer": "layernormbf16 (nn.LayerNorm eps=1e-5)", "n_storage_tokens": 4,
            "mask_k_bias": True, "pos_embed_rope_base": 100.0,
            "pos_embed_rope_normalize_coords": "separate", "pos_embed_rope_rescale_coords": 2,
            "pos_embed_rope_dtype": "fp32", "untie_cls_and_patch_norms": False,
            "untie_global_and_local_cls_norm": False,
        }, indent=1) + "\n")
        report(d)
    sys.path.remove(str(src))


# --------------------------------------------------------------------------------------------- #
# 5. HF checkpoint formats


def hf_formats():
    src = BACKBONE / "tiny-dinov2"
    on_disk = load_torch(src / "model.safetensors")
    ref = load_torch(src / "io.safetensors")
    model = transformers.Dinov2Model.from_pretrained(src).eval()

    base = OUT / "hf-formats"
    if base.exists():
        shutil.rmtree(base)
    d = base / "sharded"
    model.save_pretrained(d, max_shard_size="70KB")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) == 2, shards
    assert set(idx["weight_map"]) == set(on_disk), "re-saved keys differ from the original"

    b = fresh(base / "bin")
    shutil.copy(src / "config.json", b / "config.json")
    torch.save({k: v.clone() for k, v in on_disk.items()}, b / "pytorch_model.bin")

    for dd in (d, b):
        m = transformers.Dinov2Model.from_pretrained(dd).eval()
        for size in ("native", "resized"):
            with torch.no_grad():
                out = m(pixel_values=ref[f"{size}.pixel_values"], output_hidden_states=True)
            err = (out.last_hidden_state - ref[f"{size}.last_hidden_state"]).abs().max().item()
            assert err < 1e-5, (dd, size, err)
    report(base)


# --------------------------------------------------------------------------------------------- #
# 6. image processors


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROCESSORS = {
    # google/siglip-so400m-patch14-384/preprocessor_config.json
    "siglip-so400m-patch14-384": {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 384, "width": 384},
    },
    # openai/clip-vit-large-patch14-336/preprocessor_config.json (legacy feature-extractor format:
    # int size = shortest edge, int crop_size = square; no do_rescale / rescale_factor / do_convert_rgb)
    "clip-vit-large-patch14-336": {
        "crop_size": 336,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": 336,
    },
    # facebook/dinov2-*/preprocessor_config.json with 256/224 replaced by 518/518
    "dinov2-518": {
        "crop_size": {"height": 518, "width": 518},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "BitImageProcessor",
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 518},
    },
}


def processors():
    from transformers import AutoImageProcessor

    base = fresh(OUT / "processors")
    tensors = {}
    for name, cfg in PROCESSORS.items():
        d = base / name
        d.mkdir()
        (d / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        p = AutoImageProcessor.from_pretrained(d, backend="pil")
        resolved = {"class": type(p).__name__, **p.to_dict()}
        (d / "resolved.json").write_text(json.dumps(resolved, indent=1, sort_keys=True, default=str) + "\n")
        mean = np.array(p.image_mean, dtype=np.float64)[:, None, None]
        std = np.array(p.image_std, dtype=np.float64)[:, None, None]
        for photo in ("astronaut", "chelsea"):
            img = PIL.Image.open(BACKBONE / f"{photo}.png")
            px = p(images=img, return_tensors="np")["pixel_values"][0]  # [3, H, W] f32
            u8 = np.round((px.astype(np.float64) * std + mean) * 255.0)
            assert np.abs(u8 - (px * std + mean) * 255.0).max() < 1e-2, "not an 8-bit image"
            u8 = u8.astype(np.uint8)
            # the f32 output is exactly this f32 arithmetic on the u8 image
            re = ((u8.astype(np.float32) * np.float32(p.rescale_factor)) - mean.astype(np.float32)) / std.astype(np.float32)
            assert np.abs(re - px).max() < 1e-5, np.abs(re - px).max()
            tensors[f"{name}.{photo}"] = u8
            tensors[f"{name}.{photo}.rows16"] = np.ascontiguousarray(px[:, :16, :], dtype=np.float32)
            print(f"  {name} {photo} {px.shape} ({type(p).__name__})")
    save_file(tensors, base / "pixel_values.safetensors")
    report(base)


# --------------------------------------------------------------------------------------------- #


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dinov2-src", type=pathlib.Path, required=True, help="checkout of facebookresearch/dinov2")
    ap.add_argument("--dinov3-src", type=pathlib.Path, required=True, help="checkout of facebookresearch/dinov3")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    VERSIONS.update({"torch": torch.__version__, "transformers": transformers.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__})
    dinov2_hub(args.dinov2_src)
    timm_vit()
    open_clip_vit()
    dinov3(args.dinov3_src)
    hf_formats()
    processors()
    (OUT / "VERSIONS.json").write_text(json.dumps(VERSIONS, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
