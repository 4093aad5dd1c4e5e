"""Data: IDX reading, image decoding, folder scanning, counter-based randomness, batched transforms."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from coatnet.data import load_fashion_mnist, load_image, read_idx
from coatnet.data.datasets import Batch, DataSpec, FolderSource, TensorSource, scan_image_folder
from coatnet.data.random import permutation, uniform
from coatnet.data.transforms import (AugmentConfig, center_crop_box, mix_batch, rand_augment, random_crop_boxes,
                                     random_erase, resized_crop)

FMNIST = "/usr/share/datasets/fashion-mnist"


def _write_idx(path, arr: np.ndarray, gz: bool):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips_shape_and_values(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    _write_idx(path, arr, gz)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="bytes of data"):
        read_idx(tmp_path / "short")


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_has_its_published_sizes():
    images, labels = load_fashion_mnist(FMNIST, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def _save(path, mode, size=(20, 12)):
    if mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], 65535, dtype=np.uint16))
    elif mode == "P":
        img = Image.new("RGB", size, (200, 10, 10)).convert("P", palette=Image.ADAPTIVE)
    else:
        img = Image.new(mode, size, {"L": 128, "RGB": (255, 0, 0), "RGBA": (0, 255, 0, 40), "LA": (90, 10)}[mode])
    img.save(path)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16"])
def test_load_image_converts_every_mode_to_8bit(tmp_path, mode):
    path = tmp_path / "a.png"
    _save(path, mode)
    rgb, gray = np.asarray(load_image(path, 3)), np.asarray(load_image(path, 1))
    assert rgb.shape == (12, 20, 3) and rgb.dtype == np.uint8 and gray.shape == (12, 20)
    if mode == "I;16":
        assert gray.min() == 255  # 65535 is full scale
    if mode == "RGBA":
        assert tuple(rgb[0, 0]) == (0, 255, 0)  # alpha dropped, colour kept
    if mode == "P":
        assert abs(int(rgb[0, 0, 0]) - 200) <= 2


def _folder(root, counts: dict, size=(24, 16)):
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", size, (i * 10, 0, 0)).save(root / cls / f"{i}.png")


def test_folder_split_is_seeded_stratified_and_disjoint(tmp_path):
    _folder(tmp_path, {"a": 10, "b": 20})
    train, val, classes = scan_image_folder(tmp_path, 0.2, seed=0)
    assert classes == ["a", "b"]
    assert [lab for _, lab in val].count(0) == 2 and [lab for _, lab in val].count(1) == 4
    assert not {p for p, _ in train} & {p for p, _ in val} and len(train) + len(val) == 30
    assert scan_image_folder(tmp_path, 0.2, seed=0)[1] == val
    assert scan_image_folder(tmp_path, 0.2, seed=1)[1] != val


def test_folder_with_train_and_val_uses_them(tmp_path):
    _folder(tmp_path / "train", {"x": 3, "y": 2})
    _folder(tmp_path / "val", {"y": 1})
    train, val, classes = scan_image_folder(tmp_path, 0.5, seed=0)
    assert classes == ["x", "y"] and len(train) == 5 and val == [(str(tmp_path / "val/y/0.png"), 1)]


def test_uniform_depends_on_sample_not_on_batch():
    idx = torch.arange(1000, 1100)
    u = uniform(3, 2, idx, 5)
    assert torch.equal(uniform(3, 2, idx[10:20], 5), u[10:20])
    assert not torch.equal(uniform(3, 3, idx, 5), u) and not torch.equal(uniform(3, 2, idx, 6), u)
    big = uniform(0, 0, torch.arange(20000), 1)
    assert 0 <= big.min() and big.max() < 1 and abs(big.mean().item() - 0.5) < 0.01
    p = permutation(0, 1, 50)
    assert sorted(p.tolist()) == list(range(50)) and torch.equal(p, permutation(0, 1, 50))


def test_random_crop_boxes_lie_inside_and_follow_the_scale():
    u = uniform(0, 0, torch.arange(4000), 9).view(1000, 4)
    boxes = random_crop_boxes(u, 28, 28, (0.35, 1.0), (3 / 4, 4 / 3))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 28 + 1e-4).all() and (y0 + h <= 28 + 1e-4).all()
    frac = w * h / 784
    assert frac.min() >= 0.3 and frac.max() <= 1.0 + 1e-4


def test_center_crop_box_and_resized_crop():
    assert center_crop_box(100, 200, 0.5, 32, 32) == (75.0, 25.0, 50.0, 50.0)
    x = torch.rand(2, 3, 32, 32)
    full = torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2)
    torch.testing.assert_close(resized_crop(x, full, (32, 32)), x)
    torch.testing.assert_close(resized_crop(x, full, (32, 32), torch.tensor([True, False]))[0], x[0].flip(-1))


def test_rand_augment_is_per_sample_and_stays_in_range():
    x = torch.rand(16, 3, 32, 32)
    idx = torch.arange(100, 116)
    out = rand_augment(x, 0, 1, idx, n=2, m=15)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    torch.testing.assert_close(rand_augment(x[4:10], 0, 1, idx[4:10], n=2, m=15), out[4:10])


@pytest.mark.parametrize("height,width", [(224, 224), (7, 12), (1, 5)])
def test_randaugments_affine_grid_is_torchs(height, width):
    """The broadcast grid of the geometric ops is F.affine_grid's (align_corners=False) for any theta and size;
    a rotation by 90 degrees of a square image moves its pixels as torch.rot90 does."""
    from coatnet.data.transforms import affine_grid

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(height))
    ref = torch.nn.functional.affine_grid(theta, [5, 3, height, width], align_corners=False)
    got = affine_grid(theta, height, width)
    assert got.shape == ref.shape == (5, height, width, 2)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    x = torch.rand(1, 3, 8, 8)
    quarter = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])
    turned = torch.nn.functional.grid_sample(x, affine_grid(quarter, 8, 8), align_corners=False)
    torch.testing.assert_close(turned, torch.rot90(x, 1, (2, 3)), rtol=0, atol=1e-6)


def test_in_place_augmentation_computes_the_same_numbers_and_leaves_a_float_batch_intact():
    """rand_augment/normalize with inplace=True: the same numbers as the copying forms, on the caller's tensor;
    train_inputs changes in place only the float copy it made of uint8 images, never float images it was given
    (on a CPU those are the data set's own memory)."""
    from coatnet.data.transforms import normalize
    from coatnet.train.run_data import train_inputs
    from coatnet.train.runtime import Runtime

    x = torch.rand(12, 3, 24, 24)
    idx = torch.arange(12)
    ref = rand_augment(x, 3, 1, idx, n=2, m=15)
    y = x.clone()
    assert rand_augment(y, 3, 1, idx, n=2, m=15, inplace=True) is y and torch.equal(y, ref)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ref = normalize(x, mean, std)
    assert torch.equal(x, y := x.clone()) and torch.equal(normalize(y, mean, std), ref) and torch.equal(y, x)
    assert normalize(y, mean, std, inplace=True) is y and torch.equal(y, ref)
    u8 = (x * 255).round().to(torch.uint8)
    before = u8.clone()
    normalize(u8, mean, std)
    assert torch.equal(u8, before)

    spec = DataSpec("t", tuple("abc"), 3, 24, 1.0, mean, std)
    aug = AugmentConfig(randaugment_n=2, randaugment_m=15, label_smoothing=0.1)
    runtime = Runtime(torch.device("cpu"), "fp32", channels_last=False, compile=False)
    batch = Batch(images=x.clone(), labels=idx % 3, indices=idx)
    out_float, _, _ = train_inputs(batch, aug, spec, 3, 5, 0, runtime)
    assert torch.equal(batch.images, x)  # the caller's float images untouched
    batch8 = Batch(images=u8.clone(), labels=idx % 3, indices=idx)
    out_u8, _, _ = train_inputs(batch8, aug, spec, 3, 5, 0, runtime)
    assert torch.equal(batch8.images, u8)
    torch.testing.assert_close(out_u8, train_inputs(Batch(u8.float().div(255), idx % 3, idx), aug, spec, 3, 5, 0,
                                                    runtime)[0])
    assert not torch.equal(out_float, normalize(x, mean, std))  # RandAugment did act


def test_label_smoothing_and_mixup_targets():
    x = torch.rand(8, 1, 8, 8)
    labels = torch.arange(8) % 4
    idx = torch.arange(8)
    _, t = mix_batch(x, labels, 4, 0, 0, idx, AugmentConfig(label_smoothing=0.1))
    assert torch.allclose(t[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))
    aug = AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0)
    mixed, t = mix_batch(x, labels, 4, 0, 0, idx, aug)
    torch.testing.assert_close(t.sum(1), torch.ones(8))
    lam = t[0, 0].item()  # sample 0 (class 0) pairs with sample 1 (class 1)
    assert t[0, 1].item() == pytest.approx(1 - lam, abs=1e-6) and 0 <= lam <= 1
    m2, t2 = mix_batch(x[2:6], labels[2:6], 4, 0, 0, idx[2:6], aug)  # a slice at an even offset
    torch.testing.assert_close(m2, mixed[2:6])
    torch.testing.assert_close(t2, t[2:6])


