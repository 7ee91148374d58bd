"""Trained links on deeper hand-offs (issue 25): what each link variant reaches per return depth.

    python bench/depth_bench.py [--workdir /tmp/depth-bench] [--depths 2:3,3:4,4:5,3:5] [--epochs 4,12]

Stage 1 ranks paths by least-squares links, which on the demo predict 0.83-0.92 for the paths that return
late to the local model (modelled at 2.8-3.1x local-only), so stage 2 never trains them. This trains them
anyway, one `LinkVariant` at a time through stage 2's own `train_path`, and records accuracy, link cost and
the modelled throughput ratio, so the search's defaults can be chosen on measurements.

Rows are cached in `bench/results/depth.json` (a rerun with a wider grid trains only what is new);
`bench/results/depth.md` and `depth.png` are rebuilt from all cached rows on every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from coderay import capacity
from coderay.candidate import SearchContext, predict_path, reward_bound, train_path
from coderay.config import DEFAULT_CONFIG, LinkVariant, load_config
from coderay.links import Link
from coderay.paths import PathModule
from coderay.pathspec import PathSpec
from coderay.services import load_services

RESULTS = Path(__file__).parent / "results"
FLOOR_POINTS = 1.5  # a path is "close enough" within this many points of local-only's test accuracy
log = logging.getLogger("depth_bench")


def link_cpu_ms(module: PathModule, batch: int = 32, seconds: float = 0.3) -> float:
    """CPU ms per batch of `batch` for all of a path's links, one thread, uncapped: a contention-proof cost
    (thread CPU time, not wall time) beside the node timing that `path_costs` does under the node's cap."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xs = {name: torch.randn(batch, *link.src) for name, link in module.links.items() if isinstance(link, Link)}
        with torch.inference_mode():
            for name, link in module.links.items():
                link(xs[name])  # warm-up
            runs, cpu, start = 0, 0.0, time.perf_counter()
            while runs < 5 or time.perf_counter() - start < seconds:
                t = time.thread_time()
                for name, link in module.links.items():
                    link(xs[name])
                cpu += time.thread_time() - t
                runs += 1
    finally:
        torch.set_num_threads(threads)
    return 1e3 * cpu / runs


def key(depth: str, variant: LinkVariant, epochs: int, seed: int) -> str:
    return f"{depth}|{variant.name}|{epochs}|{seed}"


def run_one(cfg, services, spec: PathSpec, variant: LinkVariant, epochs: int, seed: int) -> dict:
    """One (path, variant, epochs, seed): stage 2's `train_path` with a config naming only this variant."""
    search = cfg.search.model_copy(update={"link_variants": [variant], "link_epochs": epochs})
    ctx = SearchContext(cfg.model_copy(update={"seed": seed, "search": search}), services)
    cpu = time.process_time()
    row, module = train_path(ctx, spec, epochs=epochs, progress=False)
    cpu = time.process_time() - cpu
    free = reward_bound(ctx, spec)  # the same path with free links: what the links' time costs
    assert row.costs is not None and free.costs is not None
    batch = services[spec.host].spec.batch_size
    node_ms = 1e3 * batch * (row.costs.host_part - free.costs.host_part + row.costs.local_part - free.costs.local_part)
    return {
        "path": spec.id,
        "variant": variant.name,
        "epochs": epochs,
        "seed": seed,
        "val_acc": row.val_acc,
        "test_acc": row.test_acc,
        "link_params": row.link_params,
        "link_ms_node": node_ms,  # per host batch, on the node(s) running the links, as path_costs timed them
        "link_cpu_ms32": link_cpu_ms(module),
        "train_s": row.train_seconds,  # wall clock: grows with whatever else this machine runs
        "train_cpu_s": cpu,  # this process's CPU seconds (training, evaluation, timing the links)
        "th_ratio": row.th_ratio,
        "th_ratio_free_links": free.th_ratio,
        "bottleneck": row.bottleneck,
        "reward": row.reward,
    }


