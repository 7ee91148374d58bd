"""The multi-stage path search: predict every candidate cheaply, train only the most promising.

One algorithm (`staged_search`), two executors that run its per-candidate work (`coderay.candidate`):
`InProcess` here, one candidate after another, and `tuning.search.TuneExecutor`, trials in parallel on the
nodes that own the blocks. Both produce the same table: same candidates, same selection, same rows.

    bound     each candidate's reward bound: free links, perfect accuracy (profiles and shapes only)
    stage 1   predict candidates by bound, best first, while one can still reach the top-k and beat
              local-only; the rest are pruned, never fitted              (executor.predict over a Frontier)
    select    top-k by predicted reward per service (every candidate when exhaustive), plus local-only, plus
              `search.explore.count` of highest modelled throughput whose prediction a trained link may lift
    stage 2   train and measure the selected, score the baselines  (executor.measure)
    merge     candidates in enumeration order, then baselines; summary; save; plot
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from coderay.baselines import edge_early_rows
from coderay.candidate import SearchContext, candidates, predict_path, reward_bound, train_path
from coderay.config import CoderayConfig, ExploreSpec
from coderay.emulation import describe
from coderay.pathspec import PathSpec
from coderay.plan import link_owner, link_services
from coderay.rows import Row
from coderay.services import PROFILE_METHOD
from coderay.store import node_store, relative
from coderay.table import RewardTable

__all__ = [
    "Executor",
    "Frontier",
    "InProcess",
    "staged_search",
    "run_search",
    "search_to_serve",
    "finish_search",
    "search_dir",
    "stage2_selection",
    "explore_selection",
    "finish_table",
    "load_table",
    "spearman",
]

log = logging.getLogger(__name__)
NEVER_HANDED_OUT = "never handed out"  # the error of a candidate a stopped engine left above its bar


class Frontier:
    """Stage 1's order and its stop. Candidates come best reward bound first; one is handed out only while its
    bound beats the bar of its service: local-only's predicted reward, and once `top_k` of its candidates are
    predicted, the k-th best of them. A candidate under the bar can neither be trained (stage 2 takes the top
    k) nor beat local-only, so pruning it changes neither the selection nor the best path; the bar only
    rises, so a candidate pruned stays pruned. Exhaustive: no bar, every candidate is predicted."""

    def __init__(self, bounds: Sequence[Row], local_rows: Mapping[str, Row], *, top_k: int, exhaustive: bool):
        self.rows: dict[str, Row] = {}
        self._local = dict(local_rows)  # local-only's predicted row of each service
        self._queue = sorted(bounds, key=lambda r: -(r.pred_reward or 0.0))
        self._predicted: dict[str, list[float]] = {local: [] for local in self._local}
        self.top_k, self.exhaustive = top_k, exhaustive
        self.pruned: dict[str, Row] = {}

    def __len__(self) -> int:
        """Candidates still to hand out or prune."""
        return len(self._queue)

    def bar(self, local: str) -> float:
        """What a candidate of `local` must beat to be worth predicting (−inf when exhaustive)."""
        if self.exhaustive:
            return -math.inf
        own = self._local[local].pred_reward
        preds = sorted(self._predicted[local], reverse=True)
        kth = preds[self.top_k - 1] if len(preds) >= self.top_k else -math.inf
        return max(own if own is not None else -math.inf, kth)

    def next(self, accept: Callable[[PathSpec], bool] | None = None) -> PathSpec | None:
        """The best-bound candidate still above its bar that `accept` takes (any, by default), pruning those under
        their bar on the way; None when none is left to take. An engine passes `accept` to skip candidates whose
        node is busy: pruning stays exact in any order, since a bar only rises."""
        i = 0
        while i < len(self._queue):
            row = self._queue[i]
            bar = self.bar(row.local)
            if (row.pred_reward or 0.0) <= bar:
                del self._queue[i]
                self._prune(row, bar)
                continue
            spec = PathSpec.parse(row.path_id)
            if accept is None or accept(spec):
                del self._queue[i]
                return spec
            i += 1
        return None

    def _prune(self, row: Row, bar: float) -> None:
        self.pruned[row.path_id] = replace(row, pred_acc=None, pred_reward=None).with_extra(
            pruned=f"reward bound {row.pred_reward:.3f} ≤ {bar:.3f}", reward_bound=row.pred_reward
        )

    def queued(self) -> list[Row]:
        """The reward bounds of the candidates not yet handed out nor pruned, best first."""
        return list(self._queue)

    def record(self, row: Row) -> None:
        """A candidate's stage-1 row: its prediction raises its service's bar."""
        self.rows[row.path_id] = row
        if row.pred_reward is not None and row.kind != "local":
            self._predicted[row.local].append(row.pred_reward)

    def settle(self, rows: Mapping[str, Row]) -> dict[str, Row]:
        """The result when a copy of this frontier handed the candidates out (a Tune searcher, maybe restored from
        disk): `rows` are recorded, every other candidate is pruned under the final bar, or failed if above it."""
        self._queue = [r for r in self._queue if r.path_id not in rows]
        for row in rows.values():
            self.record(row)
        while (spec := self.next()) is not None:
            self.rows[spec.id] = Row.failed(spec, NEVER_HANDED_OUT)
        return self.result()

    def local_rows(self) -> list[Row]:
        """Local-only's stage-1 row of each service, from its profiles (an engine may predict it anew)."""
        return list(self._local.values())

    def result(self) -> dict[str, Row]:
        """Every candidate's stage-1 row: local-only, the predicted and the pruned."""
        return {r.path_id: r for r in self._local.values()} | self.rows | self.pruned


