"""Compare our import of timm's CoAtNet checkpoints with timm itself (needs timm; never run by tests).

For each timm name: build timm's model with random weights (perturbed so that every parameter, the
relative-position tables and layer scales included, visibly moves the output), save its state dict as
.safetensors, load that file with `coatnet.create_model(name, pretrained=FILE)`, and compare eval-mode
features and logits on one random batch. Also loads 224 checkpoints into 384 models (timm resizing its
own way via its checkpoint filter). Prints a markdown table of max relative errors (max |ours - timm|
over max |timm|).

    PYTHONPATH=src /tmp/timm-env/bin/python scripts/timm_parity.py [NAME[@HxW] ...]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.models.maxxvit import checkpoint_filter_fn

import coatnet
from coatnet.models.timm_variants import TIMM_VARIANTS

torch.set_num_threads(2)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g)
        if name.endswith("running_var"):
            t.copy_(noise.abs() * 0.5 + 0.5)
        elif name.endswith("gamma") or (t.ndim == 1 and "norm" in name and name.endswith("weight")):
            t.copy_(1 + 0.2 * noise)
        elif "relative_position_bias_table" in name:
            t.copy_(noise)
        elif t.ndim == 1:
            t.copy_(0.1 * noise)
        else:
            t.add_(0.2 * t.std() * noise)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def compare(name: str, tmp: Path, img_size: int | None = None, source: str | None = None) -> tuple:
    """Build timm's `source` (default `name`) at its own size, save it, load it into timm's and our
    `name` at `img_size`; return (features error, logits error, params)."""
    source = source or name
    src = timm.create_model(source, pretrained=False).eval()
    randomize(src, seed=len(name))
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp / f"{source}.safetensors"  # a checkpoint at the source's own (default) size
    save_file(state, str(path))
    kwargs = {} if img_size is None else {"img_size": img_size}
    ref = timm.create_model(name, pretrained=False, **kwargs).eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(state), ref))
    # timm's default head follows the default tag (11821 classes for the ImageNet-12k-only models)
    ours = coatnet.create_model(name, pretrained=str(path), num_classes=ref.num_classes, **kwargs).eval()
    size = ref.img_size
    batch = 1 if sum(p.numel() for p in ref.parameters()) > 1e8 else 2
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f_ref, f_ours = ref.forward_features(x), ours.forward_features(x)
        l_ref, l_ours = ref.forward_head(f_ref), ours.forward_head(f_ours)
    fast = coatnet.inference_model(ours)
    with torch.no_grad():
        l_fast = fast(x)
    params = sum(p.numel() for p in ours.parameters())
    del src, ref, ours, fast
    return rel_err(f_ours, f_ref), rel_err(l_ours, l_ref), rel_err(l_fast, l_ref), params, size


def _case(arg: str) -> tuple:
    """NAME, or NAME@HxW: NAME's 224 checkpoint loaded into NAME built at H x W."""
    name, _, size = arg.partition("@")
    return name, (tuple(int(v) for v in size.split("x")) if size else None), None


def main(names: list[str]) -> None:
    cases = [_case(n) for n in names] or [(n, None, None) for n in TIMM_VARIANTS]
    if not names:
        cases += [("coatnet_0_rw_224", 384, None), ("coatnet_bn_0_rw_224", 384, None),
                  ("coatnet_0_224", 384, None), ("coatnet_rmlp_2_rw_384", None, "coatnet_rmlp_2_rw_224")]
    print("| model | checkpoint | input | params | features | logits | inference_model logits |")
    print("|---|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, img_size, source in cases:
            fe, le, lf, params, size = compare(name, Path(tmp), img_size, source)
            ckpt = f"{source or name} @ 224" if (img_size or source) else "same"
            print(f"| {name} | {ckpt} | {size[0]}x{size[1]} | {params / 1e6:.2f}M | {fe:.1e} | {le:.1e} | "
                  f"{lf:.1e} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
