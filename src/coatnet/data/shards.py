"""WebDataset tar shards: written from an image folder, read as a data source whose training stream each
process draws from its own shards only (sequential reads, no shared random access at scale).

A shard folder holds:
- shards.json: {"format", "classes", "splits": {"train": [{"file", "count"}, ...], "val": [...]}};
- train-000000.tar, ..., val-000000.tar, ...: per sample "<key>.<ext>" (the image file's bytes as stored),
  "<key>.cls" (class index as text) and "<key>.src" (the source file's path, for messages). The key is the
  sample's position in its split, "%09d": it keys the sample's augmentation randomness, so that stays fixed by
  the shards.

Order. Evaluation reads a split in key order, exactly the samples asked for. Training: process r of W reads
shards r, r + W, r + 2W, ...; each pass over them visits its shards in an order drawn from (seed, epoch,
pass, rank) and each shard's samples in an order drawn from (seed, epoch, pass, shard); a process whose
shards run out starts another pass. So the sequence of global batches depends on the number of processes
(unlike image folders and Fashion-MNIST, whose global batches do not), but never on DataLoader workers:
every worker follows the same stream and decodes only its own batches.
"""
from __future__ import annotations

import bisect
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Iterator

import torch

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..process_group import rank_and_world
from ..utils import atomic_write
from .datasets import NO_AUGMENT, Batch, DataSpec, pins_memory, scan_image_folder, transform_images
from .images import UnreadableImageError, load_image
from .random import mix_int, permutation
from .transforms import AugmentConfig

log = logging.getLogger(__name__)

INDEX_FILE = "shards.json"
FORMAT = "coatnet-shards-v1"


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise ImportError("tar shards need the webdataset package: pip install 'coatnet[shards]'") from None
    return webdataset


def is_shard_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