def measure(args, cfg) -> dict:
    """Train every grid point not yet in the cache; the cache is rewritten after each, so a cut run keeps its rows."""
    cache_file = RESULTS / "depth.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {"rows": {}, "meta": {}}
    services = load_services(cfg, [args.local, args.host], progress=False)
    local = services[args.local]
    cache["meta"] = {
        "config": str(args.config),
        "local": args.local,
        "host": args.host,
        "local_val_acc": local.metrics["val_acc"],
        "local_test_acc": local.metrics["test_acc"],
        "val_n": len(local.task.val),  # type: ignore[arg-type]
        "test_n": len(local.task.test),  # type: ignore[arg-type]
        "link_out": cfg.search.link_out,
    }
    variants = [LinkVariant(capacity=c, distill=d) for c in args.capacities for d in args.distill]
    ctx = SearchContext(cfg, services)
    for depth in args.depths:
        hout, lin = map(int, depth.split(":"))
        spec = PathSpec(args.local, lout=0, lin=lin, host=args.host, hin=1, hout=hout)
        pkey = f"{depth}|predicted"
        if pkey not in cache["rows"]:
            pred = predict_path(ctx, spec)  # stage 1's view of this path (the demo config's first variant)
            cache["rows"][pkey] = {"path": spec.id, "pred_acc": pred.pred_acc, "th_ratio": pred.th_ratio}
        for epochs in args.epochs:
            for variant in variants:
                for seed in args.seeds:
                    k = key(depth, variant, epochs, seed)
                    if k in cache["rows"]:
                        continue
                    t = time.perf_counter()
                    cache["rows"][k] = run_one(cfg, services, spec, variant, epochs, seed)
                    r = cache["rows"][k]
                    log.info(
                        "%s %s e%d s%d: val %.4f test %.4f ratio %.2f (%.0f s)",
                        spec.id, variant.name, epochs, seed, r["val_acc"], r["test_acc"], r["th_ratio"],
                        time.perf_counter() - t,
                    )  # fmt: skip
                    cache_file.write_text(json.dumps(cache, indent=1))
    cache_file.write_text(json.dumps(cache, indent=1))
    return cache


