"""Fine-tuning preparation: layer-wise learning-rate decay groups and frozen stages."""
import pytest
import torch

import coatnet
from coatnet.models.transfer import freeze_stages, layer_decay_groups, layer_depth


def small():
    return coatnet.create_model("coatnet_pico", depths=(1, 1, 1, 2, 1), widths=(16, 16, 32, 64, 128),
                                head_dim=16, num_classes=5)


def test_layer_depth_counts_stem_blocks_then_head():
    blocks = [1, 1, 2, 1]
    assert layer_depth("stem.layers.0.weight", blocks) == 0
    assert layer_depth("stages.0.blocks.0.conv1.weight", blocks) == 1
    assert layer_depth("stages.2.blocks.1.attn.qkv.weight", blocks) == 4
    assert layer_depth("head.weight", blocks) == layer_depth("norm.weight", blocks) == 6


def test_layer_decay_scales_fall_geometrically_towards_the_stem():
    model = small()
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert scale[id(params["head.weight"])] == 1.0
    assert scale[id(params["stages.3.blocks.0.mlp.fc1.weight"])] == 0.5
    assert scale[id(params["stem.layers.0.weight"])] == 0.5 ** 6
    assert decay[id(params["head.weight"])] == 0.05 and decay[id(params["head.bias"])] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(params)
    assert all(g["lr_scale"] == 1.0 for g in layer_decay_groups(model, 0.05))


def test_frozen_stages_get_no_gradient_and_keep_their_batchnorm_statistics():
    model = small()
    names = freeze_stages(model, 2)
    assert names and all(n.startswith(("stem.", "stages.0.", "stages.1.")) for n in names)
    stats = model.stages[1].blocks[0].norm1.running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 64, 64) * 3 + 1).sum().backward()
    assert torch.equal(model.stages[1].blocks[0].norm1.running_mean, stats)
    assert all(p.grad is None for n, p in model.named_parameters() if n in names)
    assert model.stages[2].blocks[0].attn.qkv.weight.grad is not None
    groups = layer_decay_groups(model, 0.05, 0.9)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="freeze_stages=5"):
        freeze_stages(model, 5)
