"""The multi-stage path search: predict every candidate cheaply, train only the most promising.

Stage 1 (every candidate): throughput from block profiles (the model in `throughput.py`); accuracy from
links fitted by least squares on a few hundred paired activations, then a few dozen gradient steps,
evaluated on validation data. Stage 2 (top-k by predicted reward): links train to convergence; validation accuracy
ranks paths (the reward), test accuracy is reported. `exhaustive=True` trains every candidate instead.

The per-candidate functions (`predict_path`, `train_path`) are what Tune trials call too: one
implementation, two schedulers.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from coderay.config import CoderayConfig
from coderay.links import Link, match_image
from coderay.paths import PathModule, PathSpec, enumerate_paths, path_budget
from coderay.reward import average_accuracy, reward
from coderay.services import ServiceModel, load_services
from coderay.table import RewardTable
from coderay.throughput import PathCosts, path_throughput
from coderay.train import evaluate, fit

__all__ = ["SearchContext", "candidates", "build_path", "predict_path", "train_path", "search_dir",
           "run_search", "save_links", "load_links", "spearman"]

log = logging.getLogger(__name__)


@dataclass
class SearchContext:
    cfg: CoderayConfig
    services: dict[str, ServiceModel]
    _acts: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, cfg: CoderayConfig, *, progress: bool = True, train_missing: bool = True) -> SearchContext:
        return cls(cfg, load_services(cfg, progress=progress, train_missing=train_missing))

    def fit_activations(self, local: str, upto: int, host: str | None = None) -> torch.Tensor:
        """Activations after block `upto` of `host` (default: `local`) on the local task's fitting samples,
        the image resized for the host; computed once per search (candidates share most of them)."""
        key = (local, host or local, upto)
        if key not in self._acts:
            if upto == 0 and host is None:
                svc = self.services[local]
                idx = torch.randperm(len(svc.task.train), generator=torch.Generator().manual_seed(self.cfg.seed))
                self._acts[key] = torch.stack([svc.task.train[int(i)][0]
                                               for i in idx[:self.cfg.search.predict_samples]])  # (n, C, H, W)
            elif host is None:
                self._acts[key] = _activations(self.services[local].blocks[upto - 1:upto],
                                               self.fit_activations(local, upto - 1), 1)
            else:
                image = match_image(self.fit_activations(local, 0), self.services[host].boundaries[0])
                self._acts[key] = _activations(self.services[host].blocks, image, upto)
        return self._acts[key]


def candidates(ctx: SearchContext, local: str) -> list[PathSpec]:
    s = ctx.cfg.search
    return enumerate_paths(local, {n: svc.boundaries for n, svc in ctx.services.items()}, lout=s.lout, hin=s.hin,
                           include_skip=s.include_skip)


def _activations(blocks, x: torch.Tensor, upto: int) -> torch.Tensor:
    with torch.inference_mode():
        for b in blocks[:upto]:
            x = b(x)
    return x.clone()


def build_path(ctx: SearchContext, spec: PathSpec) -> tuple[PathModule, dict]:
    """A path with fresh links fitted by least squares on the local task's training data.

    Link targets are what the receiving block sees on its own: the host's activation of the (resized) image
    at hin−1 for link_in, the local model's activation at lin−1 for link_out and skip links.
    Returns the module and the fit residuals.
    """
    local = ctx.services[spec.local]
    src = ctx.fit_activations(spec.local, spec.lout)
    target = ctx.fit_activations(spec.local, spec.lin - 1)
    links, residuals = {}, {}
    if spec.kind == "skip":
        links["skip"] = Link(src.shape[1:], target.shape[1:], relu=bool(target.min() >= 0))
        residuals["skip"] = links["skip"].init_lstsq(src, target)
    elif spec.kind == "coop":
        host = ctx.services[spec.host]
        host_in = ctx.fit_activations(spec.local, spec.hin - 1, host=spec.host)
        links["in"] = Link(src.shape[1:], host_in.shape[1:], relu=bool(host_in.min() >= 0))
        residuals["in"] = links["in"].init_lstsq(src, host_in)
        with torch.inference_mode():
            links["in"].eval()
            mid = _activations(host.blocks[spec.hin - 1:spec.hout], links["in"](src), spec.hout - spec.hin + 1)
        links["out"] = Link(mid.shape[1:], target.shape[1:], relu=bool(target.min() >= 0))
        residuals["out"] = links["out"].init_lstsq(mid, target)
    host_blocks = ctx.services[spec.host].blocks if spec.host else ()
    module = PathModule(spec, local.blocks, host_blocks, links).eval()
    return module, residuals


def _link_seconds(link: Link, batch: int, speed: float) -> float:
    """Per-sample seconds of a link at batch `batch`, measured here, divided by the node's speed."""
    x = torch.randn(batch, *link.src)
    link.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            link(x)
            start = time.perf_counter()
            for _ in range(3):
                link(x)
            return (time.perf_counter() - start) / 3 / batch / speed
    finally:
        torch.set_num_threads(threads)


