"""What a CoAtNet looks at: Grad-CAM, per-head attention of one query, and the learned relative-position bias.

- Grad-CAM (Selvaraju et al. 2017) for a class c on a feature map A (C, h, w): weights a_k = mean over
  positions of dy_c/dA_k, map = ReLU(sum_k a_k A_k), scaled to [0, 1]. The map is taken after the deepest
  stage whose output is still at least 7 cells on its shorter side (S4 at 224 px, S1 at 32 px), or any
  stage asked for.
- Attention: in each Transformer stage, the softmax weights softmax_j(q_i . k_j / sqrt(d) + w[i - j]) of one
  query position i over all keys j, per head (paper eq. 3), in the stage's last block; every map sums to 1.
- Relative-position bias: each head's w as a (2H-1) x (2W-1) grid, drawn as the value added to a key's
  logit by its offset from the query (the query at the centre): the spatial prior each head learned,
  independent of the image. One picture per stage, a row per block, a column per head.

`explain(checkpoint, images, out_dir)` writes the PNGs and returns what it found; the functions above it
work on any CoAtNet in Python. A model without Transformer stages (C-C-C-C) gets Grad-CAM only, with a
note saying why.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data.images import UnreadableImageError, list_image_files
from .data.transforms import normalize
from .layers import RelativeAttention2d
from .models.features import feature_points
from .train.checkpoint import load_model
from .train.predict import preprocess
from .train.runtime import resolve_device
from .utils import atomic_write, figure

MIN_CAM_SIDE = 7  # Grad-CAM's default map: the deepest stage output whose shorter side has at least this many cells


# -- names ---------------------------------------------------------------------------------------------------
def stage_names(model: nn.Module) -> list[str]:
    """The paper's name of each module of `model.stages`: S1..S4 (both parts of a split stage are its
    S-number), "S1" for ViT-Rel's single stage."""
    cfg = model.config
    if cfg.is_vit:
        return ["S1"]
    return [f"S{i}" for i, letters in enumerate(cfg.layout.split("-"), start=1) for _ in letters]


def transformer_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, stage) of every stage made of Transformer blocks, in order."""
    return [(name, stage) for name, stage in zip(stage_names(model), model.stages)
            if any(isinstance(m, RelativeAttention2d) for m in stage.modules())]


# -- Grad-CAM ------------------------------------------------------------------------------------------------
def grad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of one image: activations and gradients (C, h, w) -> map (h, w) in [0, 1] (all zero when
    no position has positive evidence)."""
    weights = gradients.mean(dim=(1, 2))  # (C,)
    cam = torch.relu(torch.einsum("c,chw->hw", weights, activations))
    top = cam.max()
    return cam / top if top > 0 else cam


