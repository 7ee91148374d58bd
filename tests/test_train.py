"""Service training: real data, checkpoints, the cache keyed by config."""
import pytest
import torch

from coderay.train import evaluate, fit, load_service, service_dir, train_service


def test_trained_services_learn_their_tasks(trained_cfg):
    for spec in trained_cfg.services:
        t = load_service(trained_cfg, spec.name)
        chance = 1 / t.task.num_classes
        assert t.metrics["test_acc"] > chance + 0.4, (spec.name, t.metrics)
        assert evaluate(t.model, t.task.test) == pytest.approx(t.metrics["test_acc"])
        assert len(t.metrics["history"]) == spec.train.epochs


def test_training_cache_is_reused_and_keyed_by_config(trained_cfg):
    spec = trained_cfg.service("digits")
    first = load_service(trained_cfg, "digits")
    again = train_service(trained_cfg, spec, progress=False)
    assert again.metrics["from_cache"] and again.path == first.path
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])
    changed = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 99})})
    assert service_dir(trained_cfg, changed) != service_dir(trained_cfg, spec)


def test_untrained_service_is_reported_not_trained(tiny_cfg, tmp_path):
    cfg = tiny_cfg.model_copy(update={"workdir": str(tmp_path / "empty")})
    with pytest.raises(FileNotFoundError, match="coderay train"):
        load_service(cfg, "digits")


def test_fit_needs_trainable_parameters():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    data = torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="nothing to train"):
        fit(model, model.parameters(), data, data, epochs=1, lr=0.1, batch_size=2)