def test_random_erasing_blanks_one_box_of_the_stated_size_in_the_stated_share_of_images():
    """Zhong et al.'s erasing: with probability p one axis-aligned box of 2-33% of the image, aspect 0.3-3.3, set
    to 0 (the mean after normalisation) in every channel; the rest of the image untouched; per sample, not per batch."""
    n, side = 4000, 32
    x = torch.randn(n, 3, side, side).abs_() + 1  # no pixel is 0 before erasing
    idx = torch.arange(n)
    out = random_erase(x, 7, 2, idx, AugmentConfig(erase_prob=0.3))
    zero = out == 0
    erased = zero.flatten(1).any(1)
    assert abs(erased.float().mean().item() - 0.3) < 0.03
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])  # all channels
    assert torch.equal(out[~zero], x[~zero])
    areas = []
    for mask in zero[erased, 0][:300]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w and mask.sum() == h * w  # one box
        areas.append(h * w / side**2)
    assert 0.015 <= min(areas) and max(areas) <= 0.36 and 0.12 < sum(areas) / len(areas) < 0.22  # uniform 0.02..0.33
    torch.testing.assert_close(random_erase(x[100:110], 7, 2, idx[100:110], AugmentConfig(erase_prob=0.3)),
                               out[100:110])
    assert not torch.equal(random_erase(x, 7, 3, idx, AugmentConfig(erase_prob=0.3)), out)  # new draws each epoch
    assert random_erase(x, 7, 2, idx, AugmentConfig()) is x


