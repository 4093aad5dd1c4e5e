"""Where the input pipeline's time goes on this machine, stage by stage, each alone in this process with one
torch thread (issue 23 item 2; `coatnet bench --input-pipeline` times the whole pipeline beside timm's):

- per image in the DataLoader worker: decode (`load_image`), the crop draws (`crop_params`), the box resample
  (`resize_crop`), the whole `transform_image`, and `transform_images` (what the worker runs: a batch's draws
  in one call);
- per batch in the training process: `train_inputs` (RandAugment, normalisation, Mixup) on the CPU, with the
  profiler's top operators.

    PYTHONPATH=src python3 scripts/profile_pipeline.py [--images 512] [--folder /tmp/pipe_jpegs]
"""
import argparse
import time
from pathlib import Path

import torch

from coatnet.data.datasets import DataSpec, FolderSource, scan_image_folder, transform_image, transform_images
from coatnet.data.images import load_image
from coatnet.data.transforms import crop_params
from coatnet.pipeline_bench import write_jpeg_folder
from coatnet.preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_crop
from coatnet.train.config import TrainConfig
from coatnet.train.recipes import get_recipe
from coatnet.train.run_data import augment_config, train_inputs
from coatnet.train.runtime import Runtime


def per_image(name: str, files: list, work) -> None:
    t0 = time.perf_counter()
    for i, path in enumerate(files):
        work(i, path)
    print(f"  {name:32s} {1e3 * (time.perf_counter() - t0) / len(files):6.3f} ms/image")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--folder", default="/tmp/pipe_jpegs", help="JPEG folder (generated there when missing)")
    p.add_argument("--img-size", type=int, default=224)
    args = p.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.folder)
    if not folder.is_dir():
        write_jpeg_folder(folder, args.images)
    train, val, classes = scan_image_folder(str(folder), 0.5, 0)
    samples = sorted(train + val)
    spec = DataSpec(str(folder), tuple(classes), 3, args.img_size, 0.875, IMAGENET_MEAN, IMAGENET_STD)
    aug = augment_config(TrainConfig(**{**get_recipe("paper"), "img_size": args.img_size}))
    files = [path for path, _ in samples]

    print(f"worker stages, per image ({len(files)} images of {folder}):")
    per_image("decode (load_image)", files, lambda i, path: load_image(path))
    images = [load_image(path) for path in files]
    per_image("crop draws (crop_params, 1 image)", files,
              lambda i, path: crop_params(0, 0, torch.tensor([i]), images[i].height, images[i].width, aug,
                                          args.img_size))
    per_image("box resample (resize_crop)", files,
              lambda i, path: resize_crop(images[i], (10.0, 20.0, 300.0, 250.0), args.img_size, True))
    per_image("transform_image (draws + resample)", files,
              lambda i, path: transform_image(images[i], i, spec, True, aug, 0, 0))
    t0 = time.perf_counter()
    for first in range(0, len(images), 64):
        transform_images(images[first:first + 64], list(range(first, first + len(images[first:first + 64]))), spec,
                         True, aug, 0, 0)
    print(f"  {'transform_images (batches of 64)':32s} {1e3 * (time.perf_counter() - t0) / len(images):6.3f} ms/image")

    source = FolderSource(samples)
    index_batches = list(torch.arange(len(source)).split(64))
    t0 = time.perf_counter()
    batches = list(source.batches(index_batches, spec, train=True, aug=aug, workers=0))
    print(f"decode + crop + flip in one process: {len(source) / (time.perf_counter() - t0):.0f} images/s")
    runtime = Runtime(torch.device("cpu"), "fp32", channels_last=False, compile=False)
    t0 = time.perf_counter()
    for batch in batches:
        train_inputs(batch, aug, spec, len(classes), 0, 0, runtime)
    print(f"batch augmentation on the CPU, one thread: {len(source) / (time.perf_counter() - t0):.0f} images/s")
    with torch.profiler.profile() as prof:
        for batch in batches[:3]:
            train_inputs(batch, aug, spec, len(classes), 0, 0, runtime)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
