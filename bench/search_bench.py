"""Staged vs exhaustive path search on a config (default: the demo); writes bench/results/search.md.

    python bench/search_bench.py [CONFIG]

Both searches are cached under the config's workdir, so a second run only re-reads them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from coderay.candidate import SearchContext, build_path, path_costs
from coderay.config import DEFAULT_CONFIG, load_config
from coderay.pathspec import PathSpec
from coderay.search import run_search, spearman
from coderay.throughput import path_throughput


def capacity_sweep(cfg, path_id: str) -> list[str]:
    """The modelled throughput of one cooperative path as the link between the two nodes gets faster and the
    host lends more or fewer slots s of its batch B: where the local SP's gain is bound, and at what cost to
    the host's own requests."""
    ctx = SearchContext.load(cfg, progress=False)
    spec = PathSpec.parse(path_id)
    costs = path_costs(ctx, build_path(ctx, spec)[0])
    a, b = cfg.service(spec.local).node, cfg.service(spec.host).node
    bw, rtt = cfg.network.between(a, b)
    lines = [
        "",
        f"`{path_id}` under other link speeds and guest quotas (modelled; the demo: {bw:g} Mbit/s, "
        f"s = {costs.guest_quota} of B = {costs.batch}; {costs.bytes_out + costs.bytes_back:,} bytes "
        f"on the wire per sample):",
        "",
        f"| Mbit/s | s | Th/s | × local | bound by | host's own Th/s (of {1 / costs.host_full:.0f}) |",
        "|---|---|---|---|---|---|",
    ]
    for mbps in sorted({100, 200, 500, 1000, bw}):
        net = cfg.network.model_copy(update={"bandwidth_mbps": mbps, "rtt_ms": rtt, "links": []})
        for s in sorted({8, 16, 24, costs.guest_quota} - {0}):
            if s >= costs.batch:
                continue
            th = path_throughput(replace(costs, guest_quota=s), kind="coop", network=net, local_node=a, host_node=b)
            lines.append(
                f"| {mbps:g} | {s} | {th.total:.0f} | {th.ratio:.2f} | {th.bottleneck} | {th.host_own_after:.0f} |"
            )
    return lines


def main(config: str | None = None) -> Path:
    cfg = load_config(config or DEFAULT_CONFIG)
    timings, tables = {}, {}
    for mode in ("staged", "exhaustive"):
        start = time.perf_counter()
        tables[mode] = run_search(cfg, exhaustive=mode == "exhaustive")
        timings[mode] = tables[mode].meta.get("seconds", round(time.perf_counter() - start, 1))
    engines = ", ".join(f"{mode}: {t.meta.get('engine')}" for mode, t in tables.items())
    lines = [
        f"# Path search: staged vs exhaustive ({cfg.name}, 2-core CPU)",
        "",
        "Engine that produced each table (in-process and Tune searches share a search directory; the latest run "
        f"is read): {engines}.",
        "",
        "| local | candidates | trained (staged) | staged best | staged reward | exhaustive best | "
        "exhaustive reward | staged / optimum | Spearman(pred, measured) | staged s | exhaustive s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for local in tables["staged"].locals:
        st, ex = tables["staged"], tables["exhaustive"]
        s_best, e_best = st.best(local), ex.best(local)
        trained = [r for r in ex.for_service(local) if r["reward"] is not None and r["kind"] != "local"]
        rho = spearman([r["pred_reward"] for r in trained], [r["reward"] for r in trained])
        # the staged choice scored by the exhaustive run's measurement of the same path
        s_score = ex.row(s_best["path_id"])["reward"]
        lines.append(
            f"| {local} | {len(st.for_service(local))} | {st.meta['summary'][local]['trained']} | "
            f"`{s_best['path_id']}` | {s_best['reward']:.3f} | `{e_best['path_id']}` | "
            f"{e_best['reward']:.3f} | {s_score / e_best['reward']:.1%} | {rho:.2f} | "
            f"{timings['staged']} | {timings['exhaustive']} |"
        )
        base = st.row(f"{local}:local")
        lines += [
            "",
            f"Best paths of `{local}` (test accuracy, average accuracy A^av, modelled throughput ratio vs local-only):",
            "",
            "| path | A_p test | A^av test | Th/s | × local (model) | reward |",
            "|---|---|---|---|---|---|",
        ]
        top = sorted((r for r in ex.for_service(local) if r["reward"] is not None), key=lambda r: -r["reward"])[:8]
        for r in top + ([base] if base["path_id"] not in {t["path_id"] for t in top} else []):
            lines.append(
                f"| `{r['path_id']}` | {r['test_acc']:.4f} | {r['acc_avg_test']:.4f} | {r['th_total']:.0f} "
                f"| {r['th_ratio']:.2f} | {r['reward']:.3f} |"
            )
        edge = st.baselines(local)
        if edge:
            e = max(edge, key=lambda r: r["reward"])
            lines += [
                "",
                f"Edge-early baseline (mirrors {e['mirrored_params']:,} local parameters on "
                f"`{e['host']}`): best `{e['path_id']}`: A test {e['test_acc']:.4f}, "
                f"Th × {e['th_ratio']:.2f}, reward {e['reward']:.3f}.",
            ]
        if s_best["kind"] == "coop":
            lines += capacity_sweep(cfg, s_best["path_id"])
    out = Path(__file__).parent / "results" / "search.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
