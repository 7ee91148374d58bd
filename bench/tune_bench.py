"""Wall time of the path search: in-process, and on Ray Tune on 1, 2 and 3 Ray nodes (same config, same trials);
writes bench/results/tune.md.

    python bench/tune_bench.py [CONFIG] [--runs N] [--workdir DIR] [--layouts in-process 3]

The config's edge servers are packed onto fewer Ray nodes (one CPU each), so every layout runs exactly the
same trials, pinned to the same edge server's resource; only how many run at once changes. A packed node has
one store (its first edge server's), so each layout's services are trained and profiled there once, untimed,
before its first timed search. Each search starts over (no cache, no resume); the layouts take turns round by
round, so a busy spell of the shared machine falls on all of them, and the table is rewritten after each round.
Every Tune table is compared with the in-process table of its round: best path and the largest accuracy
difference over the candidates both measured. Tune's times exclude starting the local cluster (its own column).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from coderay.candidate import SearchContext
from coderay.cluster import LocalCluster
from coderay.config import DEFAULT_CONFIG, load_config
from coderay.provider import describe_on_nodes, train_on_nodes
from coderay.search import InProcess, search_dir, staged_search
from tuning.search import run_tune_search

IN_PROCESS = "in-process"


def layouts(names: list[str]) -> dict[str, list[tuple[float, list[str]]]]:
    """1 node: every edge server on one; 2: the last server (the demo's biggest host) alone; n: one each."""
    out = {"1": [(1.0, names)]}
    if len(names) >= 2:
        out["2"] = [(1.0, names[:-1]), (1.0, names[-1:])]
    if len(names) >= 3:
        out[str(len(names))] = [(1.0, [n]) for n in names]
    return out


class _Timed(InProcess):
    """The in-process executor, timing its two stages."""

    def __init__(self, ctx: SearchContext):
        super().__init__(ctx, progress=False)
        self.seconds: dict[str, float] = {}

    def predict(self, frontier):
        began = time.perf_counter()
        out = super().predict(frontier)
        self.seconds["predict"] = round(time.perf_counter() - began, 1)
        return out

    def measure(self, chosen, baselines, links_dir):
        began = time.perf_counter()
        out = super().measure(chosen, baselines, links_dir)
        self.seconds["train"] = round(time.perf_counter() - began, 1)
        return out


def run_in_process(cfg) -> dict:
    began = time.perf_counter()
    ctx = SearchContext.load(cfg, progress=False, train_missing=False)
    executor = _Timed(ctx)
    table = staged_search(ctx, executor, exhaustive=False, out=search_dir(cfg, exhaustive=False))
    return {"wall": time.perf_counter() - began, "stages": executor.seconds, "table": table}


def run_tune(cfg, layout, *, warm: bool) -> dict:
    began = time.perf_counter()
    cluster = LocalCluster(cfg, layout=layout)
    try:
        started = time.perf_counter() - began
        if warm:  # this layout's stores: trained and profiled once, untimed
            train_on_nodes(cfg)
            describe_on_nodes(cfg)
        began = time.perf_counter()
        table = run_tune_search(cfg, resume=False, progress=False)
        wall = time.perf_counter() - began
    finally:
        cluster.shutdown()
    return {"wall": wall, "cluster_s": started, "stages": table.meta["tune"]["stage_seconds"], "table": table}


def accuracy_gap(table, reference) -> float:
    """The largest |difference| of any accuracy (predicted, validation, test) over the rows both tables have."""
    gaps = [0.0]
    for theirs in reference.rows:
        if theirs.get("kind") not in ("coop", "skip", "local"):
            continue
        mine = table.row(theirs["path_id"])
        for key in ("pred_acc", "val_acc", "test_acc"):
            if mine.get(key) is not None and theirs.get(key) is not None:
                gaps.append(abs(mine[key] - theirs[key]))
    return max(gaps)


def _spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.0f} ({min(values):.0f}–{max(values):.0f})" if len(values) > 1 else f"{med:.0f}"


