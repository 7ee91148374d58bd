"""Train each service's full model on its own task, once: checkpoints are cached by config fingerprint.

`fit` and `evaluate` are the one training loop of coderay; path links train through them too.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from coderay.config import CoderayConfig, ServiceSpec
from coderay.data import TaskData, get_task
from coderay.errors import NotTrainedError
from coderay.models import StagedModel, get_model
from coderay.store import cached_metrics, service_dir

__all__ = [
    "TrainedService",
    "fit",
    "evaluate",
    "build_model",
    "train_service",
    "train_all",
    "load_service",
]

log = logging.getLogger(__name__)


@dataclass
class TrainedService:
    spec: ServiceSpec
    task: TaskData
    model: StagedModel  # in eval mode, weights loaded
    metrics: dict  # val/test accuracy, epochs, seconds, from_cache
    path: Path  # the checkpoint


@torch.inference_mode()
def evaluate(module: nn.Module, data: Dataset, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of `module` on `data`."""
    was_training = module.training
    module.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += (module(x).argmax(1) == y).sum().item()
        total += len(y)
    module.train(was_training)
    return correct / max(total, 1)


def fit(
    module: nn.Module,
    params: Iterable[nn.Parameter],
    train: Dataset,
    val: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    validate: bool = True,
    on_epoch: Callable[[int, float, float], None] | None = None,
    aux_loss: Callable[..., torch.Tensor] | None = None,
) -> list[dict]:
    """Adam (one-cycle learning rate) on cross-entropy over `params` only; one line per epoch. Returns the per-epoch
    history
    (validation accuracy is None when `validate` is False). `aux_loss(x)`, called after the forward pass on
    the batch `x` (and what else `train` yields after x and y), is added to the loss (links' feature matching)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: nothing to train (no parameter requires grad)")
    if on_epoch is not None and not validate:
        raise ValueError(f"{desc}: on_epoch reports each epoch's validation accuracy, so it needs validate=True")
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen)
    steps = epochs * len(loader)
    # one-cycle needs a few steps to warm up over; a run of a handful of steps (a stage-1 probe) keeps lr constant
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2) if steps >= 10 else None
    )
    history = []
    for epoch in range(1, epochs + 1):
        module.train()
        total, n = 0.0, 0
        bar = tqdm(
            loader,
            desc=f"{desc} {epoch}/{epochs}",
            leave=False,
            unit="batch",
            disable=not progress or not sys.stderr.isatty(),
        )
        for x, y, *extra in bar:
            loss = nn.functional.cross_entropy(module(x), y)
            if aux_loss is not None:
                loss = loss + aux_loss(x, *extra)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total, n = total + loss.item() * len(y), n + len(y)
            bar.set_postfix(loss=f"{total / n:.3f}")
        val_acc = evaluate(module, val) if validate else None
        history.append({"epoch": epoch, "loss": total / n, "val_acc": val_acc})
        if progress:
            shown = "" if val_acc is None else f"  val acc {val_acc:.4f}"
            log.info("%s epoch %d/%d: loss %.4f%s", desc, epoch, epochs, total / n, shown)
        if on_epoch is not None and val_acc is not None:  # validated whenever on_epoch is given (checked above)
            on_epoch(epoch, total / n, val_acc)
    module.eval()
    return history


def build_model(spec: ServiceSpec, task: TaskData) -> StagedModel:
    return get_model(
        spec.arch, num_classes=task.num_classes, input_shape=task.input_shape, weights=spec.weights, **spec.arch_kwargs
    )


def _load(cfg: CoderayConfig, spec: ServiceSpec, task: TaskData, out: Path) -> TrainedService | None:
    metrics = cached_metrics(cfg, spec)
    if metrics is None:
        return None
    ckpt = out / "model.pt"
    model = build_model(spec, task)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    model.eval()
    log.info("%s: loaded cached model (test acc %.4f)", spec.name, metrics["test_acc"])
    return TrainedService(spec, task, model, metrics, ckpt)


def train_service(
    cfg: CoderayConfig,
    spec: ServiceSpec,
    *,
    progress: bool = True,
    force: bool = False,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> TrainedService:
    """Train one service's model on its task, or load it when this exact configuration was trained before."""
    task = get_task(spec.task, data_root=cfg.data_root, seed=cfg.seed)
    out = service_dir(cfg, spec)
    cached = None if force else _load(cfg, spec, task, out)
    if cached is not None:
        return cached
    torch.manual_seed(cfg.seed)
    model = build_model(spec, task)
    start = time.perf_counter()
    if spec.train.epochs == 0:  # the provider's own trained weights (loaded by build_model, here)
        history = [{"epoch": 0, "loss": None, "val_acc": evaluate(model, task.val)}]
    else:
        history = fit(
            model,
            model.parameters(),
            task.train,
            task.val,
            epochs=spec.train.epochs,
            lr=spec.train.lr,
            batch_size=spec.train.batch_size,
            weight_decay=spec.train.weight_decay,
            seed=cfg.seed,
            desc=f"{spec.name} ({spec.arch} on {spec.task})",
            progress=progress,
            on_epoch=on_epoch,
        )
    metrics = {
        "service": spec.name,
        "arch": spec.arch,
        "task": spec.task,
        "val_acc": history[-1]["val_acc"],
        "test_acc": evaluate(model, task.test),
        "epochs": spec.train.epochs,
        "train_seconds": round(time.perf_counter() - start, 2),
        "params": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainedService(spec, task, model, metrics | {"from_cache": False}, out / "model.pt")


def train_all(cfg: CoderayConfig, *, progress: bool = True, force: bool = False) -> dict[str, TrainedService]:
    return {s.name: train_service(cfg, s, progress=progress, force=force) for s in cfg.services}


def load_service(cfg: CoderayConfig, name: str) -> TrainedService:
    """A trained service from the cache; never trains (serving and search workers call this)."""
    spec = cfg.service(name)
    out = service_dir(cfg, spec)
    loaded = _load(cfg, spec, get_task(spec.task, data_root=cfg.data_root, seed=cfg.seed), out)
    if loaded is None:
        raise NotTrainedError(
            f"service {name!r} is not trained yet: node {spec.node!r} has no checkpoint in its "
            f"store ({out}); run `coderay train CONFIG` (with `--address` on a cluster) first"
        )
    return loaded
