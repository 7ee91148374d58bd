"""What lending costs a host: for each guest quota s of the host's batch B, the reward table's best path for the
local service (the model) and what serving gives both sides (measured). Writes bench/results/grant.md.

    .venv/bin/python bench/grant_bench.py [CONFIG] [--service digits] [--quotas 0 8 16 24] [--clients 16 8]
        [--batch 8] [--step-s 20] [--rounds 2] [--workdir DIR]

For each quota s the bench starts the config's local cluster (CPU caps as configured), deploys it with the
host's `guest_quota` set to s, pins the local service's best path under s at the model's split share
(th_host / th_total; quota 0: local-only) and runs two closed loops at once: `--clients` [0] clients of the
local service and [1] of the host's own, each request `--batch` held-out test samples. Reported per quota:
the model's best path, its modelled samples/s and the host's own modelled rate after guests, beside the
samples/s served to each side (median of `--rounds` steps) and the local service's accuracy.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import loadgen  # noqa: E402
from serving_bench import Pool, Service, call_json, fmt  # noqa: E402


def best_under(rows, svc: str, quota: int, cfg):
    """The servable row of `svc` with the highest reward once its host grants `quota` slots (re-scored)."""
    from coderay.policy import servable
    from coderay.rows import score

    out = []
    for r in rows:
        if r.local != svc or not servable(r):
            continue
        if r.kind == "coop":
            if quota == 0:
                continue
            r = score(
                dataclasses.replace(r, costs=dataclasses.replace(r.costs, guest_quota=quota)), cfg.reward, cfg.network
            )
        out.append(r)
    return max(out, key=lambda r: r.reward or 0.0)


async def measure(url: str, route: dict, local: Service, host: Service, clients: tuple[int, int], args) -> list[dict]:
    """`route` pinned for the local service, then warm-up and `--rounds` steps of both closed loops at once."""
    out = []
    async with loadgen.make_client(url, timeout_s=60) as c:
        await call_json(c, "PUT", f"/v1/services/{local.name}/route", route)
    async with loadgen.make_client(url, timeout_s=60) as a, loadgen.make_client(url, timeout_s=60) as b:
        await asyncio.gather(
            loadgen.closed_loop(a, local.send, clients[0], 5.0), loadgen.closed_loop(b, host.send, clients[1], 5.0)
        )
        for _ in range(args.rounds):
            local.tally, host.tally = type(local.tally)(), type(host.tally)()
            la, ha = await asyncio.gather(
                loadgen.closed_loop(a, local.send, clients[0], args.step_s),
                loadgen.closed_loop(b, host.send, clients[1], args.step_s),
            )
            out.append(
                {
                    "local": local.tally.samples / la.wall_s,
                    "host": host.tally.samples / ha.wall_s,
                    "accuracy": local.tally.accuracy,
                    "failed": la.failed + ha.failed,
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--service", default="digits")
    p.add_argument("--quotas", type=int, nargs="+", default=[0, 8, 16, 24])
    p.add_argument("--clients", type=int, nargs=2, default=[16, 8])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--step-s", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", default=None, help="override the config's workdir (where its table is)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grant.md")
    args = p.parse_args(argv)

    from ray import serve

    from coderay.cluster import LocalCluster
    from coderay.config import DEFAULT_CONFIG, load_config
    from coderay.data import get_task
    from coderay.search import load_table
    from deployments.app import deploy, free_port

    started, load0, t0 = time.strftime("%Y-%m-%d %H:%M %Z"), os.getloadavg()[0], time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    cfg = load_config(args.config or DEFAULT_CONFIG, **({"workdir": args.workdir} if args.workdir else {}))
    if not Path(cfg.workdir).is_absolute():
        cfg = cfg.model_copy(update={"workdir": str((ROOT / cfg.workdir).resolve())})
    table = load_table(cfg)
    if table is None:
        raise SystemExit(f"no reward table for {cfg.name!r}: run `coderay up` (or `coderay search`) first")
    coop = [r for r in table.rows if r.local == args.service and r.kind == "coop" and r.links_file]
    host_name = max(coop, key=lambda r: r.reward or 0.0).host
    assert host_name is not None  # a cooperative row names its host
    host_spec = cfg.service(host_name)
    batch = min(host_spec.batch_size, cfg.serving.max_batch_size)
    pools = {
        s: Service(s, Pool.from_task(get_task(cfg.service(s).task, data_root=cfg.data_root, seed=cfg.seed), args.batch))
        for s in (args.service, host_name)
    }
    results = []
    for quota in args.quotas:
        row = best_under(table.rows, args.service, quota, cfg)
        share = round(row.th_host / row.th_total, 1) if row.kind == "coop" and row.th_total else 0.0
        services = [s.model_copy(update={"guest_quota": quota}) if s.name == host_name else s for s in cfg.services]
        cfg_s = cfg.model_copy(update={"services": services})
        log(f"s = {quota}: best {row.path_id} (model {row.th_total:.0f} samples/s), pinned at share {share:g}")
        cluster = LocalCluster(cfg_s)
        try:
            url = deploy(cfg_s, table, port=free_port())
            route = {"path": row.path_id, "coop_fraction": share}
            clients = (args.clients[0], args.clients[1])
            got = asyncio.run(measure(url, route, pools[args.service], pools[host_name], clients, args))
        finally:
            serve.shutdown()
            cluster.shutdown()
        for g in got:
            log(f"  {args.service} {g['local']:.0f} samples/s, {host_name} own {g['host']:.0f} samples/s")
        results.append((quota, row, share, got))

    lines = [
        f"# What lending costs the host: `{host_name}`'s guest quota s of B = {batch}, `{args.service}` its guest",
        "",
        f"Measured {started} on this machine ({os.cpu_count()} CPUs, load average {load0:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after); a fresh local cluster and deploy per quota, CPU caps on (emulated edge "
        f"servers: emulated figures). Closed loop at once: {args.clients[0]} clients of `{args.service}` and "
        f"{args.clients[1]} of `{host_name}`'s own, {args.batch} held-out samples a request, {args.step_s:g} s a "
        f"step; median (min–max) of {args.rounds} steps.",
        "",
        f"| s | best path (model) | share pinned | model {args.service} samples/s | model ratio | "
        f"model {host_name} own after guests | served {args.service} samples/s | served {host_name} own samples/s "
        f"| {args.service} accuracy | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for quota, row, share, got in results:
        own_after = row.host_own_after
        lines.append(
            f"| {quota} | `{row.path_id}` | {share:g} | {row.th_total:.0f} | {row.th_ratio or 1.0:.2f} | "
            f"{'–' if own_after is None else f'{own_after:.0f}'} | {fmt([g['local'] for g in got])} | "
            f"{fmt([g['host'] for g in got])} | {fmt([g['accuracy'] for g in got], 4)} | "
            f"{sum(g['failed'] for g in got)} |"
        )
    local0 = next((statistics.median(g["local"] for g in got) for q, _, _, got in results if q == 0), None)
    if local0:
        lines += [
            "",
            "Served ÷ quota 0 (no guests): "
            + ", ".join(
                f"s = {q}: {args.service} {statistics.median(g['local'] for g in got) / local0:.2f}×"
                for q, _, _, got in results
            )
            + ".",
        ]
    lines += ["", f"Command: `.venv/bin/python bench/grant_bench.py {' '.join(sys.argv[1:])}`"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    log(f"wrote {args.out}")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