def path_costs(ctx: SearchContext, module: PathModule) -> PathCosts:
    spec = module.spec
    local = ctx.services[spec.local]
    n = len(local.blocks)
    full = local.block_seconds(1, n)
    part = local.block_seconds(1, spec.lout) + local.block_seconds(spec.lin, n)
    if spec.kind == "local":
        return PathCosts(full, full)
    if spec.kind == "skip":
        return PathCosts(full, part + _link_seconds(module.links["skip"], local.spec.batch_size, local.node.speed))
    host = ctx.services[spec.host]
    hb = host.spec.batch_size
    link_s = sum(_link_seconds(module.links[k], hb, host.node.speed) for k in ("in", "out"))
    bytes_of = lambda shape: 4 * math.prod(shape)  # noqa: E731 — float32 activations
    return PathCosts(full, part, host.block_seconds(1, len(host.blocks)),
                     host.block_seconds(spec.hin, spec.hout) + link_s, hb, host.spec.guest_quota,
                     bytes_of(local.boundaries[spec.lout]), bytes_of(local.boundaries[spec.lin - 1]))


def measured_throughput(module: torch.nn.Module, input_shape: tuple[int, ...], batch: int, repeats: int = 5) -> float:
    """Samples/s of the whole path run in this process on one thread (both halves, no network)."""
    x = torch.randn(batch, *input_shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            module(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return batch / sorted(times)[len(times) // 2]


def _row(ctx: SearchContext, module: PathModule) -> dict:
    """Everything about a path that needs no accuracy: ids, budget, modelled throughput."""
    spec = module.spec
    local = ctx.services[spec.local]
    host = ctx.services.get(spec.host) if spec.host else None
    th = path_throughput(path_costs(ctx, module), kind=spec.kind, network=ctx.cfg.network,
                         local_node=local.node.name, host_node=host.node.name if host else "")
    link_params = sum(p.numel() for p in module.links.parameters())
    budget = path_budget(spec, local.block_params, host.block_params if host else (), link_params)
    return {"path_id": spec.id, "local": spec.local, "kind": spec.kind, "host": spec.host, "lout": spec.lout,
            "hin": spec.hin, "hout": spec.hout, "lin": spec.lin, "th_local": th.local, "th_host": th.host,
            "th_total": th.total, "th_ratio": th.ratio, "host_own_before": th.host_own_before,
            "host_own_after": th.host_own_after, "latency_ms": th.latency_ms, "bottleneck": th.bottleneck,
            **budget, "trained": False, "val_acc": None, "test_acc": None, "acc_avg": None, "acc_avg_test": None,
            "reward": None, "measured_sps": None, "measured_ratio": None, "train_seconds": None, "links_file": None}


def predict_path(ctx: SearchContext, spec: PathSpec) -> dict:
    """Stage 1 for one candidate: least-squares links, validation accuracy, modelled throughput, reward."""
    local = ctx.services[spec.local]
    if spec.kind == "local":
        module, pred_acc = PathModule(spec, local.blocks), local.metrics["val_acc"]
    else:
        module, _ = build_path(ctx, spec)
        s = ctx.cfg.search
        if s.predict_steps:
            n = min(len(local.task.train), s.predict_steps * s.link_batch_size)
            torch.manual_seed(ctx.cfg.seed)
            fit(module, module.link_parameters(), Subset(local.task.train, range(n)), local.task.val, epochs=1,
                lr=s.link_lr, batch_size=s.link_batch_size, seed=ctx.cfg.seed, progress=False, validate=False)
        pred_acc = evaluate(module, local.task.val)
    row = _row(ctx, module)
    acc_avg = average_accuracy(local.metrics["val_acc"], pred_acc, row["th_local"], row["th_host"])
    return row | {"pred_acc": pred_acc,
                  "pred_reward": reward(ctx.cfg.reward, acc_avg, row["th_ratio"], acc_local=local.metrics["val_acc"])}


def _measure(ctx: SearchContext, module: PathModule, row: dict) -> dict:
    local = ctx.services[module.spec.local]
    val_acc, test_acc = evaluate(module, local.task.val), evaluate(module, local.task.test)
    a_val = average_accuracy(local.metrics["val_acc"], val_acc, row["th_local"], row["th_host"])
    a_test = average_accuracy(local.metrics["test_acc"], test_acc, row["th_local"], row["th_host"])
    b = local.spec.batch_size
    sps = measured_throughput(module, local.boundaries[0], b)
    base = measured_throughput(PathModule(PathSpec.local_only(local.name), local.blocks), local.boundaries[0], b)
    return row | {"val_acc": val_acc, "test_acc": test_acc, "acc_avg": a_val, "acc_avg_test": a_test,
                  "reward": reward(ctx.cfg.reward, a_val, row["th_ratio"], acc_local=local.metrics["val_acc"]),
                  "measured_sps": sps, "measured_ratio": sps / base}


def train_path(ctx: SearchContext, spec: PathSpec, *, epochs: int | None = None, progress: bool = True,
               links_dir: Path | None = None, on_epoch: Callable[[int, float, float], None] | None = None,
               module: PathModule | None = None) -> tuple[dict, PathModule]:
    """Stage 2 for one candidate: train its links (from the least-squares start), measure, save the links."""
    local = ctx.services[spec.local]
    s = ctx.cfg.search
    if module is None:
        module = PathModule(spec, local.blocks) if spec.kind == "local" else build_path(ctx, spec)[0]
    start = time.perf_counter()
    trained = spec.kind != "local"
    if trained:
        torch.manual_seed(ctx.cfg.seed)
        fit(module, module.link_parameters(), local.task.train, local.task.val, epochs=epochs or s.link_epochs,
            lr=s.link_lr, batch_size=s.link_batch_size, seed=ctx.cfg.seed, desc=spec.id, progress=progress,
            on_epoch=on_epoch)
    row = _measure(ctx, module, _row(ctx, module)) | {"trained": trained,
                                                      "train_seconds": round(time.perf_counter() - start, 2)}
    if trained and links_dir is not None:
        row["links_file"] = str(save_links(module, links_dir))
    return row, module


def save_links(module: PathModule, directory: Path) -> Path:
    """A path's links with what rebuilds them (shapes, activation): all the serving side needs."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module.spec.id.replace(':', '__')}.pt"
    torch.save({"path_id": module.spec.id,
                "links": {k: {"src": l.src, "dst": l.dst, "relu": isinstance(l.act, torch.nn.ReLU),
                              "state": l.state_dict()} for k, l in module.links.items()}}, path)
    return path


def load_links(path: str | Path) -> tuple[str, dict[str, Link]]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    links = {}
    for k, d in blob["links"].items():
        links[k] = Link(tuple(d["src"]), tuple(d["dst"]), relu=d["relu"])
        links[k].load_state_dict(d["state"])
        links[k].eval()
    return blob["path_id"], links


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else 0.0


def search_dir(cfg: CoderayConfig, *, exhaustive: bool) -> Path:
    """Results keyed by everything that changes them: the services, the search settings, the mode."""
    key = cfg.fingerprint(cfg.services, cfg.search, cfg.reward, cfg.nodes, cfg.network, cfg.seed, exhaustive)
    return cfg.root / "search" / f"{'exhaustive' if exhaustive else 'staged'}-{key}"


def stage2_selection(rows: list[dict], top_k: int, exhaustive: bool) -> list[str]:
    """Path ids to train: every candidate when exhaustive, else the top-k non-local by predicted reward."""
    pool = [r for r in rows if r["kind"] != "local"]
    if not exhaustive:
        pool = sorted(pool, key=lambda r: -r["pred_reward"])[:top_k]
    return [r["path_id"] for r in pool]


def finish_table(cfg: CoderayConfig, rows: list[dict], meta: dict) -> RewardTable:
    """The table with its per-service summary (candidates, trained, best, rank correlation) in `meta`."""
    table = RewardTable(rows, meta)
    summary = {}
    for local in table.locals:
        svc_rows = table.for_service(local)
        trained = [r for r in svc_rows if r["reward"] is not None and r["kind"] != "local"]
        best = table.best(local)
        base = table.baselines(local)
        summary[local] = {
            "candidates": len(svc_rows), "trained": len(trained),
            "trained_fraction": len(trained) / max(len(svc_rows), 1), "best": best["path_id"],
            "spearman_pred_vs_measured": spearman([r["pred_reward"] for r in trained], [r["reward"] for r in trained])
            if len(trained) > 2 else None,
            "best_edge_early": max(base, key=lambda r: r["reward"])["path_id"] if base else None,
        }
    table.meta["summary"] = summary
    return table


def run_search(cfg: CoderayConfig, *, exhaustive: bool | None = None, progress: bool = True,
               use_cache: bool = True) -> RewardTable:
    """Run (or load) the in-process search for every local service in the config."""
    exhaustive = cfg.search.exhaustive if exhaustive is None else exhaustive
    out = search_dir(cfg, exhaustive=exhaustive)
    if use_cache and (out / "table.json").exists():
        table = RewardTable.load(out)
        table.meta["from_cache"] = True
        return table
    start = time.perf_counter()
    ctx = SearchContext.load(cfg, progress=progress)
    rows = []
    for local in cfg.search.locals or [s.name for s in cfg.services]:
        cands = candidates(ctx, local)
        preds = [predict_path(ctx, c) for c in tqdm(cands, desc=f"{local}: stage 1 (predict)", disable=not progress)]
        chosen = set(stage2_selection(preds, cfg.search.top_k, exhaustive))
        for i, row in enumerate(preds):
            if row["path_id"] in chosen or row["kind"] == "local":
                if progress and row["kind"] != "local":
                    tqdm.write(f"{local}: stage 2 trains {row['path_id']}")
                measured, _ = train_path(ctx, PathSpec.parse(row["path_id"]), progress=progress,
                                         links_dir=out / "links")
                preds[i] = measured | {"pred_acc": row["pred_acc"], "pred_reward": row["pred_reward"]}
        rows += preds
        if cfg.search.baselines:
            from coderay.baselines import edge_early_rows

            rows += edge_early_rows(ctx, local)
    table = finish_table(cfg, rows, {"config": cfg.name, "mode": "exhaustive" if exhaustive else "staged",
                                     "engine": "in-process", "seconds": round(time.perf_counter() - start, 1)})
    table.meta["dir"] = str(out)
    table.save(out)
    table.plot(out / "pareto.png")
    table.meta["from_cache"] = False
    return table