class Executor(Protocol):
    """Runs the per-candidate work of a search; rows come back keyed by path id. `prunes`: whether stage 1 may
    skip candidates under their bar (an engine that predicts them all at once cannot use the bar)."""

    name: str
    prunes: bool

    def predict(self, frontier: Frontier) -> dict[str, Row]:
        """Stage 1 for the candidates `frontier` hands out, each recorded as it finishes (a candidate that
        fails for good gets a row with `error`); returns `frontier.result()`."""

    def measure(
        self, chosen: Sequence[Row], baselines: Sequence[str], links_dir: Path
    ) -> tuple[dict[str, Row], Mapping[str, Sequence[Row]]]:
        """Stage 2 for the chosen stage-1 rows (links saved under `links_dir`, relative to the store of each node
        that runs them; rows name them so), and the baseline rows of each local service in `baselines`."""

    def meta(self) -> dict:
        """What this engine adds to the table's meta."""


class InProcess:
    """Every candidate in this process, one after another: a one-machine mode that reads every node's store
    (the local cluster's layout); on a cluster of providers' servers the Tune executor keeps each model on its
    node."""

    name = "in-process"
    prunes = True

    def __init__(self, ctx: SearchContext, *, progress: bool = True):
        self.ctx, self.progress = ctx, progress

    def predict(self, frontier: Frontier) -> dict[str, Row]:
        with tqdm(total=len(frontier), desc="stage 1 (predict)", unit="path", disable=not self.progress) as bar:
            while (spec := frontier.next()) is not None:
                frontier.record(predict_path(self.ctx, spec))
                bar.total = bar.n + 1 + len(frontier)  # the pruned leave the count
                bar.update()
            bar.total = bar.n
            bar.refresh()
        return frontier.result()

    def measure(
        self, chosen: Sequence[Row], baselines: Sequence[str], links_dir: Path
    ) -> tuple[dict[str, Row], Mapping[str, Sequence[Row]]]:
        cfg = self.ctx.cfg
        measured = {}
        for row in chosen:
            if row.kind != "local":
                log.info("stage 2 trains %s", row.path_id)
            spec = PathSpec.parse(row.path_id)
            owner = cfg.service(link_owner(spec)).node
            done, _ = train_path(
                self.ctx, spec, progress=self.progress, links_dir=node_store(cfg, owner) / links_dir, predicted=row
            )
            if done.links_file:
                name = relative(Path(done.links_file), cfg, owner)
                for svc in link_services(spec, link_out=done.link_out_on or "host"):
                    if cfg.service(svc).node != owner:
                        dest = node_store(cfg, cfg.service(svc).node) / name
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(done.links_file, dest)
                done = replace(done, links_file=name)
            measured[row.path_id] = done
        return measured, {local: edge_early_rows(self.ctx, local) for local in baselines}

    def meta(self) -> dict:
        return {}


def search_dir(cfg: CoderayConfig, *, exhaustive: bool) -> Path:
    """Results keyed by everything that changes them: the services, the search settings, the mode."""
    network = cfg.network if cfg.emulation.local else cfg.network.encoding  # a real cluster's is measured anew
    key = cfg.fingerprint(
        cfg.services,
        cfg.search,
        cfg.reward,
        cfg.nodes,
        network,
        cfg.emulation,
        cfg.seed,
        exhaustive,
        cfg.serving.call_overhead_ms,
        cfg.serving.max_batch_size,
        PROFILE_METHOD,
    )
    return cfg.root / "search" / f"{'exhaustive' if exhaustive else 'staged'}-{key}"


def load_table(cfg: CoderayConfig, *, exhaustive: bool | None = None) -> RewardTable | None:
    """The search's reward table if one is on disk for this config (either engine), else None."""
    exhaustive = cfg.search.exhaustive if exhaustive is None else exhaustive
    directory = search_dir(cfg, exhaustive=exhaustive)
    if not (directory / "table.json").exists():
        return None
    table = RewardTable.load(directory)
    table.meta["from_cache"] = True
    return table


