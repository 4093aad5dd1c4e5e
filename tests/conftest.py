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