def grouped(cache: dict) -> dict[tuple[str, str, int], dict]:
    """Per (depth, variant, epochs): the median over seeds of every number, and the seed count."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for k, r in cache["rows"].items():
        if k.endswith("|predicted"):
            continue
        depth = k.split("|")[0]
        groups.setdefault((depth, r["variant"], r["epochs"]), []).append(r)
    out = {}
    for g, rows in groups.items():
        med = {f: statistics.median(r[f] for r in rows) for f in rows[0] if isinstance(rows[0][f], int | float)}
        out[g] = rows[0] | med | {"seeds": len(rows)}
    return out


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def report(cache: dict) -> list[str]:
    meta = cache["meta"]
    groups = grouped(cache)
    local_test = meta["local_test_acc"]
    config = Path(meta["config"])
    floor = local_test - FLOOR_POINTS / 100
    seeds = sorted({r["seeds"] for r in groups.values()})
    depths = sorted({g[0] for g in groups}, key=lambda d: tuple(map(int, d.split(":"))))
    lines = [
        f"# Trained links on deeper hand-offs ({meta['local']} through {meta['host']}, lout 0, hin 1)",
        "",
        f"`bench/depth_bench.py` on `{config.parent.name}/{config.name}`: every path's links trained by stage 2's "
        "`train_path`, "
        f"one link variant at a time; medians of {'/'.join(map(str, seeds))} seed(s) per cell "
        f"({'1 seed: single runs vary by a point or more' if seeds == [1] else 'median over seeds'}). "
        f"Local-only: val {meta['local_val_acc']:.4f}, test {local_test:.4f} "
        f"(val n = {meta['val_n']}, test n = {meta['test_n']}: one sample is {100 / meta['test_n']:.2f} points). "
        f"Ratio: the modelled throughput vs local-only (reward-table machinery, links timed on their node, "
        f"link_out on the {meta['link_out']}); 'free' is the same path with zero-cost links. Link ms: per host "
        f"batch on the node as `path_costs` timed it (wall clock under the node's CPU cap, so it moves with "
        f"machine load), and CPU ms per batch of 32, one thread, uncapped. Train CPU s: this process's CPU "
        f"seconds for the run ('–': rows measured before that column existed).",
        "",
        f"## Best per depth (by validation accuracy; within {FLOOR_POINTS} points of local-only's test "
        f"accuracy: test ≥ {floor:.4f})",
        "",
        "| path (hout:lin) | stage-1 pred | best variant | epochs | val | test | within | ratio | free | "
        "link params | link ms/batch (node) | link CPU ms/32 | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for depth in depths:
        cands = [r for g, r in groups.items() if g[0] == depth]
        best = max(cands, key=lambda r: (r["val_acc"], -r["link_params"], -r["epochs"]))  # as stage 2: val only
        pred = cache["rows"].get(f"{depth}|predicted", {}).get("pred_acc")
        lines.append(
            f"| `{best['path']}` ({depth}) | {pred:.3f} | {best['variant']} | {best['epochs']} | "
            f"{best['val_acc']:.4f} | {best['test_acc']:.4f} | {'yes' if best['test_acc'] >= floor else 'no'} | "
            f"{best['th_ratio']:.2f} | {best['th_ratio_free_links']:.2f} | {best['link_params']:,} | "
            f"{best['link_ms_node']:.2f} | {best['link_cpu_ms32']:.2f} | {_num(best.get('train_cpu_s'))} |"
        )
    ok = [r for r in groups.values() if r["test_acc"] >= floor]
    if ok:
        top = max(ok, key=lambda r: (round(r["th_ratio"], 2), -r["link_params"]))
        lines += [
            "",
            f"Highest modelled ratio within {FLOOR_POINTS} points (test): `{top['path']}` {top['variant']}, "
            f"{top['epochs']} epochs: test {top['test_acc']:.4f}, val {top['val_acc']:.4f}, ratio "
            f"{top['th_ratio']:.2f}, {top['link_params']:,} link params.",
        ]
    lines += [
        "",
        "## Full grid",
        "",
        "| path | variant | epochs | seeds | val | test | ratio | reward | link params | link ms/batch (node) | "
        "link CPU ms/32 | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(groups, key=lambda g: (tuple(map(int, g[0].split(":"))), g[2], g[1]))
    for g in order:
        r = groups[g]
        lines.append(
            f"| `{r['path']}` | {r['variant']} | {r['epochs']} | {r['seeds']} | {r['val_acc']:.4f} | "
            f"{r['test_acc']:.4f} | {r['th_ratio']:.2f} | {r['reward']:.3f} | {r['link_params']:,} | "
            f"{r['link_ms_node']:.2f} | "
            f"{r['link_cpu_ms32']:.2f} | {_num(r.get('train_cpu_s'))} |"
        )
    return lines


def plot(cache: dict, out: Path) -> None:
    """Test accuracy vs modelled ratio, one marker per variant, the longest training of each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped(cache)
    markers = dict(zip(sorted({g[1] for g in groups}), "osD^v<>px*"))
    fig, ax = plt.subplots(figsize=(8, 5))
    all_epochs = sorted({g[2] for g in groups})
    for variant, marker in markers.items():
        color = f"C{list(markers).index(variant)}"
        for epochs in all_epochs:  # hollow: the shortest training; filled and larger: longer ones
            pts = [r for g, r in groups.items() if g[1] == variant and g[2] == epochs]
            if not pts:
                continue
            hollow = epochs == all_epochs[0]
            ax.scatter(
                [r["th_ratio"] for r in pts],
                [r["test_acc"] for r in pts],
                marker=marker,
                s=30 + 2 * epochs,
                facecolors="none" if hollow else color,
                edgecolors=color,
                label=f"{variant}, {epochs} ep",
            )
    low = min(r["test_acc"] for r in groups.values()) - 0.04
    for depth in {g[0] for g in groups}:
        r = next(r for g, r in groups.items() if g[0] == depth)
        ax.annotate(depth, (r["th_ratio"], low + 0.01), fontsize=8, ha="center")
    local = cache["meta"]["local_test_acc"]
    ax.axhline(local - FLOOR_POINTS / 100, color="k", ls="--", lw=1, label=f"local-only − {FLOOR_POINTS} pts")
    ax.scatter([1.0], [local], color="k", marker="*", s=120, label="local-only")
    ax.set_xlabel("modelled throughput vs local-only (×)")
    ax.set_ylabel("path test accuracy")
    ax.set_ylim(low, 1.01)
    ax.set_title(f"{cache['meta']['local']} through {cache['meta']['host']}: trained links by return depth (hout:lin)")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--workdir", default="/tmp/depth-bench", help="where the services are trained (cached)")
    p.add_argument("--local", default="digits")
    p.add_argument("--host", default="mnist")
    p.add_argument("--depths", default="2:3,3:4,4:5,3:5", help="hout:lin pairs (lout 0, hin 1)")
    p.add_argument("--capacities", default="1x1,3x3,bottleneck")
    p.add_argument("--distill", default="0,1")
    p.add_argument("--epochs", default="4,12")
    p.add_argument("--seeds", default="0")
    p.add_argument("--report-only", action="store_true", help="rebuild depth.md / depth.png from the cache")
    args = p.parse_args()
    args.depths = args.depths.split(",")
    args.capacities = args.capacities.split(",")
    args.distill = [float(d) for d in args.distill.split(",")]
    args.epochs = [int(e) for e in args.epochs.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    RESULTS.mkdir(exist_ok=True)
    if args.report_only:
        cache = json.loads((RESULTS / "depth.json").read_text())
    else:
        cfg = load_config(args.config, workdir=args.workdir)
        session = capacity.new_session()  # CPU-cap groups of our own, not those of runs sharing this machine
        try:
            cache = measure(args, cfg)
        finally:
            capacity.cleanup(session)
    (RESULTS / "depth.md").write_text("\n".join(report(cache)) + "\n")
    plot(cache, RESULTS / "depth.png")
    print("\n".join(report(cache)))


if __name__ == "__main__":
    main()