def test_sharpness_is_pils_kernel_blend_with_the_border_kept():
    """RandAugment's sharpness: the image blended from its [[1,1,1],[1,5,1],[1,1,1]]/13 smoothing (clipped) by a
    per-sample factor, the 1-pixel border untouched: kornia's arithmetic, written as separable sums."""
    import kornia.enhance as KE

    from coatnet.data.transforms import _sharpness

    torch.manual_seed(0)
    x, f = torch.rand(6, 3, 9, 12), torch.tensor([0.0, 0.5, 1.0, 1.5, 1.9, 0.1])
    out = _sharpness(x, f)
    torch.testing.assert_close(out, KE.sharpness(x, f).clamp(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2], x[2])  # factor 1: the image
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    smooth = (x[0, 1, 3:6, 4:7] * k).sum().clamp(0, 1)
    assert out[0, 1, 4, 5].item() == pytest.approx(smooth.item(), abs=1e-6)  # factor 0: the smoothing
    assert torch.equal(out[:, :, [0, -1]], x[:, :, [0, -1]]) and torch.equal(out[..., [0, -1]], x[..., [0, -1]])


def test_posterize_keeps_the_top_bits_of_each_8_bit_level_as_kornia_does():
    """RandAugment's posterize: level trunc(255 x) -> its top `bits` bits, per sample; 8 bits: the image as is.
    Every one of the 256 levels and random values, for every bit count: kornia's numbers exactly."""
    import kornia.enhance as KE

    from coatnet.data.transforms import _posterize

    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    x.view(8, -1)[:, :256] = torch.arange(256) / 255
    bits = torch.arange(1, 9, dtype=torch.int32)  # one bit count per sample
    out = _posterize(x, bits)
    assert torch.equal(out, KE.posterize(x, bits.to(torch.uint8)))
    assert torch.equal(out[7], x[7])
    assert out[0].unique().tolist() == pytest.approx([0.0, 128 / 255])  # 1 bit: two levels
    assert out[2].view(-1)[255].item() == pytest.approx(224 / 255)  # 3 bits: 255 -> 0b11100000


