"""Published weights: metadata, the eval transform derived from it, download without the network."""
import json
import os
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import coatnet
from coatnet.cli import main
from coatnet.models import pretrained
from coatnet.models.pretrained import WEIGHTS, get_weights


def test_every_tag_names_a_registered_model_and_a_complete_recipe():
    assert len(WEIGHTS) == 15
    for w in WEIGHTS.values():
        assert w.model in coatnet.list_models(), w.tag
        assert coatnet.get_config(w.model).image_size == (w.input_size, w.input_size), w.tag
        assert w.license == "apache-2.0" and w.hub_id == f"timm/{w.tag}"
        assert (w.top1 is None) == (w.num_classes != 1000), w.tag
        assert w.sha256 is None or len(w.sha256) == 64
    assert get_weights("coatnet_0_rw_224.sw_in1k").top1 == pytest.approx(82.39)
    assert get_weights("coatnet_rmlp_2_rw_384.sw_in12k_ft_in1k").crop_mode == "squash"
    with pytest.raises(ValueError, match="unknown weights tag"):
        get_weights("coatnet_9.x")


def test_eval_transform_resizes_crops_and_normalises():
    t = get_weights("coatnet_nano_rw_224.sw_in1k").eval_transform()  # crop 0.9, mean = std = 0.5
    image = Image.new("RGB", (500, 300), (255, 0, 128))
    x = t(image)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x[:, 100, 100], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))
    bn = get_weights("coatnet_bn_0_rw_224.sw_in1k").eval_transform()  # ImageNet mean/std
    assert bn(image)[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)
    squash = get_weights("coatnet_rmlp_2_rw_384.sw_in12k_ft_in1k").eval_transform()
    assert squash(Image.new("RGB", (100, 700))).shape == (3, 384, 384)


def test_download_without_huggingface_hub_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ValueError, match=r"pip install 'coatnet\[hub\]'"):
        pretrained.download("coatnet_0_rw_224.sw_in1k")


class FakeHub:
    """Stands in for huggingface_hub: records the request, serves a local file or fails offline."""

    def __init__(self, path=None):
        self.path, self.requests = path, []
        self.utils = type("utils", (), {"logging": type("logging", (), {"set_verbosity_error": staticmethod(
            lambda: None)})})

    def hf_hub_download(self, repo_id, filename):
        self.requests.append((repo_id, filename))
        if self.path is None:
            raise OSError("Name or service not known\nmore detail")
        return str(self.path)


def _install(monkeypatch, hub):
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setitem(sys.modules, "huggingface_hub.utils", hub.utils)


