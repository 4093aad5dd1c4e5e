"""timm's published CoAtNet weights: what they are, how to evaluate them (their EvalTransform, defined in
coatnet/preprocess.py beside our own eval transform), and fetching them.

Each tag is timm's `model.pretrained_tag` name, hosted on the Hugging Face Hub as `timm/<tag>`
(file `model.safetensors`). Values are taken from timm 1.0.31's pretrained configs (models/maxxvit.py)
and, for top-1, from timm's results/results-imagenet.csv (ImageNet-1k validation, at the listed input
size and crop). A sha256 is recorded only where it is known; otherwise the file's hash is computed and
reported after download, never invented.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from ..utils import atomic_write, no_such_path

HALF = (0.5, 0.5, 0.5)
TIMM_SOURCE = "timm 1.0.31 (Ross Wightman), https://huggingface.co/timm"


@dataclass(frozen=True)
class PretrainedWeights:
    """One published checkpoint and the evaluation recipe that goes with it."""

    tag: str  # timm's "<model>.<pretrain tag>", also the file name under the weights folder
    model: str  # our registered model name (the same as timm's)
    top1: float | None  # published ImageNet-1k top-1 (%) at input_size; None: not an ImageNet-1k head
    num_classes: int = 1000
    dataset: str = "ImageNet-1k"  # what the head classifies
    input_size: int = 224
    interpolation: str = "bicubic"  # resampling of the eval resize
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    crop_pct: float = 0.95  # eval: resize to input_size / crop_pct, then centre-crop input_size
    crop_mode: str = "center"  # "center": resize the shorter side; "squash": resize both sides
    license: str = "apache-2.0"
    source: str = TIMM_SOURCE
    sha256: str | None = None  # of model.safetensors, where known
    extra: dict = field(default_factory=dict)

    @property
    def hub_id(self) -> str:
        return f"timm/{self.tag}"

    def eval_transform(self) -> "EvalTransform":
        return EvalTransform(self.input_size, self.crop_pct, self.crop_mode, self.interpolation, self.mean,
                             self.std)


def _w(tag: str, top1: float | None, **kw) -> PretrainedWeights:
    return PretrainedWeights(tag=tag, model=tag.split(".")[0], top1=top1, **kw)


_IN12K = dict(num_classes=11821, dataset="ImageNet-12k (timm's 11821-class subset of ImageNet-22k)")
WEIGHTS: dict[str, PretrainedWeights] = {w.tag: w for w in [
    _w("coatnet_nano_rw_224.sw_in1k", 81.698, crop_pct=0.9),
    _w("coatnet_0_rw_224.sw_in1k", 82.390),
    _w("coatnet_1_rw_224.sw_in1k", 83.596),
    _w("coatnet_2_rw_224.sw_in12k_ft_in1k", 86.568),
    _w("coatnet_rmlp_1_rw2_224.sw_in12k_ft_in1k", 84.910),
    _w("coatnet_rmlp_2_rw_224.sw_in12k_ft_in1k", 86.504),
    _w("coatnet_rmlp_2_rw_384.sw_in12k_ft_in1k", 87.382, input_size=384, crop_pct=1.0, crop_mode="squash"),
    _w("coatnet_bn_0_rw_224.sw_in1k", 82.400, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    _w("coatnet_rmlp_nano_rw_224.sw_in1k", 82.050, crop_pct=0.9),
    _w("coatnet_rmlp_1_rw_224.sw_in1k", 83.362),
    _w("coatnet_rmlp_2_rw_224.sw_in1k", 84.606),
    _w("coatnet_2_rw_224.sw_in12k", None, **_IN12K),
    _w("coatnet_3_rw_224.sw_in12k", None, **_IN12K),
    _w("coatnet_rmlp_1_rw2_224.sw_in12k", None, **_IN12K),
    _w("coatnet_rmlp_2_rw_224.sw_in12k", None, **_IN12K),
]}


def list_weights() -> list[PretrainedWeights]:
    return sorted(WEIGHTS.values(), key=lambda w: w.tag)


def get_weights(tag: str) -> PretrainedWeights:
    if tag not in WEIGHTS:
        raise ValueError(f"unknown weights tag {tag!r}; `coatnet weights` lists them")
    return WEIGHTS[tag]


def default_tag(model: str) -> str | None:
    """The tag `pretrained=True` loads for `model`: timm's default (the first of its tags in timm's order,
    which WEIGHTS keeps); None for a model without published weights."""
    return next((w.tag for w in WEIGHTS.values() if w.model == model), None)


def split_model_name(name: str) -> tuple[str, str | None]:
    """("coatnet_0_rw_224", "coatnet_0_rw_224.sw_in1k") for timm's "<model>.<tag>" names (also with a
    "timm/" or "hf-hub:timm/" prefix); (name, None) for a plain model name."""
    name = _strip_hub_prefix(name)
    model, dot, _ = name.partition(".")
    if not dot:
        return name, None
    get_weights(name)  # a one-line error naming `coatnet weights` for an unknown tag
    return model, name


def weights_of(pretrained: str | os.PathLike | None) -> PretrainedWeights | None:
    """The published weights that `pretrained` (a tag, a downloaded <tag>.safetensors, or a file in the
    Hugging Face cache's models--timm--<tag> folder) holds; None for anything else."""
    if pretrained is None or isinstance(pretrained, bool):
        return None
    text = _strip_hub_prefix(str(pretrained))
    if text in WEIGHTS:
        return WEIGHTS[text]
    path = Path(text)
    candidates = [path.name.removesuffix(".safetensors")]
    candidates += [p.removeprefix("models--timm--") for p in path.parts if p.startswith("models--timm--")]
    return next((WEIGHTS[t] for t in candidates if t in WEIGHTS), None)


def _strip_hub_prefix(text: str) -> str:
    return text.removeprefix("hf-hub:").removeprefix("timm/")


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache, where timm and huggingface_hub keep what they download: $HF_HUB_CACHE,
    else $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's rule)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hf_cache_snapshots(repo_id: str) -> list[Path]:
    """The snapshot folders of Hugging Face repo `repo_id` ("user/name") in the cache (no network): the one
    that refs/main names first, then the others, newest first; [] when it was never downloaded."""
    repo = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return []
    ref = repo / "refs" / "main"
    main = ref.read_text().strip() if ref.is_file() else None
    return sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: (p.name != main, -p.stat().st_mtime))


