"""Work where the model lives: a provider's training, block profiling and store checks run as Ray tasks pinned
to its node, reading and writing that node's store only.

The driver sends a config and a service name and gets back metadata (metrics, block profiles, shapes), never a
tensor: `train_on_nodes`, `describe_on_nodes`, `check_stores`. Links trained on one node and run on another
move store to store (`copy_links`), their bytes handed from task to task without the driver reading them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import ray

from coderay.cluster import pin
from coderay.config import CoderayConfig
from coderay.errors import CoderayError, NotTrainedError

if TYPE_CHECKING:  # coderay.services imports torch, which this module loads only inside the functions that use it
    from coderay.services import ServiceProfile

__all__ = ["train_on_nodes", "describe_on_nodes", "metadata_services", "check_stores", "copy_links"]

log = logging.getLogger(__name__)


def _here(cfg: CoderayConfig, node: str) -> dict:
    from coderay.store import node_store

    return {"node": node, "node_ip": ray.util.get_node_ip_address(), "store": str(node_store(cfg, node))}


@ray.remote(max_retries=0)
def _train(cfg_json: dict, name: str, force: bool, epochs=None) -> dict:
    from coderay.store import cached_metrics

    cfg = CoderayConfig.model_validate(cfg_json)
    spec = cfg.service(name)
    # trained before: its metrics, without torch or the model (a cached start's node task)
    metrics = (None if force else cached_metrics(cfg, spec)) or _train_here(cfg, name, force, epochs)
    return {k: v for k, v in metrics.items() if k != "history"} | _here(cfg, spec.node)


def _train_here(cfg: CoderayConfig, name: str, force: bool, epochs) -> dict:
    """Train (or load) `name` in this process, each epoch reported to the `epochs` queue; its metrics."""
    import torch

    from coderay.train import train_service

    torch.set_num_threads(1)
    spec = cfg.service(name)
    report = (
        None
        if epochs is None
        else (
            lambda e, loss, acc: epochs.put_nowait(
                {"service": name, "epoch": e, "epochs": spec.train.epochs, "loss": loss, "val_acc": acc}
            )
        )
    )
    return train_service(cfg, spec, progress=False, force=force, on_epoch=report).metrics


@ray.remote(max_retries=0)
def _describe(cfg_json: dict, name: str) -> dict:
    import torch

    from coderay.services import load_services

    torch.set_num_threads(1)
    cfg = CoderayConfig.model_validate(cfg_json)
    svc = load_services(cfg, [name], train_missing=False, progress=False)[name]
    return {"infos": [i.to_dict() for i in svc.infos], "metrics": svc.metrics} | _here(cfg, svc.node.name)


@ray.remote(max_retries=0)
def _check(cfg_json: dict, name: str, links: list[str]) -> dict:
    from coderay.store import resolve, service_dir

    cfg = CoderayConfig.model_validate(cfg_json)
    spec = cfg.service(name)
    ckpt = service_dir(cfg, spec) / "model.pt"
    if not ckpt.is_file():
        raise NotTrainedError(
            f"node {spec.node!r} has no checkpoint of service {name!r} in its store ({ckpt}): "
            "run `coderay train CONFIG` (with the same --address) first"
        )
    missing = [f for f in links if not resolve(f, cfg, spec.node).is_file()]
    if missing:
        raise NotTrainedError(
            f"node {spec.node!r} lacks links of the reward table in its store: {missing[:3]}; "
            "run `coderay search CONFIG` (with the same --address) again"
        )
    return _here(cfg, spec.node)


@ray.remote(max_retries=0)
def _read(cfg_json: dict, node: str, name: str) -> bytes:
    from coderay.store import resolve

    return resolve(name, CoderayConfig.model_validate(cfg_json), node).read_bytes()


@ray.remote(max_retries=0)
def _write(cfg_json: dict, node: str, name: str, data: bytes) -> str:
    from coderay.store import resolve

    path = resolve(name, CoderayConfig.model_validate(cfg_json), node)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return str(path)


def _get(refs: Sequence[ray.ObjectRef]) -> list:
    """Results of node tasks; coderay's own errors raised as themselves (their message names the node and the
    command to run), not wrapped in Ray's traceback."""
    try:
        return ray.get(list(refs))
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, CoderayError):
            raise cause from None
        raise