def cam_points(model: nn.Module, input_size: tuple[int, int]) -> list[dict]:
    """The feature maps Grad-CAM can use (models/features.py: stem, S1..S4) with their (h, w) at `input_size`."""
    points = feature_points(model)
    names = stage_names(model)
    for p in points:
        p["name"] = "stem" if p["stage"] < 0 else names[p["stage"]]
        p["size"] = (input_size[0] // p["reduction"], input_size[1] // p["reduction"])
    return points


def default_cam_stage(model: nn.Module, input_size: tuple[int, int]) -> str:
    """The deepest map with at least MIN_CAM_SIDE cells on its shorter side (else the largest one)."""
    points = cam_points(model, input_size)
    wide = [p for p in points if min(p["size"]) >= MIN_CAM_SIDE]
    return (wide[-1] if wide else points[0])["name"]


def gradcam(model: nn.Module, x: torch.Tensor, class_index: int | None = None, stage: str | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Grad-CAM of a (1, C, H, W) normalised input for `class_index` (default: the predicted class) at
    `stage` ("stem", "S1".."S4"; default: default_cam_stage). Returns (map (h, w) in [0, 1], logits (classes,),
    stage name)."""
    points = {p["name"]: p for p in cam_points(model, tuple(x.shape[-2:]))}
    stage = stage or default_cam_stage(model, tuple(x.shape[-2:]))
    if stage not in points:
        raise ValueError(f"no feature map named {stage!r}; this model has {', '.join(points)}")
    index = points[stage]["stage"]
    module = model.stem if index < 0 else model.stages[index]
    captured = []
    handle = module.register_forward_hook(lambda m, args, out: captured.append(out))
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # so every map on the way needs a gradient, frozen weights too
            logits = model(x)[0]
            c = int(logits.argmax()) if class_index is None else class_index
            (grads,) = torch.autograd.grad(logits[c], captured[0])
    finally:
        handle.remove()
    return grad_cam(captured[0][0].detach().float(), grads[0].float()), logits.detach(), stage


# -- attention -----------------------------------------------------------------------------------------------
def position_bias(attn: nn.Module, size: tuple[int, int]) -> torch.Tensor:
    """The (heads, N, N) additive bias of a relative attention for an H x W map (its `bias(size)`, or its
    position-bias plug-in's)."""
    plugin = getattr(attn, "position_bias", None)
    return plugin.bias(size) if plugin is not None and hasattr(plugin, "bias") else attn.bias(size)


def attention_weights(attn: RelativeAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The attention of `attn` on its input x (B, H, W, C_in) as it computes it: (B, heads, N, N), row i =
    query i's weights over keys j (N = H*W, row-major). With the paper's pre-softmax bias (or none) each row
    sums to 1; "relative_post" adds the bias after the softmax, as the layer does."""
    B, H, W, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim)
    q, k = qkv[0], qkv[1]
    # The key bias of qkv adds q_i . b_k to a whole row: the softmax ignores it.
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, heads, N, N)
    if attn.bias_mode == "relative":
        logits = logits + position_bias(attn, (H, W)).to(logits.dtype)
    weights = logits.softmax(dim=-1)
    if attn.bias_mode == "relative_post":
        weights = weights + position_bias(attn, (H, W)).to(weights.dtype)
    return weights


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor, query: tuple[float, float] = (0.5, 0.5)
                   ) -> dict[str, dict]:
    """Per Transformer stage: the attention of one query over the keys in the stage's last block, for a
    (1, C, H, W) input. `query` = (y, x) as fractions of the image's height and width. Returns
    {stage: {"maps": (heads, h, w), "query": (row, col) on the stage's h x w map, "block": index}}."""
    found = {}
    for name, stage in transformer_stages(model):
        blocks = [m for m in stage.modules() if isinstance(m, RelativeAttention2d)]
        found[name] = (blocks[-1], len(blocks) - 1)
    captured: dict[str, torch.Tensor] = {}
    handles = [attn.register_forward_pre_hook(lambda m, args, name=name: captured.__setitem__(name, args[0]))
               for name, (attn, _) in found.items()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (attn, block) in found.items():
        inp = captured[name][:1]  # (1, h, w, C)
        h, w = inp.shape[1:3]
        row, col = min(int(query[0] * h), h - 1), min(int(query[1] * w), w - 1)
        weights = attention_weights(attn, inp)[0, :, row * w + col]  # (heads, N)
        out[name] = {"maps": weights.reshape(-1, h, w).float(), "query": (row, col), "block": block}
    return out


# -- relative-position bias ----------------------------------------------------------------------------------
def bias_by_offset(attn: nn.Module, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(heads, 2H-1, 2W-1): entry [h, H-1+dy, W-1+dx] is what head h adds to the logit of the key at
    (dy, dx) from the query (key minus query; centre: the query itself). Read from the layer's (heads, N, N)
    bias for an H x W map (its feature size by default), so a table, an MLP and any plug-in are read alike."""
    H, W = size or tuple(attn.feature_size)
    bias = position_bias(attn, (H, W)).detach().float()  # (heads, N, N): [query, key]
    dy = torch.arange(-(H - 1), H)
    dx = torch.arange(-(W - 1), W)
    DY, DX = torch.meshgrid(dy, dx, indexing="ij")
    qy, qx = (-DY).clamp(min=0), (-DX).clamp(min=0)  # a query that has a key at that offset
    query, key = qy * W + qx, (qy + DY) * W + (qx + DX)
    return bias[:, query, key]  # (heads, 2H-1, 2W-1)


def bias_grids(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Per Transformer stage, per block: bias_by_offset of its attention ({} entries for layers without a
    position bias are left out)."""
    return {name: [bias_by_offset(m) for m in stage.modules()
                   if isinstance(m, RelativeAttention2d) and m.bias_mode != "none"]
            for name, stage in transformer_stages(model)}


# -- pictures ------------------------------------------------------------------------------------------------
def _show_image(ax, image: torch.Tensor) -> None:
    """image: (C, H, W) in [0, 1]."""
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax, image: torch.Tensor, heat: torch.Tensor, vmax: float) -> None:
    """`heat` (h, w) as flat cells over the image's extent (magma, 0..vmax), the image's outline drawn on top."""
    grey = image.mean(0).numpy()
    H, W = grey.shape
    ax.imshow(heat.numpy(), cmap="magma", extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest", vmin=0,
              vmax=vmax)
    levels = [float(grey.min() + 0.3 * (grey.max() - grey.min()))]
    if grey.max() > grey.min():
        ax.contour(grey, levels=levels, colors="cyan", linewidths=0.7)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> Path:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def draw_gradcam(image: torch.Tensor, cam: torch.Tensor, title: str, path: Path) -> Path:
    """Input | Grad-CAM over it (bilinear, as Grad-CAM is usually shown) | the raw cells of the map."""
    fig = figure(figsize=(8.4, 3.2))
    axes = fig.subplots(1, 3)
    _show_image(axes[0], image)
    axes[0].set_title("input", fontsize=9)
    up = F.interpolate(cam[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    _show_image(axes[1], image.mean(0, keepdim=True))
    axes[1].imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[1].set_title("Grad-CAM over the input", fontsize=9)
    im = axes[2].imshow(cam.numpy(), cmap="jet", vmin=0, vmax=1, interpolation="nearest")
    axes[2].set_title(f"map cells ({cam.shape[0]}x{cam.shape[1]})", fontsize=9)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def draw_attention(image: torch.Tensor, stage: str, found: dict, title: str, path: Path) -> Path:
    """The input with the query cell marked, then each head's attention over the keys, then their mean."""
    from matplotlib.patches import Rectangle

    maps = found["maps"]
    heads, h, w = maps.shape
    panels = heads + 2
    cols = min(panels, 6)
    rows = math.ceil(panels / cols)
    fig = figure(figsize=(1.9 * cols, 2.05 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    H, W = image.shape[-2:]
    cell_h, cell_w = H / h, W / w
    row, col = found["query"]
    _show_image(axes[0][0], image)
    axes[0][0].add_patch(Rectangle((col * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h, fill=False,
                                   edgecolor="red", linewidth=2))
    axes[0][0].set_title(f"query ({row}, {col})", fontsize=8)
    vmax = float(maps.max()) or 1.0
    for i in range(heads + 1):
        ax = axes[(i + 1) // cols][(i + 1) % cols]
        heat = maps[i] if i < heads else maps.mean(0)
        _overlay(ax, image, heat, vmax)
        ax.add_patch(Rectangle((col * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h, fill=False,
                               edgecolor="red", linewidth=1.2))
        ax.set_title(f"head {i + 1}: max {float(heat.max()):.2f}" if i < heads else "mean of heads", fontsize=8)
    for i in range(panels, rows * cols):
        axes[i // cols][i % cols].axis("off")
    note = " (one token: each weight is 1)" if h * w == 1 else ""
    fig.suptitle(f"{title}\n{stage}, block {found['block'] + 1}: {h}x{w} tokens, attention of the red query cell "
                 f"over all keys{note}; colour from 0 (dark) to {vmax:.2f} (light) in every panel; "
                 "the image's outline in cyan",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def draw_bias(stage: str, grids: list[torch.Tensor], path: Path) -> Path:
    """A row per block, a column per head: each head's bias by key offset, one colour scale (blue < 0 <
    red) for the whole stage, the query's own cell outlined."""
    from matplotlib.patches import Rectangle

    heads = grids[0].shape[0]
    rows, cols = len(grids), heads
    side = 1.35 if cols > 8 else 1.7
    fig = figure(figsize=(side * cols + 1.2, side * rows + 0.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = max(float(g.abs().max()) for g in grids) or 1.0
    for b, grid in enumerate(grids):
        gh, gw = grid.shape[-2:]
        for hd in range(heads):
            ax = axes[b][hd]
            im = ax.imshow(grid[hd].numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest",
                           extent=(-(gw // 2) - 0.5, gw // 2 + 0.5, gh // 2 + 0.5, -(gh // 2) - 0.5))
            ax.add_patch(Rectangle((-0.5, -0.5), 1, 1, fill=False, edgecolor="black", linewidth=0.8))
            ax.set_xticks([-(gw // 2), 0, gw // 2] if gw > 1 else [0])
            ax.set_yticks([-(gh // 2), 0, gh // 2] if gh > 1 else [0])
            ax.tick_params(labelsize=6, length=2)
            if b == 0:
                ax.set_title(f"head {hd + 1}", fontsize=8)
            if hd == 0:
                ax.set_ylabel(f"block {b + 1}\ndy", fontsize=7)
            if b == rows - 1:
                ax.set_xlabel("dx", fontsize=7)
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.02)
    gh, gw = grids[0].shape[-2:]
    fig.suptitle(f"{stage}: learned relative-position bias w, added to the attention logit of the key at offset "
                 f"(dy, dx) from the query\n(centre, outlined: the query itself; {gh}x{gw} offsets of a "
                 f"{(gh + 1) // 2}x{(gw + 1) // 2} map; red raises, blue lowers attention)", fontsize=9)
    return _save(fig, path)


# -- the whole job -------------------------------------------------------------------------------------------
def output_names(files: Sequence[str]) -> list[str]:
    """A distinct name per file for its pictures: the file name without extension, prefixed with its folder's
    name where two files share it (red/00.png, blue/00.png -> red-00, blue-00), numbered if still equal."""
    stems = [Path(f).stem for f in files]
    names = [f"{Path(f).parent.name}-{s}" if stems.count(s) > 1 else s for f, s in zip(files, stems)]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def class_index(spec, wanted: str | int | None) -> int | None:
    """A class given by name or index -> its index (None stays None: the predicted class)."""
    if wanted is None:
        return None
    if isinstance(wanted, str) and wanted in spec.classes:
        return spec.classes.index(wanted)
    try:
        index = int(wanted)
    except (TypeError, ValueError):
        raise ValueError(f"class {wanted!r} is not one of the model's: {', '.join(spec.classes)}") from None
    if not 0 <= index < len(spec.classes):
        raise ValueError(f"class index {index} is out of range (the model has {len(spec.classes)} classes)")
    return index


def explain(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
            target: str | int | None = None, query: tuple[float, float] = (0.5, 0.5), cam_stage: str | None = None,
            device: str = "cpu") -> dict:
    """Write the pictures for `images` (files or folders) with the model of `checkpoint` (a checkpoint of
    ours or a Hub folder) into `out_dir`: per image <name>.gradcam.png and <name>.attention-<stage>.png per
    Transformer stage; once, bias-<stage>.png. `target`: class name or index for Grad-CAM (default: the
    predicted one); `query`: (y, x) fractions of the image. Returns {"images": [per image: image, predicted,
    prob, target, cam_stage, files; or image, error], "bias": [files], "notes": [what was left out and why]}."""
    if not all(0 <= q <= 1 for q in query):
        raise ValueError(f"query {tuple(query)} must be fractions of the image's height and width, in [0, 1]")
    files = list_image_files(images)
    device = resolve_device(device)
    model, spec, _ = load_model(checkpoint, device)
    target_index = class_index(spec, target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"images": [], "bias": [], "notes": []}
    attention_stages = transformer_stages(model)
    if not attention_stages:
        result["notes"].append(f"the model has no Transformer stage (layout {model.config.layout}): Grad-CAM only, "
                               f"no attention maps or relative-position biases")
    grids = bias_grids(model)
    for stage, stage_grids in grids.items():
        if stage_grids:
            result["bias"].append(str(draw_bias(stage, stage_grids, out / f"bias-{stage}.png")))
        else:
            result["notes"].append(f"{stage} has no relative-position bias (attention_bias='none'): no bias picture")
    for path, name in zip(files, output_names(files)):
        try:
            image = preprocess(path, spec)  # (C, S, S) in [0, 1]
        except UnreadableImageError as e:
            result["images"].append({"image": str(path), "error": e.reason})
            continue
        x = normalize(image.unsqueeze(0), spec.mean, spec.std).to(device)
        cam, logits, used = gradcam(model, x, target_index, cam_stage)
        probs = logits.float().softmax(-1)
        pred = int(probs.argmax())
        shown = pred if target_index is None else target_index
        top = ", ".join(f"{spec.classes[int(i)]} {float(probs[i]):.2f}" for i in probs.topk(min(3, len(probs))).indices)
        title = (f"{Path(path).name}: predicted {spec.classes[pred]} ({float(probs[pred]):.2f}); Grad-CAM for "
                 f"{'it' if target_index is None else spec.classes[shown]} at {used}\ntop: {top}")
        written = [str(draw_gradcam(image, cam.cpu(), title, out / f"{name}.gradcam.png"))]
        for stage, found in attention_maps(model, x, query).items():
            found = {**found, "maps": found["maps"].cpu()}
            caption = f"{Path(path).name}: predicted {spec.classes[pred]} ({float(probs[pred]):.2f})"
            written.append(str(draw_attention(image, stage, found, caption, out / f"{name}.attention-{stage}.png")))
        result["images"].append({"image": str(path), "predicted": spec.classes[pred],
                                 "prob": round(float(probs[pred]), 6), "target": spec.classes[shown],
                                 "cam_stage": used, "files": written})
    return result
