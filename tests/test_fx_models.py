"""Contract tests for models traced with torch.fx: torchvision classifiers by name and user models given as
'package.module:function', over a broad but cheap sample (tiny variants, 1x28x28 or 1x32x32)."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig

from coderay import models
from coderay.blocks import Block, profile_blocks, split_model
from coderay.cli import main
from coderay.links import Link, link_kind
from coderay.models import StagedModel, get_model, is_known_model, list_models, list_torchvision_models

SMALL = (1, 28, 28)

# name -> (builder options, input shape): one or more per family, each built in well under a second.
SAMPLE = {
    "mobilenet_v3_small": ({"width_mult": 0.25}, SMALL),
    "mnasnet0_5": ({}, SMALL),
    "shufflenet_v2_x0_5": ({}, SMALL),
    "squeezenet1_1": ({}, SMALL),
    "regnet_x_400mf": ({}, SMALL),
    "efficientnet_b0": ({}, SMALL),
    "googlenet": ({}, SMALL),
    "torchvision.models:resnet18": ({"small_input": True}, SMALL),  # the traced twin of the registered one
    "torchvision.models.densenet:DenseNet": (
        {"growth_rate": 8, "block_config": (2, 2, 2), "num_init_features": 16},
        SMALL,
    ),
    "torchvision.models:VisionTransformer": (
        {"image_size": 28, "patch_size": 7, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32},
        SMALL,
    ),
    "torchvision.models:SwinTransformer": (
        {"patch_size": [4, 4], "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": [7, 7]},
        SMALL,
    ),
    "torchvision.models.convnext:ConvNeXt": (
        {"block_setting": [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]},
        (1, 32, 32),
    ),
}
pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, num_classes: int = 10) -> StagedModel:
    options, shape = SAMPLE[name]
    torch.manual_seed(0)
    return get_model(name, num_classes=num_classes, input_shape=shape, **options)


@functools.cache
def shared(name: str) -> StagedModel:
    return build(name).eval()


def batch(shape, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


def compose(blocks, x):
    for block in blocks:
        x = block(x)
    return x


@pytest.mark.parametrize("name", SAMPLE)
def test_blocks_compose_exactly_and_are_profiled(name):
    model = shared(name)
    x = batch(model.input_shape)
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == (2, 10)
        for n in (4, None):  # balanced by MACs; one block per stage (every valid cut)
            blocks = split_model(model, blocks=n) if n else split_model(model)
            assert [s for b in blocks for s in b.stages] == model.stage_names
            assert torch.equal(compose(blocks, x), expected)
    blocks = split_model(model, blocks=4)
    infos = profile_blocks(blocks, model.input_shape, batch_sizes=(1,), repeats=1)
    assert [i.index for i in infos] == [1, 2, 3, 4] and infos[-1].out_shape == (10,)
    assert all(a.out_shape == b.in_shape for a, b in zip(infos, infos[1:]))
    assert sum(i.params for i in infos) == sum(p.numel() for p in model.parameters())
    assert sum(i.macs for i in infos) == sum(model.stage_macs.values()) > 0
    assert all(i.latency_ms[1] > 0 for i in infos)
    macs = [i.macs for i in infos]
    assert max(macs) < 0.75 * sum(macs)  # balanced: no block carries nearly everything


@pytest.mark.parametrize("name", ["mnasnet0_5", "torchvision.models:VisionTransformer"])
def test_traced_blocks_are_frozen_and_stay_in_eval(name):
    model = build(name)
    blocks = split_model(model, blocks=3)
    x = batch(model.input_shape).requires_grad_()
    model.train()  # shared modules: the blocks must undo this
    out = compose(blocks, x)
    out.square().mean().backward()
    assert x.grad is not None
    for block in blocks:
        assert isinstance(block, Block) and not any(m.training for m in block.modules())
        assert all(not p.requires_grad and p.grad is None for p in block.parameters())
    with torch.no_grad():
        assert torch.equal(compose(blocks, x), out)


def test_cuts_only_where_one_tensor_crosses():
    model = shared("torchvision.models:resnet18")
    names = model.stage_names
    assert "layer1_0_relu_1" in names and "layer1_0_conv1" not in names  # inside a residual block: not a cut
    with pytest.raises(ValueError, match=r"'layer1_0_conv1' of .* is not a valid cut: 2 values cross it \(.*maxpool"):
        split_model(model, cuts=["layer1_0_conv1"])
    with pytest.raises(ValueError, match=r"valid cut points are \[.*'layer2_0_relu_1'.*--cuts"):
        split_model(model, cuts=["nonsense"])
    blocks = split_model(model, cuts=["layer1.1.relu_1", "layer3_1_relu_1"])  # torchvision's dotted names too
    assert [b.stages[-1] for b in blocks] == ["layer1_1_relu_1", "layer3_1_relu_1", "fc"]
    x = batch(SMALL)
    with torch.no_grad():
        assert torch.equal(compose(blocks, x), model(x))


def test_small_input_adaptation_is_general():
    small = shared("torchvision.models:resnet18")
    source = dict(small.named_modules())
    conv1 = next(m for k, m in source.items() if k.endswith(".conv1") and k.count(".") == 1)
    assert conv1.in_channels == 1 and conv1.stride == (1, 1) and conv1.kernel_size == (7, 7)  # kernel kept
    assert small.stage_shapes["layer4_1_relu_1"] == (512, 4, 4)  # 28 px end as 4x4, as the hand-staged one
    standard = get_model("torchvision.models:resnet18", num_classes=10, input_shape=(3, 64, 64))
    assert standard.stage_shapes["layer4_1_relu_1"] == (512, 2, 2)  # a user model is adapted only on request
    tv = get_model("shufflenet_v2_x0_5", num_classes=10, input_shape=SMALL)  # torchvision: auto below 64 px
    maps = [s for s in tv.stage_shapes.values() if len(s) == 3]
    assert maps[0][1:] == (28, 28) and maps[-1][1:] == (4, 4)  # stem and max-pool strides removed: 8x in all


def test_token_boundaries_get_links():
    model = shared("torchvision.models:VisionTransformer")
    tokens = [s for s in model.stage_shapes.values() if len(s) == 2]
    assert (16, 16) in tokens and (17, 16) in tokens  # 4x4 patches, then with the class token; dim 16
    convs = [(32, 7, 7), (8, 14, 14)]
    x = batch((17, 16), 64)
    for src, dst in [
        ((17, 16), (17, 16)),
        ((17, 16), (8, 4, 4)),
        ((17, 16), (5,)),
        ((32, 7, 7), (17, 16)),
        ((17, 16), (50, 24)),
    ]:
        link = Link(src, dst, relu=False)
        inp = batch(src, 64) if src != (17, 16) else x
        with torch.no_grad():
            target = Link(src, dst, relu=False).eval()(inp)
        assert link.init_lstsq(inp, target, ridge=1e-8) < 1e-3, link.kind
        assert tuple(link.eval()(inp).shape[1:]) == dst
    # onto a larger map: fitted at 4x4 against the target averaged down, resized after projecting. With every
    # patch alike, averaging down and resizing up lose nothing, so another such link's output is fitted to ~0
    alike = batch((1, 16), 64).expand(-1, 17, -1)
    with torch.no_grad():
        target = Link((17, 16), (8, 14, 14), relu=False).eval()(alike)
    up = Link((17, 16), (8, 14, 14), relu=False)
    assert up.init_lstsq(alike, target, ridge=1e-8) < 1e-3 and tuple(up.eval()(alike).shape[1:]) == (8, 14, 14)
    assert link_kind((17, 16), convs[0]) == "tokens→conv"
    with pytest.raises(ValueError, match="no link"):
        link_kind((16,), (17, 16))


def test_names_are_known_without_building():
    names = list_torchvision_models()
    assert {"vgg11", "efficientnet_b0", "vit_b_16", "swin_t", "resnet50"} <= set(names)
    assert all(is_known_model(n) for n in ("vgg11", "small_cnn", "my_pkg.models:build_net"))  # config checks this
    assert list_models() == sorted(models._REGISTRY)  # the hand-staged ones only
    assert is_known_model("vgg11") and is_known_model("a.b:c") and not is_known_model("vgg99")
    assert not is_known_model("a.b:") and not is_known_model(3)
    with pytest.raises(ValueError, match="unknown model 'vgg99'.*--list"):
        get_model("vgg99", num_classes=10)
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        get_model("no_such_pkg.mod:fn", num_classes=10)
    with pytest.raises(ValueError, match="no callable 'nope'"):
        get_model("torchvision.models:nope", num_classes=10)
    with pytest.raises(TypeError, match="mnasnet0_5: builder rejected options \\['widht'\\]"):
        get_model("mnasnet0_5", num_classes=10, widht=2)


def test_untraceable_and_too_small_models_are_refused():
    class Dynamic(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(x.flatten(1)[:, :4]) if x.sum() > 0 else self.fc(x.flatten(1)[:, 4:8])

    with pytest.raises(TypeError, match="does not trace with torch.fx"):
        models.trace_model(Dynamic(3), arch="dynamic", input_shape=SMALL)
    with pytest.raises(ValueError, match="vit_b_32 cannot take input_shape"):
        get_model("vit_b_32", num_classes=10, input_shape=SMALL)  # 28 px is not a multiple of its 32 px patch


def test_torchvision_checkpoint_loads_into_a_traced_model(tmp_path, caplog):
    """An ImageNet-shaped (3-channel, 1000-class) state_dict on disk: shapes that match load, the stem's
    kernels are summed into one input channel, the new head keeps its init. Nothing is downloaded."""
    torch.manual_seed(0)
    tv = torchvision.models.mnasnet0_5(num_classes=1000)
    path = tmp_path / "mnasnet0_5.pth"
    torch.save(tv.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="coderay.models"):
        model = get_model("mnasnet0_5", num_classes=10, input_shape=SMALL, weights=path)
    params = dict(model.named_parameters())
    stem = next(v for k, v in params.items() if k.endswith("layers.0.weight"))
    assert torch.equal(stem, tv.layers[0].weight.sum(dim=1, keepdim=True))
    deep = next(v for k, v in params.items() if k.endswith("layers.9.1.layers.0.weight"))
    assert torch.equal(deep, tv.layers[9][1].layers[0].weight)
    assert "classifier.1.weight" in caplog.text and "torchvision" in caplog.text
    # and the coderay round trip (what train.py caches) is exact
    path2 = tmp_path / "coderay.pth"
    torch.save(model.state_dict(), path2)
    again = get_model("mnasnet0_5", num_classes=10, input_shape=SMALL, weights=path2).eval()
    x = batch(SMALL)
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))


def test_cli_blocks_json_and_cuts(capsys):
    assert main(["blocks", "squeezenet1_1", "--blocks", "4", "--json", "--batch-sizes", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["blocks"]) == 4 and out["blocks"][-1]["out_shape"] == [10]
    assert main(["blocks", "squeezenet1_1", "--cuts"]) == 0
    assert "  cat_1 " in capsys.readouterr().out  # a Fire module ends where its two branches concatenate
    assert main(["blocks", "--list"]) == 0
    assert "vgg11" in capsys.readouterr().out
    assert main(["blocks", "vgg99"]) == 2 and "unknown model" in capsys.readouterr().err


def test_torchvision_weights_by_name_come_from_the_hub_cache_only(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="coderay.models"):
        fresh = get_model("squeezenet1_1", num_classes=10, weights="IMAGENET1K_V1")  # not on disk: fresh init
    assert "never downloads" in caplog.text and str(tmp_path) in caplog.text
    torch.manual_seed(5)
    tv = torchvision.models.squeezenet1_1(num_classes=1000)
    url = torchvision.models.get_model_weights("squeezenet1_1").IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(tv.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[-1])
    loaded = get_model("squeezenet1_1", num_classes=10, weights="DEFAULT")
    deep = dict(loaded.named_parameters())
    key = next(k for k in deep if k.endswith("features.3.expand3x3.weight"))
    assert torch.equal(deep[key], tv.features[3].expand3x3.weight)
    assert not torch.equal(dict(fresh.named_parameters())[key], deep[key])
    with pytest.raises(FileNotFoundError, match="cannot download"):
        get_model("squeezenet1_1", num_classes=10, weights="NOT_A_WEIGHTS_NAME")
