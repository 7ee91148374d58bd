"""Service training: real data, checkpoints, the cache keyed by config."""

import pytest
import torch

from coderay.store import cached_metrics, service_dir
from coderay.train import evaluate, fit, load_service, train_service


def test_trained_services_learn_their_tasks(trained_cfg):
    for spec in trained_cfg.services:
        t = load_service(trained_cfg, spec.name)
        chance = 1 / t.task.num_classes
        assert t.metrics["test_acc"] > chance + 0.4, (spec.name, t.metrics)
        assert evaluate(t.model, t.task.test) == pytest.approx(t.metrics["test_acc"])
        assert len(t.metrics["history"]) == spec.train.epochs >= 1


def test_training_cache_is_reused_and_keyed_by_config(trained_cfg):
    spec = trained_cfg.service("digits")
    first = load_service(trained_cfg, "digits")
    again = train_service(trained_cfg, spec, progress=False)
    assert again.metrics["from_cache"] and again.path == first.path
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])
    changed = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 99})})
    assert service_dir(trained_cfg, changed) != service_dir(trained_cfg, spec)
    # what a cached start's node task returns without loading the model: the checkpoint's own metrics, or None
    assert cached_metrics(trained_cfg, spec) == again.metrics
    assert cached_metrics(trained_cfg, changed) is None


def test_untrained_service_is_reported_not_trained(tiny_cfg, tmp_path):
    cfg = tiny_cfg.model_copy(update={"workdir": str(tmp_path / "empty")})
    with pytest.raises(FileNotFoundError, match="coderay train"):
        load_service(cfg, "digits")


def test_fit_needs_trainable_parameters():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    data = torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="nothing to train"):
        fit(model, model.parameters(), data, data, epochs=1, lr=0.1, batch_size=2)


def test_fit_takes_a_handful_of_steps():
    """A stage-1 probe trains links for a few steps only: one-cycle needs more to warm up over (it divided by
    zero at 5 steps), so such a run keeps its learning rate and still moves the parameters."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    before = model.weight.detach().clone()
    data = torch.utils.data.TensorDataset(torch.randn(10, 2), torch.randint(0, 2, (10,)))
    history = fit(model, model.parameters(), data, data, epochs=1, lr=0.1, batch_size=2, progress=False)
    assert len(history) == 1 and not torch.equal(model.weight, before)


def test_a_provider_brings_its_own_trained_weights(trained_cfg, tmp_path):
    """`weights:` with `train.epochs: 0`: nothing is trained; the checkpoint in the node's store is the provider's
    model as it came, with its accuracy measured there."""
    from coderay.config import CoderayConfig

    mine = load_service(trained_cfg, "digits")
    raw = trained_cfg.model_dump(mode="json") | {"workdir": str(tmp_path / "elsewhere")}
    raw["services"][0] |= {"weights": str(mine.path), "train": raw["services"][0]["train"] | {"epochs": 0}}
    cfg = CoderayConfig.model_validate(raw)
    brought = train_service(cfg, cfg.service("digits"), progress=False)
    assert not brought.metrics["from_cache"] and brought.path != mine.path
    assert brought.metrics["test_acc"] == pytest.approx(mine.metrics["test_acc"])
    for k, v in mine.model.state_dict().items():
        assert torch.equal(v, brought.model.state_dict()[k])
    raw["services"][0]["weights"] = None
    with pytest.raises(ValueError, match="needs its trained `weights`"):
        CoderayConfig.model_validate(raw)