def find_in_hf_cache(tag: str) -> Path | None:
    """`tag`'s weights file if timm or huggingface_hub has downloaded it (no network): the snapshot that
    refs/main names, else the newest one; model.safetensors preferred to pytorch_model.bin."""
    for snapshot in hf_cache_snapshots(f"timm/{tag}"):
        for filename in ("model.safetensors", "pytorch_model.bin"):
            if (snapshot / filename).is_file():  # is_file follows the cache's symlink into blobs/
                return snapshot / filename
    return None


def find_weights(tag: str) -> Path | None:
    """Where `tag`'s weights are on this machine: our weights folder (`coatnet download`), then the Hugging
    Face cache; None if neither has them."""
    ours = local_path(tag)
    return ours if ours.is_file() else find_in_hf_cache(tag)


def resolve_pretrained(pretrained: str | os.PathLike) -> Path:
    """A weights file from `pretrained`: an existing path as it is, or a tag (optionally "timm/"-prefixed)
    looked up with find_weights. Never downloads."""
    if os.path.exists(pretrained):
        return Path(pretrained)
    tag = _strip_hub_prefix(str(pretrained))
    if tag not in WEIGHTS:
        raise missing_weights(pretrained)
    found = find_weights(tag)
    if found is None:
        raise FileNotFoundError(f"weights {tag} are not downloaded (not in {local_path(tag)} nor in the Hugging "
                                f"Face cache {hf_cache_dir()}); run `coatnet download {tag}`")
    return found


def missing_weights(pretrained: str | os.PathLike) -> FileNotFoundError:
    """The error for weights that name neither an existing file or folder nor a published tag: the nearest file
    name in that folder, and for "user/name" how a Hub repository is written."""
    error = no_such_path(pretrained, "weights")
    text = str(pretrained)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not Path(text).parent.is_dir():
        return FileNotFoundError(f"{error} (a Hugging Face Hub model is written 'hf-hub:{text}')")
    return error


def weights_dir() -> Path:
    """Where downloaded weights live: $COATNET_WEIGHTS, or ~/.cache/coatnet/weights."""
    return Path(os.environ.get("COATNET_WEIGHTS") or Path.home() / ".cache" / "coatnet" / "weights")


def local_path(tag: str) -> Path:
    return weights_dir() / f"{tag}.safetensors"


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(tag: str, dest: str | os.PathLike | None = None) -> Path:
    """Fetch a tag's model.safetensors from the Hugging Face Hub into `dest` (default weights_dir()) as
    <tag>.safetensors. Needs the optional `hub` extra and network access; raises a one-line error otherwise.
    Verifies the sha256 where one is recorded."""
    w = get_weights(tag)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        raise ValueError("downloading needs huggingface_hub: pip install 'coatnet[hub]'") from None
    hub_logging.set_verbosity_error()  # its retry warnings would bury the one-line error below
    try:
        cached = hf_hub_download(repo_id=w.hub_id, filename="model.safetensors")
    except Exception as e:  # offline, blocked, or missing on the hub: one line, not a traceback
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not download {w.hub_id} from the Hugging Face Hub: {detail}") from None
    digest = sha256_of(cached)
    if w.sha256 is not None and digest != w.sha256:
        raise ValueError(f"{w.hub_id}: sha256 {digest} does not match the recorded {w.sha256}")
    out = Path(dest) if dest is not None else weights_dir()
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{tag}.safetensors"
    with atomic_write(target) as tmp:
        shutil.copyfile(cached, tmp)
    return target
