"""The controller's route against pinned shares, at saturation: does the controller's share serve as much as the
best one pinned by hand? Writes bench/results/shares.md.

    .venv/bin/python bench/share_bench.py --url http://127.0.0.1:8000 [CONFIG] [--service digits]
        [--shares 1.0 0.9 0.8] [--clients 16] [--batch 8] [--step-s 20] [--settle-s 30] [--rounds 2]

Against a running `coderay up` (the controller on). Each round measures, interleaved: the best cooperative path
of the reward table pinned at each share, local-only pinned, and the controller's own route (the pin released,
`--settle-s` seconds of the same load first, so it can move and check its move). Closed loop: `--clients`
clients of `--batch` held-out test samples each; samples/s answered and their accuracy; a fallback answer
counts as a failure. Pins are released at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import loadgen  # noqa: E402
from serving_bench import Pool, Service, call_json, fmt  # noqa: E402

CONTROLLER = "controller"


async def route_of(client: loadgen.HttpClient, svc: str) -> tuple[str, float]:
    got = (await call_json(client, "GET", "/v1/controller"))["routes"][svc]
    return got["path"], float(got["coop_fraction"])


async def measure(url: str, svc: Service, arms: list[tuple[str, str | None, float]], args, log) -> dict:
    """{arm: [{"samples_per_s", "accuracy", "failed", "route"} per round]}."""
    out: dict[str, list[dict]] = {name: [] for name, _, _ in arms}
    async with loadgen.make_client(url, timeout_s=60) as control, loadgen.make_client(url, timeout_s=60) as client:
        try:
            for k in range(args.rounds):
                for name, path, share in arms:
                    if path is None:
                        await control.request("DELETE", f"/v1/services/{svc.name}/route")
                        await loadgen.closed_loop(client, svc.send, args.clients, args.settle_s)
                    else:
                        await call_json(
                            control, "PUT", f"/v1/services/{svc.name}/route", {"path": path, "coop_fraction": share}
                        )
                        await loadgen.closed_loop(client, svc.send, args.clients, args.warmup_s)
                    svc.tally = type(svc.tally)()
                    route = await route_of(control, svc.name) if path is None else (path, share)
                    step = await loadgen.closed_loop(client, svc.send, args.clients, args.step_s)
                    after = await route_of(control, svc.name) if path is None else route
                    rate = svc.tally.samples / step.wall_s
                    out[name].append(
                        {
                            "samples_per_s": rate,
                            "accuracy": svc.tally.accuracy,
                            "failed": step.failed,
                            "route": route if route == after else (route, after),
                        }
                    )
                    log(f"round {k + 1} {name}: {rate:.0f} samples/s, route {route}, failed {step.failed}")
        finally:
            await control.request("DELETE", f"/v1/services/{svc.name}/route")
    return out


def report(args, arms, got: dict, load: tuple[float, float], started: str) -> str:
    best = max(
        (n for n, p, _ in arms if p is not None), key=lambda n: statistics.median(r["samples_per_s"] for r in got[n])
    )
    best_rate = [r["samples_per_s"] for r in got[best]]
    lines = [
        f"# The controller's route against pinned shares: `{args.service}`, {args.clients} clients × "
        f"{args.batch} held-out samples",
        "",
        f"Measured {started} against a running `coderay up` at {args.url} (load average {load[0]:.1f} before, "
        f"{load[1]:.1f} after). Closed loop, {args.step_s:g} s a step, {args.rounds} interleaved rounds; the "
        f"controller's step follows {args.settle_s:g} s of the same load with the pin released. CPU caps emulate "
        "the edge servers (emulated figures). Figures: median (min–max) of the rounds.",
        "",
        "| route | samples/s | ÷ best pinned (same round) | accuracy | failed | route in force (start, end of step) |",
        "|---|---|---|---|---|---|",
    ]
    for name, _, _ in arms:
        rates = [r["samples_per_s"] for r in got[name]]
        ratio = [a / b for a, b in zip(rates, best_rate)]
        routes = "; ".join(sorted({str(r["route"]) for r in got[name]}))
        lines.append(
            f"| {name} | {fmt(rates)} | {fmt(ratio, 3)} | {fmt([r['accuracy'] for r in got[name]], 4)} | "
            f"{sum(r['failed'] for r in got[name])} | {routes} |"
        )
    lines += [
        "",
        f"Best pinned: {best}.",
        "",
        f"Command: `.venv/bin/python bench/share_bench.py {' '.join(sys.argv[1:])}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--url", required=True)
    p.add_argument("--service", default="digits")
    p.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.9, 0.8])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--step-s", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--settle-s", type=float, default=30.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shares.md")
    args = p.parse_args(argv)
    import os

    import httpx

    from coderay.config import DEFAULT_CONFIG, load_config
    from coderay.data import get_task

    started, load0, t0 = time.strftime("%Y-%m-%d %H:%M %Z"), os.getloadavg()[0], time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    cfg = load_config(args.config or DEFAULT_CONFIG)
    url = args.url.rstrip("/")
    paths = httpx.get(f"{url}/v1/services/{args.service}/paths", timeout=30).json()["paths"]
    coop = max((r for r in paths if r["kind"] == "coop" and r.get("links_file")), key=lambda r: r["reward"])
    arms: list[tuple[str, str | None, float]] = [
        (f"{coop['path_id']} at {s:g}", coop["path_id"], s) for s in args.shares
    ]
    arms += [("local-only", f"{args.service}:local", 0.0), (CONTROLLER, None, 0.0)]
    task = get_task(cfg.service(args.service).task, data_root=cfg.data_root, seed=cfg.seed)
    svc = Service(args.service, Pool.from_task(task, args.batch, seed=cfg.seed))
    got = asyncio.run(measure(url, svc, arms, args, log))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(args, arms, got, (load0, os.getloadavg()[0]), started))
    log(f"wrote {args.out}")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
