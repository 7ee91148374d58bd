"""The work on one candidate path, the same whichever engine schedules it (in-process or Ray Tune).

- `predict_path` (stage 1): links fitted by least squares on a few hundred paired activations, then a few
  gradient steps, evaluated on validation data; throughput from block profiles (`coderay.throughput`).
- `train_path` (stage 2): the links trained to convergence from that start; validation accuracy ranks paths,
  test accuracy is reported.
Both return a typed `Row` (`coderay.rows`), built by `path_row` and scored by `coderay.rows.score`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from coderay.config import CoderayConfig, LinkVariant
from coderay.emulation import node_rate, speed_divisor, sustained_seconds, timing_as
from coderay.links import Link, match_image, save_links
from coderay.paths import PathModule, enumerate_paths, path_budget
from coderay.pathspec import PathSpec
from coderay.plan import TO_END, Hop, crossings, host_span, plan_hops, stages
from coderay.rows import Row, score
from coderay.services import ServiceModel, ServiceProfile, Shape, load_services
from coderay.throughput import BYTES_PER_VALUE, PathCosts
from coderay.train import evaluate, fit

__all__ = [
    "SearchContext",
    "candidates",
    "build_path",
    "path_costs",
    "path_row",
    "reward_bound",
    "predict_path",
    "training_plan",
    "train_path",
]

log = logging.getLogger(__name__)


@dataclass
class SearchContext:
    """What a search needs, loaded once: the config and the services, trained, split and profiled where paths
    run here, their profiles only where a driver schedules them (`coderay.provider.metadata_services`)."""

    cfg: CoderayConfig
    services: Mapping[str, ServiceProfile]
    _acts: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _link_times: dict[tuple, float] = field(default_factory=dict, repr=False)

    def link_seconds(self, link: Link, node: str, batch: int) -> float:
        """`_link_seconds`, timed once per search for each link shape on a node: links of one shape and capacity
        are the same computation whatever their weights, so candidates sharing one (every link_in from the same
        local block to the same host block) share its time instead of each drawing its own timing noise."""
        key = (node, batch, link.src, link.dst, link.capacity)
        if key not in self._link_times:
            self._link_times[key] = _link_seconds(self.cfg, link, batch, node)
        return self._link_times[key]

    @classmethod
    def load(cls, cfg: CoderayConfig, *, progress: bool = True, train_missing: bool = True) -> SearchContext:
        return cls(cfg, load_services(cfg, progress=progress, train_missing=train_missing))

    def service_model(self, name: str) -> ServiceModel:
        """`name` with its task data and blocks, to run a path on; an error where only its profile is here."""
        svc = self.services[name]
        if not isinstance(svc, ServiceModel):
            raise TypeError(f"service {name!r}: only its profile is here, not its blocks or task data")
        return svc

    def fit_activations(self, local: str, upto: int, host: str | None = None) -> torch.Tensor:
        """Activations after block `upto` of `host` (default: `local`) on the local task's fitting samples,
        the image resized for the host; computed once per search (candidates share most of them)."""
        key = (local, host or local, upto)
        if key not in self._acts:
            if upto == 0 and host is None:
                svc = self.service_model(local)
                assert isinstance(svc.task.train, Sized)  # a TensorDataset or a Subset
                idx = torch.randperm(len(svc.task.train), generator=torch.Generator().manual_seed(self.cfg.seed))
                self._acts[key] = torch.stack(
                    [svc.task.train[int(i)][0] for i in idx[: self.cfg.search.predict_samples]]
                )  # (n, C, H, W)
            elif host is None:
                self._acts[key] = _run(
                    self.service_model(local).blocks[upto - 1 : upto], self.fit_activations(local, upto - 1)
                )
            else:
                image = match_image(self.fit_activations(local, 0), self.services[host].boundaries[0])
                self._acts[key] = _run(self.service_model(host).blocks[:upto], image)
        return self._acts[key]


def candidates(ctx: SearchContext, local: str) -> list[PathSpec]:
    """`local`'s candidate paths: its own, and through every host that admits it as a guest (a grant ≥ 1)."""
    s = ctx.cfg.search
    bounds = {n: svc.boundaries for n, svc in ctx.services.items() if n == local or ctx.cfg.service(n).grant(local) > 0}
    return enumerate_paths(local, bounds, lout=s.lout, hin=s.hin, include_skip=s.include_skip)