def _services(cfg: CoderayConfig, names: Iterable[str] | None) -> list[str]:
    return [s.name for s in cfg.services if names is None or s.name in names]


def train_on_nodes(
    cfg: CoderayConfig,
    *,
    force: bool = False,
    names: Iterable[str] | None = None,
    on_done: Callable[[str, dict], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict[str, dict]:
    """Train (or load from its store) every service on its own node, all nodes at once; the metrics of each,
    in config order. `on_epoch({service, epoch, epochs, loss, val_acc})` as the nodes report epochs (through a
    queue: numbers only), `on_done(name, metrics)` as each service finishes."""
    from ray.util.queue import Empty, Queue

    cfg = cfg.portable()
    body = cfg.model_dump(mode="json")
    epochs = Queue(actor_options={"num_cpus": 0}) if on_epoch is not None else None
    refs = {
        _train.options(**pin(cfg.service(n).node, cpus=1)).remote(body, n, force, epochs): n
        for n in _services(cfg, names)
    }
    out: dict[str, dict] = {}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            while epochs is not None and on_epoch is not None:
                try:
                    on_epoch(epochs.get_nowait())
                except Empty:
                    break
            if done:
                name = refs[done[0]]
                out[name] = _get(done)[0]
                if on_done is not None:
                    on_done(name, out[name])
    finally:
        if epochs is not None:
            epochs.shutdown()
    return {n: out[n] for n in _services(cfg, names)}


def describe_on_nodes(cfg: CoderayConfig, names: Iterable[str] | None = None) -> dict[str, dict]:
    """Each service's block profiles (timed by its own node, under its cap where emulated) and metrics."""
    cfg = cfg.portable()
    body = cfg.model_dump(mode="json")
    names = _services(cfg, names)
    results = _get([_describe.options(**pin(cfg.service(n).node, cpus=1)).remote(body, n) for n in names])
    return dict(zip(names, results))


def metadata_services(cfg: CoderayConfig, described: Mapping[str, dict]) -> dict[str, ServiceProfile]:
    """The services as far as a driver may know them (specs, profiles, metrics; no task data, no blocks):
    enough to enumerate candidates, score rows and schedule trials."""
    from coderay.blocks import BlockInfo
    from coderay.emulation import speed_divisor
    from coderay.services import ServiceProfile

    out = {}
    for name, d in described.items():
        spec = cfg.service(name)
        out[name] = ServiceProfile(
            spec,
            cfg.node(spec.node),
            [BlockInfo.from_dict(i) for i in d["infos"]],
            d["metrics"],
            speed_divisor(cfg, spec.node),
        )
    return out


def check_stores(cfg: CoderayConfig, links: Mapping[str, Iterable[str]] | None = None) -> dict[str, dict]:
    """Each service's node holds its checkpoint and the links files (store-relative names) it runs; else
    NotTrainedError naming the node and the command that provides the file."""
    cfg = cfg.portable()
    body = cfg.model_dump(mode="json")
    links = links or {}
    names = _services(cfg, None)
    results = _get(
        [_check.options(**pin(cfg.service(n).node)).remote(body, n, sorted(links.get(n, ()))) for n in names]
    )
    return dict(zip(names, results))


def copy_links(cfg: CoderayConfig, name: str, src_node: str, dst_nodes: Iterable[str]) -> None:
    """A links file (store-relative `name`) from `src_node`'s store into each of `dst_nodes`' stores."""
    cfg = cfg.portable()
    body = cfg.model_dump(mode="json")
    data = _read.options(**pin(src_node)).remote(body, src_node, name)
    _get([_write.options(**pin(dst)).remote(body, dst, name, data) for dst in dst_nodes if dst != src_node])
