"""Staged vs exhaustive path search on a config (default: the demo); writes bench/results/search.md.

    python bench/search_bench.py [CONFIG]

Both searches are cached under the config's workdir, so a second run only re-reads them.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from coderay.config import DEFAULT_CONFIG, load_config
from coderay.search import run_search, spearman


def main(config: str | None = None) -> Path:
    cfg = load_config(config or DEFAULT_CONFIG)
    timings, tables = {}, {}
    for mode in ("staged", "exhaustive"):
        start = time.perf_counter()
        tables[mode] = run_search(cfg, exhaustive=mode == "exhaustive")
        timings[mode] = tables[mode].meta.get("seconds", round(time.perf_counter() - start, 1))
    lines = [f"# Path search: staged vs exhaustive ({cfg.name}, in-process, 2-core CPU)", "",
             "| local | candidates | trained (staged) | staged best | staged reward | exhaustive best | "
             "exhaustive reward | staged / optimum | Spearman(pred, measured) | staged s | exhaustive s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for local in tables["staged"].locals:
        st, ex = tables["staged"], tables["exhaustive"]
        s_best, e_best = st.best(local), ex.best(local)
        trained = [r for r in ex.for_service(local) if r["reward"] is not None and r["kind"] != "local"]
        rho = spearman([r["pred_reward"] for r in trained], [r["reward"] for r in trained])
        # the staged choice scored by the exhaustive run's measurement of the same path
        s_score = ex.row(s_best["path_id"])["reward"]
        lines.append(f"| {local} | {len(st.for_service(local))} | {st.meta['summary'][local]['trained']} | "
                     f"`{s_best['path_id']}` | {s_best['reward']:.3f} | `{e_best['path_id']}` | "
                     f"{e_best['reward']:.3f} | {s_score / e_best['reward']:.1%} | {rho:.2f} | "
                     f"{timings['staged']} | {timings['exhaustive']} |")
        base = st.row(f"{local}:local")
        lines += ["", f"Best paths of `{local}` (test accuracy, average accuracy A^av, modelled and in-process "
                      "throughput ratio vs local-only):", "",
                  "| path | A_p test | A^av test | Th/s | × local (model) | × local (in-process) | reward |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in ex.for_service(local) if r["reward"] is not None),
                        key=lambda r: -r["reward"])[:8] + [base]:
            lines.append(f"| `{r['path_id']}` | {r['test_acc']:.4f} | {r['acc_avg_test']:.4f} | {r['th_total']:.0f} "
                         f"| {r['th_ratio']:.2f} | {r['measured_ratio']:.2f} | {r['reward']:.3f} |")
        edge = st.baselines(local)
        if edge:
            e = max(edge, key=lambda r: r["reward"])
            lines += ["", f"Edge-early baseline (mirrors {e['mirrored_params']:,} local parameters on "
                          f"`{e['host']}`): best `{e['path_id']}`: A test {e['test_acc']:.4f}, "
                          f"Th × {e['th_ratio']:.2f}, reward {e['reward']:.3f}."]
    out = Path(__file__).parent / "results" / "search.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
