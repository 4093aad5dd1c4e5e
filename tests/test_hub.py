"""Hub-format folders: `coatnet save-pretrained` writes config.json, model.safetensors and a model card made
from the run folder; `create_model(pretrained=DIR)`, `pretrained="hf-hub:user/name"` (the Hugging Face cache,
offline) and torch.hub load them; `coatnet push` uploads with huggingface_hub or fails in one line."""
import dataclasses
import hashlib
import json
import os
import shlex
from pathlib import Path

import pytest
import torch

import coatnet
from coatnet.cli import build_parser, main
from coatnet.cli.train import build_config
from coatnet.models.hub import HUB_FORMAT
from coatnet.publish import push_to_hub, save_pretrained, train_command
from coatnet.train.checkpoint import load_model
from coatnet.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub_folder(tiny_run, tmp_path_factory):
    return save_pretrained(tiny_run / "checkpoint-best.safetensors", tmp_path_factory.mktemp("hub") / "colours-nano",
                           repo_id="alice/colours-nano")


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_the_folder_holds_config_weights_card_and_curves(hub_folder, tiny_run):
    assert sorted(p.name for p in hub_folder.iterdir()) == ["README.md", "config.json", "curves.png",
                                                          "model.safetensors"]
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["format"] == HUB_FORMAT and config["library_name"] == "coatnet"
    assert config["architecture"] == "coatnet_nano" and config["num_classes"] == 4 and config["in_chans"] == 3
    assert config["img_size"] == [32, 32] and config["label_names"] == ["blue", "green", "red", "white"]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    best = json.loads((tiny_run / "config.json").read_text())
    assert config["model_config"] == best["model_config"]


def test_the_model_card_reports_the_run(hub_folder, tiny_run):
    card = (hub_folder / "README.md").read_text()
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: r["val_top1"])
    front = card.split("---")[1]
    assert "license: apache-2.0" in front and "library_name: coatnet" in front
    assert f"value: {best['val_top1']:.2f}" in front  # checkpoint-best's own top-1
    assert "| parameters | 956,256 |" in card and "| layout (S1-S4) | C-C-T-T" in card
    for r in records:  # every epoch of metrics.jsonl, as recorded
        assert f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_top1']:.2f} | {r['val_loss']:.4f} | " \
               f"{r['val_top1']:.2f} |" in card
    assert "![loss and top-1 per epoch](curves.png)" in card
    assert 'coatnet.create_model(pretrained="hf-hub:alice/colours-nano")' in card
    assert "72 for training, 24 for validation" in card and "classes: blue, green, red, white" in card


def test_the_cards_command_reproduces_the_runs_settings(hub_folder, tiny_run):
    card = (hub_folder / "README.md").read_text()
    command = card.split("## Training")[1].split("```bash\n")[1].split("\n```")[0]
    run = json.loads((tiny_run / "config.json").read_text())
    assert command == train_command(run) and command.startswith("coatnet train --data ")
    args = build_parser().parse_args(shlex.split(command)[1:])
    again = build_config(args).to_dict()
    recorded = TrainConfig.from_dict(run).to_dict()
    ignored = {"progress", "quiet", "resume", "recipe"}  # recipe: recorded only (None from Python)
    assert {k: v for k, v in again.items() if k not in ignored} == {k: v for k, v in recorded.items()
                                                                      if k not in ignored}


def test_commands_of_recipes_and_finetuning_name_only_what_differs():
    from coatnet.train import get_recipe

    recipe = TrainConfig().replace(**get_recipe("fashion-mnist-full"))
    run = dataclasses.replace(recipe, epochs=5, randaugment_n=2, augment=False, clip_grad=None).to_dict()
    cmd = train_command(run)
    assert cmd.startswith("coatnet train --recipe fashion-mnist-full ")
    words = shlex.split(cmd)
    assert "--epochs" in words and words[words.index("--epochs") + 1] == "5"
    assert "--randaugment" in words and words[words.index("--randaugment") + 1:][:2] == ["2", "15.0"]
    assert "--no-augment" in words and words[words.index("--clip-grad") + 1] == "0"
    assert "--model" not in words  # the recipe's own model
    ft = TrainConfig(recipe="finetune", pretrained="runs/a/checkpoint-best.safetensors", model="coatnet_nano",
                     epochs=30, lr=5e-5, schedule="constant", warmup_epochs=0.0, weight_decay=1e-8,
                     ema_decay=0.9999, ema_warmup=True, eval_before=True, img_size=64).to_dict()
    assert train_command(ft) == "coatnet finetune --checkpoint runs/a/checkpoint-best.safetensors --img-size 64"