def test_tensor_source_eval_resizes_and_train_augments_deterministically():
    imgs = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    src = TensorSource(imgs, torch.arange(10))
    spec = DataSpec("t", tuple("abcdefghij"), 1, 32, 1.0, (0.5,), (0.5,))
    (b,) = list(src.batches([torch.arange(10)], spec))
    assert b.images.shape == (10, 1, 32, 32) and 0 <= b.images.min() and b.images.max() <= 1
    aug = AugmentConfig(crop_scale=(0.35, 1.0))
    (t1,) = list(src.batches([torch.arange(10)], spec, train=True, aug=aug))
    (t2,) = list(src.batches([torch.tensor([3, 4])], spec, train=True, aug=aug))
    torch.testing.assert_close(t1.images[3:5], t2.images)


def test_folder_source_skips_unreadable_files_and_names_them(tmp_path):
    _folder(tmp_path, {"a": 3})
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    train, _, classes = scan_image_folder(tmp_path, 0.01, seed=0)
    src = FolderSource(train)
    spec = DataSpec("f", tuple(classes), 3, 32, 0.875, (0.5,) * 3, (0.5,) * 3)
    batches = list(src.batches([torch.arange(len(train))], spec, train=True, aug=AugmentConfig()))
    assert batches[0].images.shape == (3, 3, 32, 32)
    assert [os.path.basename(p) for p in batches[0].failed] == ["broken.png"]
    with pytest.raises(ValueError, match="broken.png"):
        list(src.batches([torch.arange(len(train))], spec, train=True, aug=AugmentConfig(), strict=True))


def test_folder_workers_persist_from_one_epoch_to_the_next_and_follow_the_epoch(tmp_path):
    """One DataLoader per setting, its workers started once: the second epoch is decoded by the same
    processes, with the second epoch's crops (the epoch travels with each sample's key)."""
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "a").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{i}.png")
    train, _, classes = scan_image_folder(tmp_path, 0.01, seed=0)
    spec = DataSpec("f", tuple(classes), 3, 32, 0.875, (0.5,) * 3, (0.5,) * 3)
    plan, aug = [torch.arange(3), torch.arange(3, 6)], AugmentConfig()
    src = FolderSource(train)
    try:
        epoch0 = list(src.batches(plan, spec, train=True, aug=aug, workers=1))
        (entry,) = src._loaders.values()
        workers = [w.pid for w in entry.loader._iterator._workers]
        epoch1 = list(src.batches(plan, spec, train=True, aug=aug, epoch=1, workers=1))
        alive = entry.loader._iterator._workers
        assert [w.pid for w in alive] == workers and all(w.is_alive() for w in alive)
    finally:
        src.close()
    fresh = list(FolderSource(train).batches(plan, spec, train=True, aug=aug, epoch=1, workers=0))
    assert all(b.images.dtype == torch.uint8 for b in epoch1)
    assert all(torch.equal(a.images, b.images) for a, b in zip(epoch1, fresh))
    assert not all(torch.equal(a.images, b.images) for a, b in zip(epoch0, epoch1))


