"""Contract tests for coderay.models and coderay.blocks, parametrised over the whole registry."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
import torchvision
from torch import nn

from coderay import models
from coderay.blocks import Block, BlockInfo, _balanced_cuts, format_block_table, profile_blocks, split_model
from coderay.models import StagedModel, get_model, list_models, register_model

ARCHS = list_models()
TORCHVISION_ARCHS = sorted(models._TORCHVISION_PAIRS)
SMALL = (1, 28, 28)
OPTIONS = {"alexnet": {"hidden": 256}}  # keep the classifier small: tests run on 2 cores
pytestmark = pytest.mark.usefixtures("one_thread")


def build(arch: str, input_shape: tuple[int, int, int] = SMALL, num_classes: int = 10) -> StagedModel:
    torch.manual_seed(0)
    return get_model(arch, num_classes=num_classes, input_shape=input_shape, **OPTIONS.get(arch, {}))


@functools.cache
def shared(arch: str) -> StagedModel:
    """One model per arch for read-only tests (splitting freezes it, which they do not mind)."""
    return build(arch)


def batch(shape: tuple[int, ...] = SMALL, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


def compose(blocks: list[Block], x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def test_registry_has_the_four_architectures():
    assert {"small_cnn", "alexnet", "mobilenet_v2", "resnet18"} <= set(ARCHS)


@pytest.mark.parametrize("n", [1, 2, 3, "each"])
@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_compose_to_the_model(arch, n):
    model = shared(arch).eval()
    names = model.stage_names
    blocks = split_model(model) if n == "each" else split_model(model, blocks=n)
    n = len(names) if n == "each" else n
    assert len(blocks) == n
    assert [b.index for b in blocks] == list(range(1, n + 1))
    assert [s for b in blocks for s in b.stages] == names
    x = batch()
    with torch.no_grad():
        assert torch.equal(compose(blocks, x), model(x))


@pytest.mark.parametrize("arch, n", [("alexnet", 5), ("mobilenet_v2", 10)])
def test_split_without_default_cuts_balances_macs(arch, n):
    model = shared(arch)
    assert n not in model.default_cuts
    blocks = split_model(model, blocks=n)
    assert len(blocks) == n and [s for b in blocks for s in b.stages] == model.stage_names
    macs = [sum(model.stage_macs[s] for s in b.stages) for b in blocks]
    assert max(macs) < sum(macs) / 2  # no block carries most of the work
    x = batch()
    with torch.no_grad():
        assert torch.equal(compose(blocks, x), model(x))


def test_balanced_cuts_minimise_the_largest_block():
    assert _balanced_cuts([1, 1, 1, 10, 1, 1], 3) == [2, 3]  # [1 1 1] [10] [1 1]
    assert _balanced_cuts([5, 5, 5, 5], 4) == [0, 1, 2]
    assert _balanced_cuts([5, 5, 5, 5], 1) == []


def test_alexnet_six_blocks_as_in_the_paper():
    blocks = split_model(shared("alexnet"), blocks=6)
    assert [b.stages for b in blocks] == [
        ("conv1",),
        ("conv2",),
        ("conv3",),
        ("conv4",),
        ("conv5", "pool"),
        ("fc6", "fc7", "fc8"),
    ]
    x = batch()
    with torch.no_grad():
        assert torch.equal(compose(blocks, x), shared("alexnet")(x))


@pytest.mark.parametrize("input_shape", [SMALL, (3, 64, 64)], ids=["small", "standard"])
@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_staged_forward_is_torchvision_forward(arch, input_shape):
    torch.manual_seed(0)
    tv, staged = models._TORCHVISION_PAIRS[arch](num_classes=7, input_shape=input_shape, **OPTIONS.get(arch, {}))
    assert set(staged.source_keys.values()) == set(staged.state_dict())  # every tensor re-wrapped, none new
    tv.eval()
    staged.eval()
    x = batch(input_shape)
    with torch.no_grad():
        expected = tv(x)
        assert expected.shape == (2, 7)
        assert torch.equal(staged(x), expected)
        assert torch.equal(compose(split_model(staged, blocks=3), x), expected)


def test_standard_input_keeps_torchvision_stems():
    model = build("resnet18", input_shape=(3, 64, 64))
    assert model.stem[0].kernel_size == (7, 7) and isinstance(model.stem[3], nn.MaxPool2d)
    small = shared("resnet18")
    assert small.stem[0].kernel_size == (3, 3) and isinstance(small.stem[3], nn.Identity)
    assert small.stage_shapes["layer4"] == (512, 4, 4)
    assert shared("mobilenet_v2").stage_shapes["f18"] == (1280, 4, 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_profile_blocks(arch):
    model = shared(arch)
    blocks = split_model(model, blocks=3)
    infos = profile_blocks(blocks, model.input_shape, batch_sizes=(1, 2), repeats=1)
    assert [i.index for i in infos] == [1, 2, 3]
    assert infos[0].in_shape == model.input_shape
    assert infos[-1].out_shape == (model.num_classes,)
    for a, b in zip(infos, infos[1:]):
        assert a.out_shape == b.in_shape
    assert sum(i.params for i in infos) == sum(p.numel() for p in model.parameters())
    assert sum(i.macs for i in infos) == sum(model.stage_macs.values())
    for info, block in zip(infos, blocks):
        if any(isinstance(m, nn.Conv2d) for m in block.modules()):
            assert info.macs > 0
        assert set(info.latency_ms) == {1, 2} and all(ms > 0 for ms in info.latency_ms.values())
    assert [BlockInfo.from_dict(json.loads(json.dumps(i.to_dict()))) for i in infos] == infos
    table = format_block_table(infos)
    assert len(table.splitlines()) == 2 + len(infos) and "ms@2" in table


def test_profile_without_latency_restores_threads():
    threads = torch.get_num_threads()
    infos = profile_blocks(split_model(shared("small_cnn")), SMALL, measure_latency=False)
    assert all(i.latency_ms == {} for i in infos)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_are_frozen(arch):
    blocks = split_model(build(arch), blocks=3)
    x = batch().requires_grad_()
    compose(blocks, x).square().mean().backward()
    assert x.grad is not None  # a link before the blocks still trains through them
    for block in blocks:
        assert all(not p.requires_grad and p.grad is None for p in block.parameters())


@pytest.mark.parametrize("arch", ["small_cnn", "alexnet"])  # BN everywhere; dropout in fc6/fc7
def test_blocks_stay_in_eval_mode(arch):
    model = build(arch)
    blocks = split_model(model, blocks=2)
    x = batch()
    with torch.no_grad():
        before = compose(blocks, x)
        for block in blocks:
            block.train()
            assert not any(m.training for m in block.modules())
        assert torch.equal(compose(blocks, x), before)
        model.train()  # the modules are shared: the blocks must undo this too
        assert torch.equal(compose(blocks, x), before)


def test_cuts_by_name():
    model = shared("small_cnn")
    blocks = split_model(model, cuts=["conv2", "conv4"])
    assert [b.stages for b in blocks] == [("conv1", "conv2"), ("conv3", "conv4"), ("head",)]
    assert [b.stages for b in split_model(model, cuts="conv3")] == [("conv1", "conv2", "conv3"), ("conv4", "head")]


@pytest.mark.parametrize(
    "cuts, message",
    [
        (["conv9"], "valid cut points are \\['conv1', 'conv2', 'conv3', 'conv4'\\].*coderay blocks small_cnn"),
        (["head"], "last stage"),
        (["conv3", "conv1"], "in model order"),
        (["conv1", "conv1"], "distinct"),
    ],
)
def test_bad_cuts(cuts, message):
    with pytest.raises(ValueError, match=message):
        split_model(shared("small_cnn"), cuts=cuts)


@pytest.mark.parametrize("n", [0, 6, -1, True, 2.0])
def test_bad_block_count(n):
    with pytest.raises(ValueError, match="1..5"):
        split_model(shared("small_cnn"), blocks=n)


def test_blocks_and_cuts_exclusive():
    with pytest.raises(ValueError, match="not both"):
        split_model(shared("small_cnn"), blocks=2, cuts=["conv1"])
    with pytest.raises(TypeError, match="StagedModel"):
        split_model(nn.Sequential(nn.Linear(2, 2)), blocks=1)


def test_registry_errors():
    with pytest.raises(ValueError, match="already registered"):
        register_model("small_cnn")
    with pytest.raises(ValueError, match="resnet18"):
        get_model("vgg99", num_classes=10)
    with pytest.raises(TypeError, match="widht"):
        get_model("small_cnn", num_classes=10, widht=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="num_classes"):
        get_model("small_cnn", num_classes=0)
    with pytest.raises(ValueError, match="input_shape"):
        get_model("small_cnn", num_classes=10, input_shape=(28, 28))
    with pytest.raises(ValueError, match="widths"):
        get_model("small_cnn", num_classes=10, widths=(8, 8))
    with pytest.raises(ValueError, match="cannot take input_shape"):  # torchvision stem on 28 px
        get_model("alexnet", num_classes=10, hidden=16, small_input=False)


def test_register_a_new_model():
    name = "test_tiny_mlp"

    @register_model(name)
    def tiny(*, num_classes: int, input_shape: tuple[int, int, int]) -> StagedModel:
        stages = {"flat": nn.Flatten(1), "fc": nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes)}
        return StagedModel(stages, arch=name, input_shape=input_shape, num_classes=num_classes)

    try:
        model = get_model(name, num_classes=3)
        assert name in list_models() and model.stage_shapes == {"flat": (784,), "fc": (3,)}
        assert [b.stages for b in split_model(model, blocks=2)] == [("flat",), ("fc",)]
    finally:
        del models._REGISTRY[name]


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_round_trip(arch, tmp_path):
    model = build(arch).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)  # a different fresh init, overwritten by the file
    loaded = get_model(arch, num_classes=10, input_shape=SMALL, weights=path, **OPTIONS.get(arch, {})).eval()
    x = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_state_dict_loads(arch, tmp_path):
    tv, _ = models._TORCHVISION_PAIRS[arch](num_classes=10, input_shape=SMALL, **OPTIONS.get(arch, {}))
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    torch.manual_seed(123)
    staged = get_model(arch, num_classes=10, input_shape=SMALL, weights=path, **OPTIONS.get(arch, {})).eval()
    x = batch()
    with torch.no_grad():
        assert torch.equal(staged(x), tv.eval()(x))


def test_imagenet_style_weights_transfer_where_shapes_match(tmp_path, caplog):
    """A 3-channel, 1000-class torchvision checkpoint into a 1-channel, 10-class small-input model."""
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(num_classes=1000)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(tv.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="coderay.models"):
        model = get_model("mobilenet_v2", num_classes=10, input_shape=SMALL, weights=path)
    assert torch.equal(model.f0[0].weight, tv.features[0][0].weight.sum(dim=1, keepdim=True))  # channels summed
    assert torch.equal(model.f9.conv[1][0].weight, tv.features[9].conv[1][0].weight)
    assert model.classifier[1].weight.shape == (10, 1280)  # fresh head, logged
    assert "classifier.1.weight" in caplog.text and "torchvision" in caplog.text


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot download"):
        get_model("small_cnn", num_classes=10, weights=tmp_path / "missing.pth")
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="matches small_cnn"):
        get_model("small_cnn", num_classes=10, weights=path)