def test_loading_the_folder_gives_the_checkpoints_network(hub_folder, tiny_run):
    reference, spec, _ = load_model(tiny_run / "checkpoint-best.safetensors")
    model = coatnet.create_model(pretrained=str(hub_folder))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(model, x), _logits(reference, x), rtol=0, atol=0)
    assert model.num_classes == 4 and model.config.image_size == (32, 32)
    same = coatnet.create_model("coatnet_nano", pretrained=hub_folder)  # naming the architecture is allowed
    torch.testing.assert_close(_logits(same, x), _logits(reference, x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds coatnet_nano, not coatnet_pico"):
        coatnet.create_model("coatnet_pico", pretrained=hub_folder)


def test_overrides_change_the_head_the_size_and_the_input_channels(hub_folder):
    base = coatnet.create_model(pretrained=hub_folder)
    bigger = coatnet.create_model(pretrained=hub_folder, num_classes=7, img_size=64)
    assert bigger.num_classes == 7 and bigger.config.image_size == (64, 64)
    table = "stages.3.blocks.0.attn.position_bias.relative_bias_table"
    assert bigger.state_dict()[table].shape[-2:] == (3, 3) and base.state_dict()[table].shape[-2:] == (1, 1)
    grey = coatnet.create_model(pretrained=hub_folder, in_chans=1)
    g = torch.rand(2, 1, 32, 32)
    # The adapted stem sees a grey image as the RGB model sees it repeated in every channel.
    torch.testing.assert_close(_logits(grey, g), _logits(base, g.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    features = coatnet.create_model(pretrained=hub_folder, features_only=True, out_indices=(3, 4))
    assert features.feature_info.channels() == [128, 256]


def _fake_hf_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub leaves after downloading `folder`'s files from `repo_id`: blobs named by
    hash, snapshot files linking to them, refs/main naming the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hf_hub_ids_load_from_the_hugging_face_cache_offline(hub_folder, monkeypatch, tmp_path):
    cache = tmp_path / "hf"
    snapshot = _fake_hf_cache(cache, "alice/colours-nano", hub_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    reference = coatnet.create_model(pretrained=hub_folder)
    x = torch.randn(1, 3, 32, 32)
    for model in (coatnet.create_model(pretrained="hf-hub:alice/colours-nano"),
                  coatnet.create_model("hf-hub:alice/colours-nano")):  # timm's spelling
        torch.testing.assert_close(_logits(model, x), _logits(reference, x), rtol=0, atol=0)
    # The fake cache is huggingface_hub's own layout: its offline lookup finds the same snapshot.
    huggingface_hub = pytest.importorskip("huggingface_hub")
    assert Path(huggingface_hub.snapshot_download("alice/colours-nano", local_files_only=True)) == snapshot


def test_a_repo_in_timms_format_loads_as_timms_weights(monkeypatch, tmp_path):
    src = coatnet.create_model("coatnet_nano_rw_224", num_classes=3).eval()
    folder = tmp_path / "timm-style"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "coatnet_nano_rw_224", "num_classes": 3}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    _fake_hf_cache(tmp_path / "hf", "bob/nano-rw", folder)
    model = coatnet.create_model(pretrained="hf-hub:bob/nano-rw")
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(_logits(model, x), _logits(src, x), rtol=0, atol=0)


def test_an_uncached_repo_offline_is_a_one_line_error():
    with pytest.raises(FileNotFoundError, match="hf-hub:alice/nothing-here is not in the Hugging Face cache"):
        coatnet.create_model(pretrained="hf-hub:alice/nothing-here")


def test_folders_that_are_not_hub_folders_are_named(tmp_path, tiny_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="a folder without config.json"):
        coatnet.create_model(pretrained=empty)
    with pytest.raises(FileExistsError, match="exists and is not a Hub folder of ours"):
        save_pretrained(tiny_run / "checkpoint-best.safetensors", tiny_run)
    with pytest.raises(ValueError, match="needs a model name"):
        coatnet.create_model()


def test_cli_save_pretrained_then_predict_and_eval_take_the_folder(tiny_run, tmp_path, capsys, colour_images):
    folder = tmp_path / "out"
    assert main(["save-pretrained", "--checkpoint", str(tiny_run / "checkpoint-last.safetensors"), str(folder),
                 "--license", "mit"]) == 0
    assert capsys.readouterr().out.strip() == f"{folder}: README.md, config.json, curves.png, model.safetensors"
    assert "license: mit" in (folder / "README.md").read_text()
    # saving again into our own folder replaces it
    assert main(["save-pretrained", "--checkpoint", str(tiny_run / "checkpoint-last.safetensors"), str(folder)]) == 0
    image = str(colour_images / "red" / "00.png")
    assert main(["predict", "--checkpoint", str(folder), image, "--json"]) == 0
    from_folder = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main(["predict", "--checkpoint", str(tiny_run / "checkpoint-last.safetensors"), image, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_folder
    assert main(["eval", "--checkpoint", str(folder), "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 24


def test_push_without_network_is_one_error_line(hub_folder, capsys):
    assert main(["push", str(hub_folder), "--repo", "alice/colours-nano"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not push") and "Traceback" not in err
    assert main(["push", str(hub_folder), "--repo", "not a repo"]) == 1
    assert "must look like 'user/name'" in capsys.readouterr().err


def test_push_creates_the_repo_and_uploads_the_folder(hub_folder, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message, allow_patterns):
            calls.append(("upload_folder", folder_path, repo_id, sorted(allow_patterns)))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(hub_folder, "alice/colours-nano", token="t0k", private=True)
    assert url == "https://huggingface.co/alice/colours-nano"
    assert calls == [("token", "t0k"), ("create_repo", "alice/colours-nano", True, True),
                     ("upload_folder", str(hub_folder), "alice/colours-nano",
                      ["README.md", "config.json", "curves.png", "model.safetensors"])]


def test_torch_hub_loads_from_a_local_clone(hub_folder):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entry_points = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert set(coatnet.list_models()) | {"create_model"} <= entry_points
    model = torch.hub.load(str(REPO_ROOT), "coatnet_nano", source="local", num_classes=3, img_size=64)
    assert model.num_classes == 3 and model.config.image_size == (64, 64)
    loaded = torch.hub.load(str(REPO_ROOT), "create_model", source="local", pretrained=str(hub_folder))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(coatnet.create_model(pretrained=hub_folder), x))
