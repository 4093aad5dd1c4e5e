import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_weights_on_this_machine(monkeypatch, tmp_path_factory):
    """Published weights are looked up in our weights folder and the Hugging Face cache: point both at
    empty folders, so that no test depends on what this machine has downloaded."""
    empty = tmp_path_factory.mktemp("no-weights")
    monkeypatch.setenv("COATNET_WEIGHTS", str(empty / "coatnet"))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hf"))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Nothing in the suite may reach the network: huggingface_hub and wandb are told to stay offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def one_thread():
    """One torch thread for small models: several threads on shared, busy CPUs spin far more than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def colour_images(tmp_path_factory):
    """An ImageFolder of 96 32x32 PNG files in 4 colour classes, 24 each (with --val-fraction 0.25:
    72 train, 24 val images)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for cls, colour in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230),
                        "white": (240, 240, 240)}.items():
        (root / cls).mkdir()
        for i in range(24):
            arr = np.clip(np.array(colour) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, colour_images):
    """A 2-epoch training run of coatnet_nano on `colour_images` at 32 px with TensorBoard logging: the run
    folder (config.json, metrics.jsonl, curves.png, checkpoints, tensorboard/). Seconds on one thread."""
    from coatnet.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        train(TrainConfig(model="coatnet_nano", data=str(colour_images), img_size=32, epochs=2, batch_size=16,
                          val_fraction=0.25, out=str(out), workers=0, threads=1, progress=False, quiet=True,
                          log="tensorboard"))
    return out