def test_a_training_batch_in_the_worker_crops_as_its_images_one_by_one(tmp_path):
    """_FolderDataset.__getitems__ draws a batch's crops in one call (images of different sizes, an unreadable
    file among them): every image and every failure exactly as __getitem__ gives them one at a time."""
    import numpy as np
    from PIL import Image

    from coatnet.data.datasets import _FolderDataset

    rng = np.random.default_rng(0)
    samples = []
    for k, (w, h) in enumerate([(40, 30), (33, 57), (64, 64), (20, 90), (71, 45)]):
        path = tmp_path / f"{k}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), k % 2))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    samples.insert(2, (str(tmp_path / "bad.png"), 0))
    spec = DataSpec("x", ("a", "b"), 3, 32, 0.875, (0.5,) * 3, (0.5,) * 3)
    dataset = _FolderDataset(samples, spec, True, AugmentConfig(crop_scale=(0.2, 1.0)), seed=3)
    keys = [(4, i) for i in range(len(samples))]
    batched, single = dataset.__getitems__(keys), [dataset[key] for key in keys]
    assert [b[1:] for b in batched] == [s[1:] for s in single] and batched[2][0] is None and batched[2][4]
    assert all(torch.equal(b[0], s[0]) for b, s in zip(batched, single) if s[0] is not None)
    assert not torch.equal(batched[0][0], dataset[(5, 0)][0])  # the draws follow the epoch


def test_translate_shifts_by_whole_pixels_with_zeros_alike_in_memory_and_in_the_folder_worker():
    """--translate N: each training image moves by -N..N whole output pixels along x and y (every shift drawn,
    the draws a function of seed, epoch and index), zeros filling in: the pad-and-crop of CIFAR training. The
    in-memory grid_sample and the workers' Pillow resampling give the same pixels."""
    from coatnet.data.datasets import transform_images
    from coatnet.data.transforms import shift_boxes

    n, size, pixels = 200, 32, 3
    imgs = torch.randint(1, 256, (n, 1, size, size), dtype=torch.uint8)  # no zero pixel: the fill is visible
    spec = DataSpec("t", tuple("ab"), 1, size, 1.0, (0.5,), (0.5,))
    aug = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, translate=pixels)
    (batch,) = list(TensorSource(imgs, torch.zeros(n, dtype=torch.long)).batches([torch.arange(n)], spec,
                                                                                 train=True, aug=aug, seed=5, epoch=2))
    full = torch.tensor([[0.0, 0.0, size, size]]).expand(n, 4)
    dx, dy = shift_boxes(full, 5, 2, torch.arange(n), pixels, size)[:, :2].round().long().T
    assert set(dx.tolist()) == set(dy.tolist()) == set(range(-pixels, pixels + 1))
    padded = torch.nn.functional.pad(imgs, (pixels,) * 4)
    expected = torch.stack([padded[i, :, pixels + dy[i]:pixels + dy[i] + size, pixels + dx[i]:pixels + dx[i] + size]
                            for i in range(n)])
    torch.testing.assert_close(batch.images, expected.float() / 255, atol=1e-6, rtol=0)
    pil = [Image.fromarray(im[0].numpy()) for im in imgs]
    worker = torch.stack(transform_images(pil, list(range(n)), spec, True, aug, 5, 2))
    assert torch.equal(worker, expected)
    moved = list(TensorSource(imgs, torch.zeros(n, dtype=torch.long)).batches([torch.arange(n)], spec, train=True,
                                                                              aug=aug, seed=5, epoch=3))[0]
    assert not torch.equal(moved.images, batch.images)  # the next epoch draws anew

