"""Prove node CPU caps on Ray: actors that join a node's group in __init__ get the node's share, together.

    python bench/capacity_check.py [--share 0.3] [--burn-s 2] [--json]

Starts a local Ray cluster (2 logical CPUs), one actor on node "edge-small" that joins it with `--share` CPUs
and spins for `--burn-s` s: process CPU time / wall should be the share (every thread of the multi-threaded
Ray worker is moved; checked). Then two actors of the same node spin together: their sum should be the share.
Prints a table (or JSON) with the mechanism in force; exits 1 if a figure is off by more than 20%.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from coderay import capacity  # noqa: E402

log = logging.getLogger("capacity_check")


@ray.remote(num_cpus=0)
class Burner:
    def __init__(self, node: str, share: float):
        self.node = node
        self.joined = capacity.join(node, share)

    def info(self) -> dict:
        inside, total = capacity.threads_in_group(self.node)
        return {"pid": os.getpid(), "join": self.joined.as_dict(), "threads_inside": inside, "threads": total}

    def burn(self, start: float, seconds: float) -> dict:
        while time.time() < start:
            time.sleep(0.002)
        t0, c0 = time.time(), time.process_time()
        while time.time() < start + seconds:
            pass
        wall, cpu = time.time() - t0, time.process_time() - c0
        inside, total = capacity.threads_in_group(self.node)  # threads born after join inherit the group
        return {"cpu": cpu, "wall": wall, "threads_inside": inside, "threads": total}


def run(share: float, burn_s: float) -> dict:
    session = capacity.new_session()  # before Ray starts: its workers inherit the session
    t_start = time.time()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        node = "edge-small"
        # mypy keeps a decorated class's type: ray.remote made Burner an ActorClass
        one = Burner.remote(node, share)  # type: ignore[attr-defined]
        info = ray.get(one.info.remote(), timeout=60)
        r1 = ray.get(one.burn.remote(time.time() + 0.3, burn_s), timeout=60)
        two = Burner.remote(node, share)  # type: ignore[attr-defined]
        ray.get(two.info.remote(), timeout=60)
        start = time.time() + 0.3
        pair = ray.get([a.burn.remote(start, burn_s) for a in (one, two)], timeout=60)
        used = capacity.usage(node)
        result = {
            "mechanism": info["join"]["mechanism"],
            "session": session,
            "share": share,
            "one_actor": {
                "got": r1["cpu"] / r1["wall"],
                "threads_inside": r1["threads_inside"],
                "threads": r1["threads"],
                "threads_at_join": info["join"]["threads_total"],
            },
            "two_actors": {
                "got": sum(r["cpu"] / r["wall"] for r in pair),
                "each": [r["cpu"] / r["wall"] for r in pair],
                "threads_inside": [r["threads_inside"] for r in pair],
                "threads": [r["threads"] for r in pair],
            },
            "usage": used.as_dict(),
        }
    finally:
        ray.shutdown()
        removed = capacity.cleanup(session, evict=True)
    result["removed_groups"] = len(removed)
    det = capacity.detect()
    result["stale"] = (det.root / capacity.PARENT / session).exists() if det.available else False
    result["elapsed_s"] = time.time() - t_start
    return result


def ok(result: dict) -> bool:
    share = result["share"]
    if not result["mechanism"].startswith("cgroup"):
        return True  # uncapped, and reported as such
    one, two = result["one_actor"], result["two_actors"]
    return (
        abs(one["got"] - share) <= 0.2 * share
        and abs(two["got"] - share) <= 0.2 * share
        and one["threads_inside"] == one["threads"]
        and two["threads_inside"] == two["threads"]
        and not result["stale"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.3)
    parser.add_argument("--burn-s", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = run(args.share, args.burn_s)
    if args.json:
        print(json.dumps(result))
    else:
        one, two = result["one_actor"], result["two_actors"]
        print(f"mechanism: {result['mechanism']}")
        print(f"{'case':<28}{'share asked':>12}{'got':>8}{'threads in group':>18}")
        print(
            f"{'1 Ray actor':<28}{args.share:>12.3f}{one['got']:>8.3f}"
            f"{one['threads_inside']:>9}/{one['threads']} (at join {one['threads_at_join']})"
        )
        print(
            f"{'2 Ray actors, same node':<28}{args.share:>12.3f}{two['got']:>8.3f}"
            f"{'  ' + ', '.join(f'{i}/{t}' for i, t in zip(two['threads_inside'], two['threads'])):>18}"
        )
        u = result["usage"]
        print(
            f"node usage: {u['cpu_s']} CPU s, throttled {u['nr_throttled']}/{u['nr_periods']} periods; "
            f"groups removed {result['removed_groups']}, stale left: {result['stale']}; "
            f"{result['elapsed_s']:.1f} s"
        )
    return 0 if ok(result) else 1


if __name__ == "__main__":
    sys.exit(main())
