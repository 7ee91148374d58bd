"""Wall time of the Ray Tune path search on 1, 2 and 3 Ray nodes (same config, same trials); writes
bench/results/tune.md.

    python bench/tune_bench.py [CONFIG]

The config's edge servers are packed onto fewer Ray nodes (one CPU each), so every layout runs exactly the
same trials, pinned to the same edge server's resource; only how many run at once changes. Each layout
starts its search over (no resume).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from coderay.candidate import SearchContext
from coderay.cluster import LocalCluster
from coderay.config import DEFAULT_CONFIG, load_config
from tuning.search import run_tune_search


def layouts(names: list[str]) -> dict[int, list[tuple[float, list[str]]]]:
    """1 node: every edge server on one; 2: the last server (the demo's biggest host) alone; n: one each."""
    out = {1: [(1, names)]}
    if len(names) >= 2:
        out[2] = [(1, names[:-1]), (1, names[-1:])]
    if len(names) >= 3:
        out[len(names)] = [(1, [n]) for n in names]
    return out


def main(config: str | None = None) -> Path:
    cfg = load_config(config or DEFAULT_CONFIG)
    SearchContext.load(cfg)  # train (or load) the services first: not part of the timing
    rows = []
    for n, layout in layouts([node.name for node in cfg.nodes]).items():
        cluster = LocalCluster(cfg, layout=layout)
        try:
            start = time.perf_counter()
            table = run_tune_search(cfg, resume=False)
            wall = time.perf_counter() - start
        finally:
            cluster.shutdown()
        tune = table.meta["tune"]
        for local in table.locals:
            best = table.best(local)
            rows.append(
                f"| {n} | {' + '.join('/'.join(names) for _, names in layout)} | "
                f"{tune['trials']['predict']} | {tune['trials']['train']} | {tune['stage_seconds']['predict']} | "
                f"{tune['stage_seconds']['train']} | {wall:.0f} | `{best['path_id']}` | {best['test_acc']:.4f} |"
            )
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "tune.md"
    out.write_text(
        "\n".join(
            [
                f"# Path search on Ray Tune: wall time by number of Ray nodes ({cfg.name}, 2-core CPU, 1 CPU per node)",
                "",
                "| Ray nodes | edge servers per node | stage-1 trials | stage-2 trials | stage 1 s | stage 2 s | "
                "total s | best path | its test acc |",
                "|---|---|---|---|---|---|---|---|---|",
                *rows,
            ]
        )
        + "\n"
    )
    print(out.read_text())
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