def _run(blocks, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        for b in blocks:
            x = b(x)
    return x.clone()


def build_path(ctx: SearchContext, spec: PathSpec, variant: LinkVariant | None = None) -> tuple[PathModule, dict]:
    """A path with fresh links fitted by least squares on the local task's training data.

    Link targets are what the receiving block sees on its own: the host's activation of the (resized) image
    at hin−1 for link_in, the local model's activation at lin−1 for link_out and skip links. The link that
    brings the sample back is built as `variant` says (default: the config's first link variant).
    Returns the module and the fit residuals.
    """
    capacity = (variant or ctx.cfg.search.link_variants[0]).capacity
    local = ctx.service_model(spec.local)
    src = ctx.fit_activations(spec.local, spec.lout)
    target = ctx.fit_activations(spec.local, spec.lin - 1)
    links, residuals = {}, {}
    if spec.kind == "skip":
        links["skip"] = Link(src.shape[1:], target.shape[1:], relu=bool(target.min() >= 0), capacity=capacity)
        residuals["skip"] = links["skip"].init_lstsq(src, target)
    elif spec.kind == "coop":
        host_name, hin, hout = host_span(spec)
        host = ctx.service_model(host_name)
        host_in = ctx.fit_activations(spec.local, hin - 1, host=host_name)
        links["in"] = Link(src.shape[1:], host_in.shape[1:], relu=bool(host_in.min() >= 0))
        residuals["in"] = links["in"].init_lstsq(src, host_in)
        with torch.inference_mode():
            links["in"].eval()
            mid = _run(host.blocks[hin - 1 : hout], links["in"](src))
        links["out"] = Link(mid.shape[1:], target.shape[1:], relu=bool(target.min() >= 0), capacity=capacity)
        residuals["out"] = links["out"].init_lstsq(mid, target)
    host_blocks = ctx.service_model(spec.host).blocks if spec.host else ()
    module = PathModule(
        spec, local.blocks, host_blocks, links, link_out=link_out_place(ctx, spec), encoding=ctx.cfg.network.encoding
    ).eval()
    return module, residuals


def link_out_place(ctx: SearchContext, spec: PathSpec) -> str:
    """Where a cooperative path's link_out runs: the config's choice, or (auto) the node that makes fewer
    values cross back to the local node: the host block's output (link_out on the local node) or the link's."""
    choice = ctx.cfg.search.link_out
    if spec.kind != "coop" or choice != "auto":
        return "host" if spec.kind != "coop" else choice
    host, _, hout = host_span(spec)
    host_out = math.prod(ctx.services[host].boundaries[hout])
    local_in = math.prod(ctx.services[spec.local].boundaries[spec.lin - 1])
    return "local" if host_out < local_in else "host"


def _link_seconds(cfg: CoderayConfig, link: Link, batch: int, node: str) -> float:
    """Per-sample seconds of a link at batch `batch` on `node`: timed as that node (under its CPU cap), or
    timed here and divided by its speed where emulation is arithmetic."""
    x = torch.randn(batch, *link.src)
    link.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with timing_as(cfg, node) as cap, torch.inference_mode():
            seconds = sustained_seconds(lambda: link(x), min_seconds=0.1 if cap.capped else 0.0)
        return seconds / batch / speed_divisor(cfg, node)
    finally:
        torch.set_num_threads(threads)


def call_seconds(cfg: CoderayConfig, node: str, service: str) -> float:
    """Per-sample seconds on `node` of one replica call's fixed cost (`serving.call_overhead_ms` of CPU) in a
    chain of `service`'s requests: under load they merge into chains of its B samples."""
    chain = min(cfg.service(service).batch_size, cfg.serving.max_batch_size)
    return cfg.serving.call_overhead_ms / 1e3 / node_rate(cfg, node) / chain


def path_costs(ctx: SearchContext, module: PathModule) -> PathCosts:
    """The throughput model's inputs for a path, read off its plan: each hop's per-sample seconds on the
    node that runs it (blocks from profiles, links timed at that node's batch), one replica call's fixed cost
    per stage (`plan.stages`: the hops of one node are one call), and the bytes of every activation that
    crosses between the local and the host node."""

    def link_seconds(name: str, node: str, batch: int) -> float:
        link = module.links[name]
        assert isinstance(link, Link)  # a path's links are Links (ModuleDict items are typed as Module)
        return ctx.link_seconds(link, node, batch)

    return _costs(ctx, module.spec, module.hops, module.link_out, module.encoding, link_seconds)


def reward_bound(ctx: SearchContext, spec: PathSpec, *, acc: float = 1.0) -> Row:
    """The most a candidate could earn, known before any fit: its row with free links and accuracy `acc`
    (perfect by default) as its prediction. The reward grows with accuracy and throughput and a link only adds
    time, so no fitted link beats it. Profiles and shapes suffice: a driver holding only `ServiceProfile`s
    computes it. For local-only (no links) with its own validation accuracy it is local-only's prediction."""
    link_out = link_out_place(ctx, spec)
    costs = _costs(ctx, spec, plan_hops(spec, link_out=link_out), link_out, ctx.cfg.network.encoding, lambda *_: 0.0)
    return path_row(ctx, spec, costs, pred_acc=acc)


def _link_dst(ctx: SearchContext, spec: PathSpec, name: str) -> Shape:
    """What a link hands on: the input of the block it feeds (the host's hin for link_in, else the local's lin)."""
    if name == "in":
        host, hin, _ = host_span(spec)
        return ctx.services[host].boundaries[hin - 1]
    return ctx.services[spec.local].boundaries[spec.lin - 1]


def _costs(
    ctx: SearchContext,
    spec: PathSpec,
    hops: Sequence[Hop],
    link_out: str,
    encoding: str,
    link_seconds: Callable[[str, str, int], float],
) -> PathCosts:
    local = ctx.services[spec.local]
    cfg = ctx.cfg
    full = local.block_seconds(1, local.num_blocks) + call_seconds(cfg, local.node.name, spec.local)
    if spec.kind == "local":
        return PathCosts(local_full=full, local_part=full)
    seconds = {spec.local: 0.0, spec.host: 0.0}
    for run in stages(list(hops)):  # one call per stage, its cost shared by the chain's samples
        seconds[run[0].service] += call_seconds(cfg, ctx.services[run[0].service].node.name, spec.local)
    shapes = [local.boundaries[0]]  # the activation leaving each hop
    for hop in hops:
        svc = ctx.services[hop.service]
        if hop.kind == "links":
            seconds[hop.service] += link_seconds(hop.link, svc.node.name, svc.spec.batch_size)
            shapes.append(_link_dst(ctx, spec, hop.link))
        else:
            last = svc.num_blocks if hop.last == TO_END else hop.last
            seconds[hop.service] += svc.block_seconds(hop.first, last)
            shapes.append(svc.boundaries[last])
    nbytes = {"out": 0, "back": 0}
    for i, src, _ in crossings(spec, link_out=link_out):
        nbytes["out" if src == spec.local else "back"] += BYTES_PER_VALUE[encoding] * math.prod(shapes[i])
    if spec.kind == "skip":
        return PathCosts(local_full=full, local_part=seconds[spec.local])
    host_name = host_span(spec)[0]
    host = ctx.services[host_name]
    return PathCosts(
        local_full=full,
        local_part=seconds[spec.local],
        host_full=host.block_seconds(1, host.num_blocks) + call_seconds(cfg, host.node.name, host_name),
        host_part=seconds[host_name],
        batch=host.spec.batch_size,
        guest_quota=host.spec.grant(spec.local),
        bytes_out=nbytes["out"],
        bytes_back=nbytes["back"],
    )


def path_row(ctx: SearchContext, spec: PathSpec, costs: PathCosts, *, link_params: int = 0, **fields) -> Row:
    """The one constructor of a path's row: identity, nodes, the local model's accuracy, costs, budget, and
    `fields` (accuracies, bookkeeping); scored before it is returned."""
    local = ctx.services[spec.local]
    host = ctx.services[spec.host] if spec.host else None
    budget = path_budget(spec, local.block_params, host.block_params if host else (), link_params)
    row = Row.of(
        spec,
        local_node=local.node.name,
        host_node=host.node.name if host else "",
        link_out_on=link_out_place(ctx, spec) if spec.kind == "coop" else None,
        encoding=ctx.cfg.network.encoding if spec.kind == "coop" else "float32",
        acc_local_val=local.metrics["val_acc"],
        acc_local_test=local.metrics["test_acc"],
        costs=costs,
        link_params=budget["link_params"],
        local_skipped_params=budget["local_skipped_params"],
        host_added_params=budget["host_added_params"],
        **fields,
    )
    return score(row, ctx.cfg.reward, ctx.cfg.network)


def _link_params(module: PathModule) -> int:
    return sum(p.numel() for p in module.links.parameters())


def predict_path(ctx: SearchContext, spec: PathSpec) -> Row:
    """Stage 1 for one candidate: least-squares links, validation accuracy, modelled throughput, reward."""
    local = ctx.service_model(spec.local)
    if spec.kind == "local":
        module, pred_acc = PathModule(spec, local.blocks), local.metrics["val_acc"]
    else:
        torch.manual_seed(ctx.cfg.seed)  # a candidate's links start the same whatever ran before it
        module, _ = build_path(ctx, spec)
        s = ctx.cfg.search
        if s.predict_steps:
            assert isinstance(local.task.train, Sized)  # a TensorDataset or a Subset
            n = min(len(local.task.train), s.predict_steps * s.link_batch_size)
            torch.manual_seed(ctx.cfg.seed)  # fit's shuffling, apart from how many draws building the links took
            fit(
                module,
                module.link_parameters(),
                Subset(local.task.train, range(n)),
                local.task.val,
                epochs=1,
                lr=s.link_lr,
                batch_size=s.link_batch_size,
                seed=ctx.cfg.seed,
                progress=False,
                validate=False,
            )
        pred_acc = evaluate(module, local.task.val)
    return path_row(ctx, spec, path_costs(ctx, module), link_params=_link_params(module), pred_acc=pred_acc)


TEACHER_BYTES = 256 * 2**20  # the local model's activations for every training sample, computed once, up to this


@contextlib.contextmanager
def _feature_matching(
    ctx: SearchContext, module: PathModule, weight: float, train: Dataset
) -> Iterator[tuple[Callable[..., torch.Tensor] | None, Dataset]]:
    """The distillation term of a path's training and the data to train on, while it trains (None and `train`
    for weight 0): the link that brings a sample back should produce what the local model's own blocks 1..lin−1
    produce for the same input (relative squared error, times `weight`). The link's output is caught by a
    forward hook, removed afterwards. The blocks are frozen, so their activations are computed once, not every
    epoch: where they fit in `TEACHER_BYTES` they ride with the samples (`train` then yields x, y, target)."""
    if not weight:
        yield None, train
        return
    spec = module.spec
    link = module.links["skip" if spec.kind == "skip" else "out"]
    teacher = torch.nn.Sequential(*ctx.service_model(spec.local).blocks[: spec.lin - 1])
    seen: dict[str, torch.Tensor] = {}
    hook = link.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out))

    def loss(x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if target is None:
            with torch.no_grad():
                target = teacher(x)
        return weight * (seen["out"] - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-8)

    try:
        yield loss, _with_targets(train, teacher)
    finally:
        hook.remove()


def _with_targets(train: Dataset, teacher: torch.nn.Module) -> Dataset:
    """`train` as (x, y, teacher(x)) where the targets fit in `TEACHER_BYTES`, else `train` itself."""
    assert isinstance(train, Sized)  # a TensorDataset or a Subset
    xs, ys, targets = [], [], []
    with torch.no_grad():
        for x, y in DataLoader(train, batch_size=256):
            target = teacher(x)
            if len(train) * target[0].numel() * target.element_size() > TEACHER_BYTES:
                return train
            xs.append(x)
            ys.append(y)
            targets.append(target)
    return TensorDataset(torch.cat(xs), torch.cat(ys), torch.cat(targets))


def training_plan(cfg: CoderayConfig, predicted: Row | None) -> tuple[list[LinkVariant], int]:
    """The link variants stage 2 trains a candidate with and the epochs of each: `search.explore`'s for a
    candidate chosen by exploration (its stage-1 row says `explored`), the search's own otherwise."""
    s = cfg.search
    if predicted is not None and predicted.extra.get("explored"):
        return s.explore.variants or s.link_variants, s.explore.epochs or s.link_epochs
    return s.link_variants, s.link_epochs


def train_path(
    ctx: SearchContext,
    spec: PathSpec,
    *,
    epochs: int | None = None,
    progress: bool = True,
    links_dir: Path | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    module: PathModule | None = None,
    predicted: Row | None = None,
) -> tuple[Row, PathModule]:
    """Stage 2 for one candidate: train its links (from the least-squares start) once per link variant of the
    config, keep the variant of best validation accuracy, measure it, save its links. `module` (the first
    variant's, e.g. restored from a checkpoint) is trained instead of a fresh one; `on_epoch` counts epochs
    across variants. `predicted` (its stage-1 row) keeps the prediction beside the measurement."""
    local = ctx.service_model(spec.local)
    s = ctx.cfg.search
    variants, planned = training_plan(ctx.cfg, predicted)
    epochs = epochs or planned
    start = time.perf_counter()
    trained = spec.kind != "local"
    variants = variants if trained else variants[:1]
    best: tuple[float, PathModule, LinkVariant] | None = None
    for i, variant in enumerate(variants):
        if module is None or i > 0:
            torch.manual_seed(ctx.cfg.seed)  # its links start the same whatever trained before (deferred, on Tune)
            module = PathModule(spec, local.blocks) if not trained else build_path(ctx, spec, variant)[0]
        if trained:
            torch.manual_seed(ctx.cfg.seed)  # fit's shuffling too, whether or not the links were built just above
            shift = i * epochs
            shifted: Callable[[int, float, float], None] | None = None
            if on_epoch is not None:
                shifted = lambda e, loss, acc, shift=shift: on_epoch(e + shift, loss, acc)
            with _feature_matching(ctx, module, variant.distill, local.task.train) as (aux_loss, train):
                fit(
                    module,
                    module.link_parameters(),
                    train,
                    local.task.val,
                    epochs=epochs,
                    lr=s.link_lr,
                    batch_size=s.link_batch_size,
                    seed=ctx.cfg.seed,
                    desc=f"{spec.id} [{variant.name}]",
                    progress=progress,
                    aux_loss=aux_loss,
                    on_epoch=shifted,
                )
        val_acc = evaluate(module, local.task.val)
        if best is None or val_acc > best[0]:
            best = (val_acc, module, variant)
    assert best is not None  # search.link_variants has at least one variant (config validation)
    val_acc, module, variant = best
    test_acc = evaluate(module, local.task.test)
    links_file = str(save_links(module, links_dir)) if trained and links_dir is not None else None
    row = path_row(
        ctx,
        spec,
        path_costs(ctx, module),
        link_params=_link_params(module),
        pred_acc=predicted.pred_acc if predicted else None,
        val_acc=val_acc,
        test_acc=test_acc,
        trained=trained,
        train_seconds=round(time.perf_counter() - start, 2),
        links_file=links_file,
        link_variant=variant.name if trained else None,
    )
    if predicted is not None:
        row = row.with_extra(**predicted.extra)
    return row, module
