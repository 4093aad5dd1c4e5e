"""Export a trained CoAtNet to ONNX or TorchScript, with a dynamic batch size, checked against PyTorch.

The exported graph is `inference_model(model, fuse_kernels=False)`: BatchNorm folded and attention biases
gathered once, built from standard ops only (the fused oneDNN kernels have no ONNX or TorchScript form).
ONNX uses torch's TorchScript-based exporter (opset 17): the dynamo exporter needs onnxscript, and the
legacy one handles scaled_dot_product_attention with an additive mask.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .data import DataSpec
from .models import CoAtNet, CoAtNetConfig, create_model, inference_model
from .models.weights import load_pretrained
from .train.checkpoint import checkpoint_file, checkpoint_info
from .utils import atomic_write

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
METADATA_FILE = "coatnet.json"  # the TorchScript extra file that holds export_metadata()


def export_metadata(model: CoAtNet, checkpoint: str | os.PathLike | None = None) -> dict[str, str]:
    """What a user of an exported file needs to preprocess and read its outputs, as string values (ONNX's
    metadata_props are strings): model, in_chans, img_size, num_classes and, from one of our checkpoints (or a
    Hub folder), classes (a JSON list, the order of the logits), mean, std (JSON lists, applied to [0, 1]
    pixels), crop_fraction (the eval centre crop) and preprocessing (JSON: the exact eval transform, whether to
    average with the mirror image, the class names; docs/interop.md). The graph computes one view: with
    "tta_flip" true, average its softmax with that of the mirrored input, as `coatnet predict` does."""
    meta = {"model_config": json.dumps(model.config.to_dict()), "in_chans": str(model.in_chans),
            "img_size": json.dumps(list(model.config.image_size)), "num_classes": str(model.num_classes)}
    path = checkpoint_file(checkpoint) if checkpoint is not None else None
    info = checkpoint_info(path) if path is not None and path.suffix == ".safetensors" else None
    if info is not None:
        data = info.get("data", {})
        for key in ("classes", "mean", "std", "crop_fraction"):
            if data.get(key) is not None:
                meta[key] = json.dumps(data[key])
        with contextlib.suppress(KeyError, TypeError, ValueError):  # a checkpoint without a whole data spec
            spec = DataSpec.from_dict(data)
            meta["preprocessing"] = json.dumps(spec.preprocessing(bool((info.get("run") or {}).get("tta_flip"))))
        meta["source_checkpoint"] = path.name
    return meta


def read_export_metadata(path: str | os.PathLike, fmt: str) -> dict[str, str]:
    """The metadata written by `export` into an ONNX (metadata_props) or TorchScript (extra file) file,
    read without running anything ({} when there is none)."""
    if fmt == "onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith(f"/extra/{METADATA_FILE}")), None)
        return json.loads(z.read(name)) if name else {}


def load_checkpoint_model(path: str | os.PathLike, model_name: str | None = None, **overrides) -> CoAtNet:
    """The model of a checkpoint, in eval mode. A training checkpoint names its config in its safetensors
    metadata (train/checkpoint.py); plain weights need `model_name` (and overrides such as num_classes)
    to say what they are. A Hub-format folder gives its model.safetensors."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config = None
    if path.suffix == ".safetensors":
        info = checkpoint_info(path)  # None: timm's or plain weights
        if info is not None:
            config = CoAtNetConfig.from_dict(info["model_config"])
    if config is not None and model_name is None:
        model = CoAtNet(config.replace(**overrides))
    elif model_name is not None:
        model = create_model(model_name, **overrides)
    else:
        raise ValueError(f"{path} holds no model config in its metadata; name the architecture with --model")
    load_pretrained(model, path, strict_head=True)
    return model.eval()


def export(model: CoAtNet, path: str | os.PathLike, fmt: str, img_size: tuple[int, int] | None = None,
           metadata: dict[str, str] | None = None) -> Path:
    """Write `model` as `fmt` ("onnx" or "torchscript") to `path` atomically; input (B, C, H, W) with a
    dynamic batch B, output logits (B, num_classes). `metadata` (default: export_metadata(model)) goes into
    the ONNX file's metadata_props, or the TorchScript file's extra file coatnet.json. Returns the path."""
    metadata = export_metadata(model) if metadata is None else metadata
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    size = img_size or model.config.image_size
    # A copy, moved to the CPU in float32: the caller's model stays on its device (a CUDA model too) and dtype.
    graph = inference_model(copy.deepcopy(model).cpu().float(), channels_last=False, fuse_kernels=False)
    example = torch.randn(2, model.in_chans, *size)
    with warnings.catch_warnings(), atomic_write(path) as tmp:
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        if fmt == "onnx":
            torch.onnx.export(graph, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
            _add_onnx_metadata(tmp, metadata)
        else:
            traced = torch.jit.trace(graph, example, check_trace=False)
            torch.jit.save(traced, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata)})
    return path


def _add_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    try:
        import onnx
    except ImportError:
        raise ValueError("writing an ONNX file needs onnx (pip install 'coatnet[export]')") from None
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def run_exported(path: str | os.PathLike, fmt: str, x: torch.Tensor, threads: int | None = None):
    """Outputs of an exported file on `x` (B, C, H, W): onnxruntime for ONNX, torch.jit.load otherwise."""
    if fmt == "onnx":
        session = onnx_session(path, threads)
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(x)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("checking or timing an ONNX file needs onnxruntime (pip install 'coatnet[export]')") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_relative_error(model: nn.Module, path: str | os.PathLike, fmt: str, batch_sizes=(1, 3),
                       img_size: tuple[int, int] | None = None) -> float:
    """max |exported - PyTorch| / max |PyTorch| over random batches of each size."""
    size = img_size or model.config.image_size
    worst = 0.0
    model = model.eval()
    for b in batch_sizes:
        x = torch.randn(b, model.in_chans, *size)
        with torch.no_grad():
            ref = model(x)
        out = run_exported(path, fmt, x)
        if out.shape != ref.shape:
            raise ValueError(f"exported output shape {tuple(out.shape)} != PyTorch's {tuple(ref.shape)} at batch {b}")
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item())
    return worst