def write_shards(image_folder: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000,
                 val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Write the train and val images of an ImageFolder root (train/ and val/, or class folders split by a
    seeded `val_fraction`, as `coatnet train --data` reads them) as tar shards of `shard_size` samples.
    Training samples are shuffled (seeded) before sharding so each shard mixes the classes. Returns the
    index written to out/shards.json (written last: a folder with it is complete). Files that do not decode
    as images are left out, each named with the reason (a warning) and listed in the index ("skipped")."""
    wds = _webdataset()
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be positive")
    out = Path(out)
    if is_shard_folder(out):
        raise FileExistsError(f"{out} already holds shards ({INDEX_FILE}); choose another --out")
    train, val, classes = scan_image_folder(image_folder, val_fraction, seed)
    train = [train[i] for i in permutation(seed, 0x5EA7, len(train)).tolist()]
    skipped = []
    for path, _ in train + val:  # a first pass decodes every file: a shard holds only readable images
        try:
            load_image(path)
        except UnreadableImageError as e:
            log.warning(f"warning: skipping unreadable file {path}: {e.reason}")
            skipped.append({"path": str(path), "reason": e.reason})
    if skipped:
        bad = {s["path"] for s in skipped}
        train, val = [s for s in train if str(s[0]) not in bad], [s for s in val if str(s[0]) not in bad]
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {}
    for split, samples in (("train", train), ("val", val)):
        splits[split] = []
        for first in range(0, len(samples), shard_size):
            name = f"{split}-{first // shard_size:06d}.tar"
            chunk = samples[first:first + shard_size]
            with atomic_write(out / name) as tmp, open(tmp, "wb") as f:
                writer = wds.TarWriter(f, encoder=False, mtime=0.0)  # mtime 0: identical input, identical bytes
                for key, (path, label) in enumerate(chunk, start=first):
                    ext = Path(path).suffix.lower().lstrip(".") or "img"
                    writer.write({"__key__": f"{key:09d}", ext: Path(path).read_bytes(),
                                  "cls": str(label).encode(), "src": str(path).encode()})
                writer.close()
            splits[split].append({"file": name, "count": len(chunk)})
    index = {"format": FORMAT, "classes": list(classes), "source": str(image_folder), "splits": splits,
             "counts": {s: sum(e["count"] for e in v) for s, v in splits.items()}, "skipped": skipped}
    with atomic_write(out / INDEX_FILE) as tmp:
        tmp.write_text(json.dumps(index, indent=1) + "\n")
    return index


def read_index(folder: str | os.PathLike) -> dict:
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {INDEX_FILE} (write shards with `coatnet shards`)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a coatnet shard index (format {index.get('format')!r})")
    return index


def _read_shard(path: Path) -> list[tuple[int, bytes, int]]:
    """All samples of one tar shard, in file order: (key as int, image bytes, label)."""
    wds = _webdataset()

    samples = []
    stream = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=lambda urls: urls,
                            workersplitter=lambda urls: urls, empty_check=False)
    for record in stream:
        images = [k for k in record if not k.startswith("__") and k not in ("cls", "src")]
        if len(images) != 1 or "cls" not in record:
            raise ValueError(f"{path}: sample {record.get('__key__')!r} needs one image and a .cls entry")
        samples.append((int(record["__key__"]), record[images[0]], int(record["cls"])))
    return samples


class _StreamBatches(torch.utils.data.IterableDataset):
    """Follows a sample stream and yields batch k = (uint8 images, labels, indices, failed keys) for the
    batches k this DataLoader worker owns (k mod workers). `plan[k]` is a batch size (training stream) or
    a sorted list of the keys to take (evaluation)."""

    def __init__(self, source: "ShardSource", plan: list, spec: DataSpec, train: bool, aug: AugmentConfig,
                 seed: int, epoch: int, skip: int, rank: int, world: int):
        self.source, self.plan, self.spec, self.train, self.aug = source, plan, spec, train, aug
        self.seed, self.epoch, self.skip, self.rank, self.world = seed, epoch, skip, rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = (self.source.train_stream(self.seed, self.epoch, self.rank, self.world) if self.train
                  else self.source.eval_stream(sorted({int(i) for b in self.plan for i in b})))
        for _ in range(self.skip):
            next(stream)
        for k, wanted in enumerate(self.plan):
            size = wanted if isinstance(wanted, int) else len(wanted)
            records = [next(stream) for _ in range(size)]
            if k % workers == worker:
                yield self._decode(records)

    def _decode(self, records):
        decoded, labels, indices, failed, reasons = [], [], [], [], []
        for key, data, label in records:
            try:
                decoded.append(load_image(io.BytesIO(data), self.spec.in_chans))
            except UnreadableImageError as e:  # unreadable or corrupt: reported by the engine
                failed.append(self.source.describe(key))
                reasons.append(e.reason)
                continue
            labels.append(label)
            indices.append(key)
        images = transform_images(decoded, indices, self.spec, self.train, self.aug, self.seed, self.epoch)
        shape = (0, self.spec.in_chans, self.spec.img_size, self.spec.img_size)
        return (torch.stack(images) if images else torch.zeros(shape, dtype=torch.uint8),
                torch.tensor(labels, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64), failed, reasons)


class ShardSource:
    """One split of a shard folder as a source of batches (the interface of FolderSource)."""

    streams = True  # training batches come from this process's shards, not from the requested indices

    def __init__(self, root: str | os.PathLike, split: str):
        self.root = Path(root)
        index = read_index(self.root)
        if split not in index["splits"]:
            raise ValueError(f"{self.root}: no {split!r} split (has {', '.join(index['splits'])})")
        self.classes = tuple(index["classes"])
        self.shards = [(self.root / e["file"], e["count"]) for e in index["splits"][split]]
        self.offsets = [0]
        for _, count in self.shards:
            self.offsets.append(self.offsets[-1] + count)
        missing = [str(p) for p, _ in self.shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"shard not found: {missing[0]}")

    def __len__(self) -> int:
        return self.offsets[-1]

    def describe(self, key: int) -> str:
        """Where sample `key` is, for a message: "<tar>#<key>", and the file it was written from when the shard
        records it (shards written before .src entries existed do not)."""
        shard = bisect.bisect_right(self.offsets, key) - 1
        path = self.shards[shard][0]
        try:
            with tarfile.open(path) as tar:
                member = tar.extractfile(f"{key:09d}.src")
                source = member.read().decode(errors="replace") if member is not None else None
        except (KeyError, OSError, tarfile.TarError):
            source = None
        return f"{path}#{key:09d}" + (f" (from {source})" if source else "")

    def rank_shards(self, rank: int, world: int) -> list[int]:
        """Positions of the shards process `rank` of `world` reads for training (every world-th)."""
        if len(self.shards) < world:
            raise ValueError(f"{self.root}: {len(self.shards)} training shard(s) cannot feed {world} processes; "
                             f"write at least one per process (a smaller --shard-size)")
        return list(range(rank, len(self.shards), world))

    def train_stream(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> Iterator[tuple[int, bytes, int]]:
        """Process `rank`'s endless training stream of (key, image bytes, label); see the module docstring."""
        mine = self.rank_shards(rank, world)
        for pass_ in range(1 << 30):
            for j in permutation(mix_int(seed, pass_, rank), epoch, len(mine)).tolist():
                samples = _read_shard(self.shards[mine[j]][0])
                for i in permutation(mix_int(seed, pass_, mine[j]), epoch, len(samples)).tolist():
                    yield samples[i]

    def eval_stream(self, keys: list[int]) -> Iterator[tuple[int, bytes, int]]:
        """The samples with these keys (sorted), read in order from the shards that hold them."""
        wanted = iter(keys)
        nxt = next(wanted, None)
        for s, (path, _) in enumerate(self.shards):
            if nxt is None:
                return
            if nxt >= self.offsets[s + 1]:
                continue
            for sample in _read_shard(path):
                while nxt is not None and sample[0] == nxt:
                    yield sample
                    nxt = next(wanted, None)
        if nxt is not None:
            raise ValueError(f"{self.root}: no sample with key {nxt}")

    def batches(self, index_batches: list[torch.Tensor], spec: DataSpec, *, train: bool = False,
                aug: AugmentConfig = NO_AUGMENT, seed: int = 0, epoch: int = 0, workers: int = 0,
                strict: bool = False, skip: int = 0, device: torch.device | None = None) -> Iterator[Batch]:
        """Training: batches of the sizes of `index_batches` from this process's stream, after skipping the
        `skip` samples it already trained on this epoch (resume). Evaluation: exactly the indexed samples.
        uint8 images, page-locked when `device`'s copies are asynchronous (CUDA).

        The DataLoader lives for one pass: every worker follows the pass's stream from its start (seed, epoch,
        rank), so its workers start once per epoch (unlike FolderSource's, which persist)."""
        rank, world = rank_and_world()
        plan = [len(b) for b in index_batches] if train else [b.tolist() for b in index_batches]
        if not train:
            keys = [i for b in plan for i in b]
            if any(a >= b for a, b in zip(keys, keys[1:])):
                raise ValueError("evaluation from shards reads them in order: indices must be increasing")
        else:
            self.rank_shards(rank, world)  # fail here, not in a worker, when there are too few shards
        dataset = _StreamBatches(self, plan, spec, train, aug, seed, epoch, skip, rank, world)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                             pin_memory=pins_memory(device), prefetch_factor=4 if workers else None)
        for images, labels, indices, failed, reasons in loader:
            if failed and strict:
                raise ValueError(f"cannot read image {failed[0]}: {reasons[0]} (run without --strict to skip "
                                 f"unreadable files)")
            yield Batch(images, labels, indices, failed, reasons)


def build_shard_data(root: str | os.PathLike, img_size: int | None, crop_fraction: float | None):
    """(train source, val source, DataSpec) of a shard folder: RGB images, ImageNet normalisation."""
    train, val = ShardSource(root, "train"), ShardSource(root, "val")
    spec = DataSpec(str(root), train.classes, 3, img_size or 224, 0.875 if crop_fraction is None else crop_fraction,
                    IMAGENET_MEAN, IMAGENET_STD)
    return train, val, spec