def stage2_selection(rows: Sequence[Row], top_k: int, exhaustive: bool) -> list[str]:
    """Path ids to train: every candidate when exhaustive, else the top-k non-local by predicted reward."""
    pool = [(pred, r) for r in rows if r.kind != "local" and (pred := r.pred_reward) is not None]
    if not exhaustive:
        pool = sorted(pool, key=lambda p: -p[0])[:top_k]
    return [r.path_id for _, r in pool]


def explore_selection(rows: Sequence[Row], picked: Collection[str], explore: ExploreSpec) -> list[str]:
    """Path ids stage 2 trains beyond `picked`: the `explore.count` predicted candidates of highest modelled
    throughput whose predicted accuracy is within `explore.reach` of local-only's validation accuracy. Their
    predicted reward may be 0 (under the floor); a trained link can lift them above it."""
    local = next((r for r in rows if r.kind == "local" and r.pred_acc is not None), None)
    if local is None or not explore.count:
        return []
    assert local.pred_acc is not None  # checked just above
    pool = [
        r
        for r in rows
        if r.kind != "local"
        and r.path_id not in picked
        and r.error is None
        and r.pred_acc is not None
        and r.th_ratio is not None
        and r.pred_acc >= local.pred_acc - explore.reach
    ]
    pool.sort(key=lambda r: (-(r.th_ratio or 0.0), r.path_id))
    return [r.path_id for r in pool[: explore.count]]


def staged_search(
    ctx: SearchContext, executor: Executor, *, exhaustive: bool, out: Path, defer: bool = False
) -> RewardTable:
    """The search, run by `executor`; the table is saved (JSON, CSV) and plotted under `out`. With `defer`, stage 2
    leaves the explored candidates and the baselines (what serving does not need to start) for `finish_search`:
    the table then says what it left in `meta["pending"]` and is saved under `out`/partial."""
    cfg = ctx.cfg
    start = time.perf_counter()
    locals_ = cfg.search.locals or [s.name for s in cfg.services]
    cands = {local: candidates(ctx, local) for local in locals_}
    local_rows, bounds = {}, []
    for local in locals_:
        for spec in cands[local]:
            if spec.kind == "local":
                local_rows[local] = reward_bound(ctx, spec, acc=ctx.services[local].metrics["val_acc"])
            else:
                bounds.append(reward_bound(ctx, spec))
    prune = cfg.search.prune and executor.prunes and not exhaustive
    frontier = Frontier(bounds, local_rows, top_k=cfg.search.top_k, exhaustive=not prune)
    preds = executor.predict(frontier)
    chosen = []
    for local in locals_:
        rows = [preds[spec.id] for spec in cands[local]]
        picked = set(stage2_selection(rows, cfg.search.top_k, exhaustive))
        explored = set() if exhaustive else set(explore_selection(rows, picked, cfg.search.explore))
        chosen += [
            r.with_extra(explored=True) if r.path_id in explored else r
            for r in rows
            if r.path_id in picked | explored or (r.kind == "local" and r.error is None)
        ]
    baselines = locals_ if cfg.search.baselines else []
    later = {r.path_id: r for r in chosen if r.extra.get("explored")} if defer else {}
    measured, base_rows = executor.measure(
        [r for r in chosen if r.path_id not in later], [] if defer else baselines, Path("links") / out.name
    )
    rows = []
    for local in locals_:
        rows += [measured.get(spec.id, later.get(spec.id, preds[spec.id])) for spec in cands[local]]
        rows += base_rows.get(local, [])
    meta = {
        "config": cfg.name,
        "mode": "exhaustive" if exhaustive else "staged",
        "engine": executor.name,
        "seconds": round(time.perf_counter() - start, 1),
        "emulation": describe(cfg),
        "profiles": _profiles_how(cfg),
        "network": cfg.network.model_dump(mode="json"),
        "network_source": "emulated (the config's)" if cfg.emulation.local else "measured between the nodes",
        **executor.meta(),
    }
    if defer and (later or baselines):
        meta["pending"] = {"explore": list(later), "baselines": baselines}
    return _saved(finish_table(rows, meta), out)


def finish_search(ctx: SearchContext, executor: Executor, partial: RewardTable, *, out: Path) -> RewardTable:
    """What a deferred search (`staged_search(defer=True)`) left: train its explored candidates, score the
    baselines, and save the whole table under `out` (where `load_table` finds it), the partial one removed."""
    start = time.perf_counter()
    pending = partial.meta["pending"]
    later = [r for r in partial.rows if r.path_id in pending["explore"]]
    measured, base_rows = executor.measure(later, pending["baselines"], Path("links") / out.name)
    rows = []
    for local in dict.fromkeys(r.local for r in partial.rows):
        rows += [measured.get(r.path_id, r) for r in partial.rows if r.local == local]
        rows += base_rows.get(local, [])
    meta = {k: v for k, v in partial.meta.items() if k not in ("pending", "summary", "dir", "from_cache")}
    took = time.perf_counter() - start
    meta["seconds"] = round(meta["seconds"] + took, 1)
    meta["explored_after_serving"] = round(took, 1)
    table = _saved(finish_table(rows, meta), out)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return table