def main(
    config: str | None = None, *, runs: int = 3, workdir: str | None = None, only: list[str] | None = None
) -> Path:
    cfg = load_config(config or DEFAULT_CONFIG, **({"workdir": workdir} if workdir else {}))
    SearchContext.load(cfg)  # train (or load) the services first: not part of the timing
    plan = {IN_PROCESS: None} | layouts([node.name for node in cfg.nodes])
    plan = {k: v for k, v in plan.items() if not only or k in only or k == IN_PROCESS}  # the reference
    results: dict[str, list[dict]] = {k: [] for k in plan}
    local = (cfg.search.locals or [cfg.services[0].name])[0]
    out = Path(__file__).parent / "results" / "tune.md"
    for round_ in range(runs):
        reference = None
        for key, layout in plan.items():
            load = os.getloadavg()[0]
            res = run_in_process(cfg) if layout is None else run_tune(cfg, layout, warm=round_ == 0)
            res["load"] = (load + os.getloadavg()[0]) / 2
            table = res.pop("table")
            best = table.best(local)
            predicted = sum(r.pred_reward is not None for r in table.for_service(local) if r.kind != "local")
            res |= {"best": best["path_id"], "test_acc": best["test_acc"], "round": round_ + 1, "predicted": predicted}
            if layout is None:
                reference = table
            res["gap"] = accuracy_gap(table, reference)
            results[key].append(res)
            print(f"round {round_ + 1} {key}: {res['wall']:.0f} s, load {res['load']:.1f}, {res['best']}", flush=True)
        out.write_text(report(cfg, plan, results, round_ + 1))
    print(out.read_text())
    return out


def _rest(r: dict) -> float:
    """A run's time outside its two stages: loading the services' metadata, the local sides, the table."""
    return r["wall"] - r["stages"]["predict"] - r["stages"]["train"]


def report(cfg, plan: dict, results: dict[str, list[dict]], rounds: int) -> str:
    base = statistics.median(r["wall"] for r in results[IN_PROCESS])
    rows, raw = [], []
    for key, layout in plan.items():
        rs = results[key]
        where = "one process" if layout is None else " + ".join("/".join(n) for _, n in layout)
        wall = [r["wall"] for r in rs]
        bests = ", ".join(sorted({f"`{r['best']}`" for r in rs}))
        cluster = _spread([r["cluster_s"] for r in rs]) if layout else "–"
        rows.append(
            f"| {key} | {where} | {_spread([r['stages']['predict'] for r in rs])} | "
            f"{_spread([r['stages']['train'] for r in rs])} | **{_spread(wall)}** | "
            f"{statistics.median(wall) / base:.2f} | {cluster} | {bests} | "
            f"{max(r['gap'] for r in rs):.4f} | {statistics.median(r['load'] for r in rs):.1f} |"
        )
        raw += [
            f"| {r['round']} | {key} | {r['stages']['predict']} | {r['predicted']} | {r['stages']['train']} | "
            f"{_rest(r):.0f} | {r['wall']:.0f} | {r['cluster_s']:.0f} | `{r['best']}` | {r['test_acc']:.4f} | "
            f"{r['gap']:.4f} | {r['load']:.1f} |"
            if layout
            else f"| {r['round']} | {key} | {r['stages']['predict']} | {r['predicted']} | {r['stages']['train']} | "
            f"{_rest(r):.0f} | {r['wall']:.0f} | – | `{r['best']}` | {r['test_acc']:.4f} | – | {r['load']:.1f} |"
            for r in rs
        ]
    return (
        "\n".join(
            [
                f"# Path search: in-process vs Ray Tune by number of Ray nodes ({cfg.name}, 2-core CPU, 1 CPU per "
                "Ray node)",
                "",
                f"`python bench/tune_bench.py`: median of {rounds} rounds (min–max) in seconds; the layouts take turns "
                "within each round. × in-process: median total over the in-process median. Tune's totals exclude "
                "starting the local cluster (its own column; `coderay search` pays it, `--in-process` does not). "
                "Δacc: the largest difference of any candidate's predicted, validation or test accuracy from the "
                "in-process table of the same round. Load: the machine's 1-minute load average during the run "
                "(a shared machine). Stage-1 predicted: candidates predicted (the others pruned by their reward "
                "bound); other: a run's time outside its two stages (the services' metadata, the local sides, the "
                "table).",
                "",
                "| Ray nodes | edge servers per node | stage 1 s | stage 2 s | total s | × in-process | "
                "cluster start s | best path | Δacc | load |",
                "|---|---|---|---|---|---|---|---|---|---|",
                *rows,
                "",
                "Every run:",
                "",
                "| round | Ray nodes | stage 1 s | stage-1 predicted | stage 2 s | other s | total s | "
                "cluster start s | best path | its test acc | Δacc | load |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
                *raw,
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", help="override the config's workdir")
    p.add_argument("--layouts", nargs="+", help="run only these rows (in-process, 1, 2, 3)")
    a = p.parse_args()
    main(a.config, runs=a.runs, workdir=a.workdir, only=a.layouts)
