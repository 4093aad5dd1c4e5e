"""WebDataset shards: written from an image folder with the image bytes as stored; training streams split
the shards between processes; evaluation reads exactly the samples asked for."""
from __future__ import annotations

import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("webdataset")

from coatnet.cli import main  # noqa: E402
from coatnet.data import build_data  # noqa: E402
from coatnet.data.shards import ShardSource, write_shards  # noqa: E402
from coatnet.data.transforms import AugmentConfig  # noqa: E402


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "cow")):
        (root / name).mkdir()
        for i in range(10):
            # each image's mean colour encodes its class, so labels can be checked after decoding
            arr = np.full((20, 24, 3), 40 + 80 * c, dtype=np.uint8) + rng.integers(0, 3, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / (f"{i}.png" if i % 2 else f"{i}.bmp"))
    return root


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    write_shards(image_folder, out, shard_size=4, val_fraction=0.2, seed=0)
    return out


def test_shards_hold_every_image_once_with_its_bytes_and_class(image_folder, shards):
    index = json.loads((shards / "shards.json").read_text())
    assert index["classes"] == ["ant", "bee", "cow"]
    assert index["counts"] == {"train": 24, "val": 6}
    assert [e["count"] for e in index["splits"]["train"]] == [4] * 6
    originals = {p.read_bytes(): p.parent.name for p in image_folder.rglob("*.*")}
    seen = {}
    for entry in index["splits"]["train"] + index["splits"]["val"]:
        with tarfile.open(shards / entry["file"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if not name.endswith((".cls", ".src")):
                key = name.split(".")[0]
                assert index["classes"][int(members[key + ".cls"])] == originals[data]
                assert Path(members[key + ".src"].decode()).read_bytes() == data  # the source file, for messages
                seen[data] = key
    assert len(seen) == 30 and set(seen) == set(originals)


def test_training_shards_are_shuffled_across_classes(shards):
    labels = [label for _, _, label in itertools.islice(ShardSource(shards, "train").train_stream(0, 0), 4)]
    assert len(set(labels)) > 1


def test_each_process_streams_its_own_shards_and_together_they_cover_the_split(shards):
    src = ShardSource(shards, "train")
    assert src.rank_shards(0, 2) == [0, 2, 4] and src.rank_shards(1, 2) == [1, 3, 5]
    keys = []
    for rank in range(2):
        stream = src.train_stream(seed=0, epoch=3, rank=rank, world=2)
        mine = [next(stream)[0] for _ in range(12)]
        assert {k // 4 for k in mine} == set(src.rank_shards(rank, 2))  # key // shard_size = shard
        keys += mine
    assert sorted(keys) == list(range(24))


def test_the_training_stream_depends_on_the_epoch_and_cycles(shards):
    src = ShardSource(shards, "train")
    one = [k for k, _, _ in itertools.islice(src.train_stream(0, 0), 48)]
    assert sorted(one[:24]) == sorted(one[24:]) == list(range(24))  # a second pass when the shards run out
    assert one[:24] != one[24:]  # in another order
    assert one[:24] != [k for k, _, _ in itertools.islice(src.train_stream(0, 1), 24)]


def test_training_batches_do_not_depend_on_workers_and_skip_resumes(shards):
    src = ShardSource(shards, "train")
    _, _, spec = build_data(str(shards), img_size=32)
    aug = AugmentConfig(enabled=True)
    plan = [torch.arange(5), torch.arange(3), torch.arange(5), torch.arange(4)]
    runs = [list(src.batches(plan, spec, train=True, aug=aug, workers=w)) for w in (0, 2)]
    for a, b in zip(*runs):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert [len(b.labels) for b in runs[0]] == [5, 3, 5, 4]
    resumed = list(src.batches(plan[2:], spec, train=True, aug=aug, skip=8))
    assert [b.indices.tolist() for b in resumed] == [b.indices.tolist() for b in runs[0][2:]]


def test_evaluation_reads_exactly_the_requested_samples_with_their_labels(shards):
    _, val, spec = build_data(str(shards), img_size=32)
    batches = list(val.batches([torch.tensor([0, 2]), torch.tensor([3, 5])], spec))
    assert [b.indices.tolist() for b in batches] == [[0, 2], [3, 5]]
    for b in batches:  # the class is recoverable from the decoded colour (uint8 images: they cross to the device)
        assert b.images.dtype == torch.uint8
        assert torch.equal(((b.images.float().mean((1, 2, 3)) - 40) / 80).round().long(), b.labels)
    with pytest.raises(ValueError, match="increasing"):
        list(val.batches([torch.tensor([2, 0])], spec))


def test_too_few_shards_for_the_processes_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="6 training shard\\(s\\) cannot feed 8 processes"):
        ShardSource(shards, "train").rank_shards(0, 8)


def test_cli_writes_shards_and_refuses_to_overwrite(image_folder, tmp_path, capsys):
    assert main(["shards", "--from", str(image_folder), "--out", str(tmp_path / "s"), "--shard-size", "100"]) == 0
    assert "train 27 images in 1 shard(s), val 3 images in 1 shard(s)" in capsys.readouterr().out
    assert main(["shards", "--from", str(image_folder), "--out", str(tmp_path / "s")]) == 1
    assert "already holds shards" in capsys.readouterr().err