PARTIAL = "partial"  # where a deferred search's table waits under its search dir until `finish_search`


def _saved(table: RewardTable, out: Path) -> RewardTable:
    """`table` saved and plotted under `out` (`out`/partial while it has work pending)."""
    where = out / PARTIAL if "pending" in table.meta else out
    table.meta["dir"] = str(where)
    table.save(where)
    table.plot(where / "pareto.png")
    table.meta["from_cache"] = False
    log.info("reward table: %s (%d rows, %.0f s)", where / "table.json", len(table.rows), table.meta["seconds"])
    return table


def _profiles_how(cfg: CoderayConfig) -> str:
    if not cfg.emulation.local:
        return "timed by each node on its own hardware"
    mechanism = describe(cfg)["mechanism"]
    return (
        f"timed under per-node CPU caps ({mechanism})"
        if mechanism.startswith("cgroup")
        else "timed on this machine, divided by node speeds"
    )


def finish_table(rows: list[Row], meta: dict) -> RewardTable:
    """The table with its per-service summary (candidates, trained, best, rank correlation) in `meta`."""
    table = RewardTable(rows, meta)
    summary = {}
    for local in table.locals:
        svc_rows = table.for_service(local)
        trained = [r for r in svc_rows if r.measured and r.kind != "local"]
        base = [(reward, r) for r in table.baselines(local) if (reward := r.reward) is not None]  # measured
        ranked = [
            (pred, reward) for r in trained if (pred := r.pred_reward) is not None and (reward := r.reward) is not None
        ]
        summary[local] = {
            "candidates": len(svc_rows),
            "trained": len(trained),
            "trained_fraction": len(trained) / max(len(svc_rows), 1),
            "best": table.best(local).path_id,
            "spearman_pred_vs_measured": spearman([p for p, _ in ranked], [m for _, m in ranked])
            if len(ranked) > 2
            else None,
            "best_edge_early": max(base, key=lambda p: p[0])[1].path_id if base else None,
        }
    table.meta["summary"] = summary
    return table


def run_search(
    cfg: CoderayConfig, *, exhaustive: bool | None = None, progress: bool = True, use_cache: bool = True
) -> RewardTable:
    """The in-process search for every local service in the config (loaded from disk when already run)."""
    exhaustive = cfg.search.exhaustive if exhaustive is None else exhaustive
    cached = load_table(cfg, exhaustive=exhaustive) if use_cache else None
    if cached is not None:
        return cached
    ctx = SearchContext.load(cfg, progress=progress)
    return staged_search(
        ctx, InProcess(ctx, progress=progress), exhaustive=exhaustive, out=search_dir(cfg, exhaustive=exhaustive)
    )


def searched(cfg: CoderayConfig) -> bool:
    """Whether `search_to_serve` has a table on disk to start from (the whole one, or an earlier `up`'s first)."""
    out = search_dir(cfg, exhaustive=cfg.search.exhaustive)
    return (out / "table.json").exists() or (out / PARTIAL / "table.json").exists()


def search_to_serve(
    cfg: CoderayConfig, *, progress: bool = True
) -> tuple[RewardTable, Callable[[], RewardTable] | None]:
    """`coderay up`'s in-process search: a table to start serving from, and what finishes it while serving.

    A whole table on disk comes back as is (nothing to finish). Otherwise the search runs deferred (or an
    earlier `up`'s partial table is taken up): the function returned trains the explored candidates and scores
    the baselines, and returns the whole table, saved where `load_table` finds it."""
    exhaustive = cfg.search.exhaustive
    cached = load_table(cfg, exhaustive=exhaustive)
    if cached is not None:
        return cached, None
    out = search_dir(cfg, exhaustive=exhaustive)
    ctx: SearchContext | None = None  # loaded once where this run searched; a partial table on disk loads it later
    if (out / PARTIAL / "table.json").exists():
        partial = RewardTable.load(out / PARTIAL)
        partial.meta["from_cache"] = True
    else:
        ctx = SearchContext.load(cfg, progress=progress)
        partial = staged_search(ctx, InProcess(ctx, progress=progress), exhaustive=exhaustive, out=out, defer=True)
    if "pending" not in partial.meta:
        return partial, None

    def finish() -> RewardTable:
        used = ctx if ctx is not None else SearchContext.load(cfg, progress=False)
        return finish_search(used, InProcess(used, progress=False), partial, out=out)

    return partial, finish


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