def test_download_offline_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    _install(monkeypatch, FakeHub())
    assert main(["download", "coatnet_0_rw_224.sw_in1k", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: could not download timm/coatnet_0_rw_224.sw_in1k from the Hugging Face Hub: "
                   "Name or service not known")


def test_download_copies_the_file_and_create_model_loads_it_by_tag(monkeypatch, tmp_path, capsys):
    src = coatnet.create_model("coatnet_nano_rw_224")
    fake = tmp_path / "hub.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(fake))
    hub = FakeHub(fake)
    _install(monkeypatch, hub)
    monkeypatch.setenv("COATNET_WEIGHTS", str(tmp_path / "weights"))
    assert main(["download", "coatnet_nano_rw_224.sw_in1k"]) == 0
    assert hub.requests == [("timm/coatnet_nano_rw_224.sw_in1k", "model.safetensors")]
    out = capsys.readouterr().out
    assert out.startswith(str(tmp_path / "weights" / "coatnet_nano_rw_224.sw_in1k.safetensors"))
    assert f"sha256 {pretrained.sha256_of(fake)}" in out
    model = coatnet.create_model("coatnet_nano_rw_224", pretrained="coatnet_nano_rw_224.sw_in1k")
    assert model.num_classes == 1000
    torch.testing.assert_close(model.state_dict()["head.weight"], src.state_dict()["head.weight"])
    assert main(["weights"]) == 0
    where = str(tmp_path / "weights" / "coatnet_nano_rw_224.sw_in1k.safetensors")
    assert any(line.startswith("coatnet_nano_rw_224.sw_in1k") and line.endswith(where)  # says where, not just yes
               for line in capsys.readouterr().out.splitlines())


def test_a_recorded_hash_that_does_not_match_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "hub.safetensors"
    fake.write_bytes(b"not the published file")
    _install(monkeypatch, FakeHub(fake))
    w = get_weights("coatnet_0_rw_224.sw_in1k")
    monkeypatch.setitem(WEIGHTS, w.tag, type(w)(**{**w.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="does not match the recorded"):
        pretrained.download(w.tag, tmp_path)
    assert not (tmp_path / f"{w.tag}.safetensors").exists()


def test_a_tag_that_is_not_downloaded_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("COATNET_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run `coatnet download coatnet_0_rw_224.sw_in1k`"):
        coatnet.create_model("coatnet_0_rw_224", pretrained="coatnet_0_rw_224.sw_in1k")


def _hf_cache_entry(cache, tag, state, filename="model.safetensors", commit="c0ffee"):
    """Lay out `state` the way huggingface_hub caches timm/<tag>: a blob, a snapshot symlink, refs/main."""
    repo = cache / f"models--timm--{tag}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    blob = repo / "blobs" / "0123abcd"
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(blob))
    else:
        torch.save(state, blob)
    (repo / "snapshots" / commit / filename).symlink_to(blob)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit / filename


def test_weights_that_timm_downloaded_load_by_tag_and_by_pretrained_true(monkeypatch, tmp_path, capsys):
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    src = coatnet.create_model("coatnet_nano_rw_224")
    path = _hf_cache_entry(cache, "coatnet_nano_rw_224.sw_in1k", src.state_dict())
    assert pretrained.find_weights("coatnet_nano_rw_224.sw_in1k") == path
    expected = src.state_dict()["stages.3.blocks.2.attn.position_bias.relative_bias_table"]
    for name, weights in [("coatnet_nano_rw_224", "coatnet_nano_rw_224.sw_in1k"),
                          ("coatnet_nano_rw_224", "timm/coatnet_nano_rw_224.sw_in1k"),
                          ("coatnet_nano_rw_224", True),  # timm's default tag for the model
                          ("coatnet_nano_rw_224.sw_in1k", True),
                          ("hf-hub:timm/coatnet_nano_rw_224.sw_in1k", True)]:
        model = coatnet.create_model(name, pretrained=weights)
        torch.testing.assert_close(model.state_dict()["stages.3.blocks.2.attn.position_bias.relative_bias_table"],
                                   expected, rtol=0, atol=0, msg=f"{name} {weights}")
    assert main(["weights", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    have = {r["tag"]: r["path"] for r in rows if r["downloaded"]}
    assert have == {"coatnet_nano_rw_224.sw_in1k": str(path)}


def test_the_hf_cache_prefers_refs_main_and_safetensors_and_reads_bin_files(monkeypatch, tmp_path):
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    src = coatnet.create_model("coatnet_pico_rw_224", num_classes=3)
    # An older snapshot that refs/main does not name must not win.
    bin_path = _hf_cache_entry(cache, "coatnet_0_rw_224.sw_in1k", src.state_dict(), "pytorch_model.bin", "new")
    old = bin_path.parents[1] / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"stale")
    assert pretrained.find_weights("coatnet_0_rw_224.sw_in1k") == bin_path
    model = coatnet.create_model("coatnet_pico_rw_224", pretrained="coatnet_0_rw_224.sw_in1k")
    assert model.num_classes == 3  # the class count of the checkpoint
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert pretrained.hf_cache_dir() == tmp_path / "home" / "hub"


def test_model_names_with_tags_and_pretrained_true_without_weights():
    assert pretrained.default_tag("coatnet_2_rw_224") == "coatnet_2_rw_224.sw_in12k_ft_in1k"  # timm's default
    assert pretrained.default_tag("coatnet_rmlp_2_rw_224") == "coatnet_rmlp_2_rw_224.sw_in12k_ft_in1k"
    assert pretrained.default_tag("coatnet_0_224") is None
    # A tag picks its head, as in timm: ImageNet-12k has 11821 classes.
    assert coatnet.get_config("coatnet_2_rw_224.sw_in12k").num_classes == 11821
    assert coatnet.get_config("coatnet_2_rw_224.sw_in12k", num_classes=5).num_classes == 5
    with pytest.raises(ValueError, match="coatnet_0_224 has no published weights"):
        coatnet.create_model("coatnet_0_224", pretrained=True)
    with pytest.raises(ValueError, match="unknown weights tag 'coatnet_0_rw_224.nope'"):
        coatnet.create_model("coatnet_0_rw_224.nope")
    with pytest.raises(FileNotFoundError, match="nor in the Hugging Face cache"):
        coatnet.create_model("coatnet_0_rw_224", pretrained=True)
    assert pretrained.weights_of("/x/models--timm--coatnet_0_rw_224.sw_in1k/snapshots/1/model.safetensors").tag \
        == "coatnet_0_rw_224.sw_in1k"
    assert pretrained.weights_of("/x/coatnet_1_rw_224.sw_in1k.safetensors").tag == "coatnet_1_rw_224.sw_in1k"
    assert pretrained.weights_of("/x/model.safetensors") is None


def test_eval_of_published_weights_uses_their_own_transform(monkeypatch, tmp_path, colour_images, capsys):
    """`coatnet eval --checkpoint TAG --data FOLDER`: the weights' resize/crop/mean/std (nano: crop 0.9,
    mean = std = 0.5, bicubic), class folders in sorted order, and the same numbers as doing it by hand."""
    import torch.nn.functional as F

    monkeypatch.setenv("COATNET_WEIGHTS", str(tmp_path))
    tag = "coatnet_nano_rw_224.sw_in1k"
    src = coatnet.create_model("coatnet_nano_rw_224", num_classes=4).eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / f"{tag}.safetensors"))
    assert main(["eval", "--checkpoint", tag, "--data", str(colour_images), "--subset", "12", "--batch-size", "5",
                 "--threads", "1", "--workers", "0"]) == 0
    got = json.loads(capsys.readouterr().out)
    transform = get_weights(tag).eval_transform()
    classes = sorted(p.name for p in colour_images.iterdir())
    files = [(p, k) for k, c in enumerate(classes) for p in sorted((colour_images / c).iterdir())]
    from coatnet.train.evaluate import subset_indices
    chosen = [files[i] for i in subset_indices(len(files), 12, 0, stream=7).tolist()]
    with torch.no_grad():
        logits = src(torch.stack([transform(Image.open(p)) for p, _ in chosen]))
    labels = torch.tensor([k for _, k in chosen])
    assert got["n"] == 12 and got["model"] == "coatnet_nano_rw_224" and got["weights"] == tag
    assert got["top1"] == pytest.approx(100.0 * (logits.argmax(-1) == labels).float().mean().item())
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
    assert got["published_top1"] == pytest.approx(81.698)
    # The ImageNet statistics of our own folder pipeline would give another loss: the check can tell.
    imagenet = (transform(Image.open(chosen[0][0])) * 0.5 + 0.5 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]
                ) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        assert (src(imagenet[None]) - logits[:1]).abs().max() > 1e-2
    assert main(["eval", "--checkpoint", tag, "--data", str(colour_images / "red")]) == 1
    assert capsys.readouterr().err.startswith(f"error: no images under {colour_images / 'red'}/<class>/")
    assert main(["eval", "--checkpoint", tag]) == 1
    assert "pass --data FOLDER" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Fashion-MNIST IDX files not present")
def test_eval_refuses_a_model_name_for_our_own_checkpoints(tmp_path, capsys):
    from coatnet.train import TrainConfig, train

    train(TrainConfig(out=str(tmp_path / "run"), train_subset=32, val_subset=32, batch_size=32, epochs=1,
                      progress=False, quiet=True, threads=1))
    ckpt = str(tmp_path / "run" / "checkpoint-last.safetensors")
    assert main(["eval", "--checkpoint", ckpt, "--model", "coatnet_0_rw_224", "--data", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"error: --model is for timm's files: {ckpt} records its own model"
