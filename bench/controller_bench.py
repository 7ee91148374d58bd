"""Controller benchmark: one local service under open-loop load while its host goes busy, is lost, comes back.

Deploys a config that `coderay train` and `coderay search --in-process` have run (default: the demo) on a local
multi-node Ray cluster with the controller, then offers Poisson arrivals of `--batch`-sample requests at `--rate`
requests/s to the local service (the first service whose best cooperative path has trained links) through four
phases of `--phase-s` seconds each:

1. steady: only that load;
2. host busy: the host service's own clients flood it (`--flood` closed-loop clients of `--flood-batch` samples);
3. host calm (`--calm-s`): the flood is over;
4. host lost: the host's node removed (a crash: `remove_node(allow_graceful=False)`);
5. host back: a node offering the same resource joins again; Serve places the host's replicas there.

Every second it records answered samples/s, p99 latency and the controller's route (path, share), and from
them how long the controller took to react in each phase. `--repeats` runs the whole sequence again on a fresh
cluster and controller (each starts from the table, not from the last run's state). Writes `controller.md` (a
table per run, medians with min–max), `controller.json` and `controller.png` (the last run: samples/s, p99,
share over time, phases shaded) under bench/results, and prints requests sent vs answered.

    .venv/bin/python bench/controller_bench.py [CONFIG] [--rate 20] [--phase-s 30] [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this checkout's coderay, whatever the venv installed
    sys.path.insert(0, str(ROOT))
PHASES = ("steady", "host busy", "host calm", "host lost", "host back")


class Load:
    """Open-loop Poisson arrivals: each request is sent at its scheduled time, whatever earlier ones do."""

    def __init__(self, url: str, svc: str, shape: tuple, rate: float, batch: int, seed: int = 0):
        self.url, self.svc, self.rate, self.batch = url, svc, rate, batch
        self.x = np.random.default_rng(seed).random((batch, *shape)).astype("<f4")
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(64)
        self.local = threading.local()
        self.sent = 0

    def _client(self) -> httpx.Client:
        if not hasattr(self.local, "client"):
            self.local.client = httpx.Client(base_url=self.url, timeout=120)
        return self.local.client

    def _one(self, t_sched: float) -> None:
        start = time.time()
        try:
            r = self._client().post(
                f"/v1/services/{self.svc}/infer",
                content=self.x.tobytes(),
                headers={"Content-Type": "application/octet-stream", "X-Shape": ",".join(map(str, self.x.shape))},
            )
            body = r.json() if r.status_code == 200 else {}
            rec = {
                "t": start,
                "done": time.time(),
                "status": r.status_code,
                "path": body.get("path"),
                "fallback": body.get("fallback"),
                "samples": body.get("samples", 0),
            }
        except Exception as e:  # noqa: BLE001 — counted as not answered
            rec = {"t": start, "done": time.time(), "status": -1, "error": repr(e)[:200], "samples": 0}
        with self.lock:
            self.records.append(rec)

    def run(self) -> None:
        rng = np.random.default_rng(1)
        t = time.time()
        while not self.stop.is_set():
            t += rng.exponential(1 / self.rate)
            delay = t - time.time()
            if delay > 0 and self.stop.wait(delay):
                break
            self.sent += 1
            self.pool.submit(self._one, t)

    def finish(self, runner: threading.Thread) -> None:
        self.stop.set()
        runner.join()
        self.pool.shutdown(wait=True)


def flood(url: str, svc: str, shape: tuple, batch: int, stop: threading.Event) -> int:
    x = np.random.default_rng(2).random((batch, *shape)).astype("<f4")
    n = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            try:
                client.post(
                    f"/v1/services/{svc}/infer",
                    content=x.tobytes(),
                    headers={"Content-Type": "application/octet-stream", "X-Shape": ",".join(map(str, x.shape))},
                )
                n += 1
            except httpx.HTTPError:
                time.sleep(0.2)
    return n


def via_host(sample: dict, host: str) -> float:
    """The share of the local service's samples that goes through `host` on a recorded route."""
    from coderay.pathspec import PathSpec

    spec = PathSpec.parse(sample["path"])
    return sample["share"] if spec.kind == "coop" and spec.host == host else 0.0


def reactions(samples: list[dict], marks: dict, host: str) -> dict:
    """Seconds the controller took: the share through the flooded host down to half its steady value or less,
    back to at least half of it after the flood, 0 after the host is lost, above 0 once it rejoined (None: not
    within the phase)."""

    def first(after: float, until: float, cond) -> float | None:
        t = next((s["t"] for s in samples if after <= s["t"] < until and cond(via_host(s, host))), None)
        return None if t is None else round(t - after, 1)

    steady = [
        via_host(s, host)
        for s in samples
        if marks["steady"] + 0.5 * (marks["host busy"] - marks["steady"]) <= s["t"] < marks["host busy"]
    ]
    s0 = float(np.median(steady)) if steady else 0.0
    return {
        "steady_share": s0,
        "busy_drop_s": first(marks["host busy"], marks["host calm"], lambda v: v <= s0 / 2) if s0 else None,
        "busy_min_share": min(
            (via_host(s, host) for s in samples if marks["host busy"] <= s["t"] < marks["host calm"]), default=None
        ),
        "calm_back_s": first(marks["host calm"], marks["host lost"], lambda v: v >= s0 / 2) if s0 else None,
        "lost_zero_s": first(marks["host lost"], marks["host back"], lambda v: v == 0.0),
        "back_coop_s": first(marks["host back"], marks["end"], lambda v: v > 0.0),
    }


def one_run(args, cfg, table, svc: str, host: str, shape: tuple, host_shape: tuple) -> dict:
    """The five phases on a fresh cluster, deployment and controller (which starts from the table)."""
    import ray
    from ray import serve

    from coderay.cluster import LocalCluster
    from coderay.controller import get_controller, start_controller, stop_controller
    from deployments.app import deploy, free_port

    host_node = cfg.service(host).node
    cluster = LocalCluster(cfg)
    samples: list[dict] = []
    marks: dict[str, float] = {}
    try:
        url = deploy(cfg, table, port=free_port())
        start_controller(cfg, table.rows)
        print(
            f"serving at {url}; load: {svc} at {args.rate:g} requests/s of {args.batch}; host {host} on {host_node}",
            flush=True,
        )
        load = Load(url, svc, shape, args.rate, args.batch)
        stop_sampling = threading.Event()

        def sample():
            while not stop_sampling.is_set():
                t = time.time()
                try:
                    st = ray.get(get_controller().routes.remote(), timeout=2)
                    samples.append(
                        {"t": t, "share": st["routes"][svc]["coop_fraction"], "path": st["routes"][svc]["path"]}
                    )
                except Exception:  # noqa: BLE001 — restarting controller: a gap in the plot
                    pass
                stop_sampling.wait(max(0.0, 1.0 - (time.time() - t)))

        runner = threading.Thread(target=load.run, daemon=True)
        runner.start()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        marks["steady"] = time.time()
        time.sleep(args.phase_s)

        marks["host busy"] = time.time()
        stop_flood = threading.Event()
        with ThreadPoolExecutor(args.flood) as pool:
            floods = [
                pool.submit(flood, url, host, host_shape, args.flood_batch, stop_flood) for _ in range(args.flood)
            ]
            time.sleep(args.phase_s)
            stop_flood.set()
            flooded = sum(f.result() for f in floods)
        print(f"host busy: {flooded} flooding requests to {host}", flush=True)
        marks["host calm"] = time.time()
        time.sleep(args.calm_s)

        marks["host lost"] = time.time()
        ray_node = cluster.nodes[host_node]
        cluster.remove(host_node)
        time.sleep(max(0.0, args.phase_s - (time.time() - marks["host lost"])))

        marks["host back"] = time.time()
        spec = cfg.node(host_node)
        assert cluster.cluster is not None  # LocalCluster() raises unless its cluster started
        back = cluster.cluster.add_node(
            num_cpus=spec.cpus, resources={host_node: 1}, object_store_memory=spec.object_store_mb * 2**20
        )
        cluster.nodes[host_node] = back
        del ray_node
        time.sleep(args.phase_s * 1.5)
        marks["end"] = time.time()
        load.finish(runner)
        stop_sampling.set()
        sampler.join()
        status = ray.get(get_controller().status.remote(decisions=40), timeout=30)
    finally:
        try:
            stop_controller()
            serve.shutdown()
        finally:
            cluster.shutdown()

    recs = sorted(load.records, key=lambda r: r["t"])
    answered = sum(1 for r in recs if r["status"] == 200)
    t0 = marks["steady"]
    per_phase = {}
    bounds = [marks[p] for p in PHASES] + [marks["end"]]
    for i, ph in enumerate(PHASES):
        rs = [r for r in recs if bounds[i] <= r["t"] < bounds[i + 1]]
        lat = sorted((r["done"] - r["t"]) * 1e3 for r in rs if r["status"] == 200)
        per_phase[ph] = {
            "requests": len(rs),
            "answered": sum(r["status"] == 200 for r in rs),
            "fallbacks": sum(bool(r.get("fallback")) for r in rs),
            "coop_answers": sum(1 for r in rs if r.get("path") and r["path"] != f"{svc}:local"),
            "p50_ms": lat[len(lat) // 2] if lat else None,
            "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        }
    react = reactions(samples, marks, host)
    left = next(
        (
            d["t"]
            for d in status["switches"]
            if d["service"] == svc
            and d["t"] >= marks["host lost"]
            and via_host({"path": d["path"], "share": d["share"]}, host) == 0.0
        ),
        None,
    )
    react["lost_zero_by_log_s"] = None if left is None else round(left - marks["host lost"], 2)  # exact
    return {
        "sent": load.sent,
        "recorded": len(recs),
        "answered": answered,
        "flooding_requests": flooded,
        "t0": t0,
        "phases": per_phase,
        "reactions": react,
        "switches": status["switches"],
        "hosts_at_end": status.get("hosts"),
        "shares": [{"t": s["t"] - t0, "share": s["share"], "path": s["path"]} for s in samples],
        "marks": {k: v - t0 for k, v in marks.items()},
        "_recs": recs,
        "_samples": samples,
        "_marks": marks,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=ROOT / "configs" / "demo.yaml", type=Path)
    p.add_argument("--rate", type=float, default=20.0, help="requests/s offered to the local service")
    p.add_argument("--batch", type=int, default=4, help="samples per request")
    p.add_argument("--phase-s", type=float, default=30.0, help="seconds per phase")
    p.add_argument("--calm-s", type=float, default=60.0, help="seconds between the flood's end and the host's loss")
    p.add_argument("--flood", type=int, default=6, help="closed-loop clients flooding the host in phase 2")
    p.add_argument("--flood-batch", type=int, default=64, help="samples per flooding request")
    p.add_argument("--interval", type=float, default=1.0, help="controller interval (s)")
    p.add_argument("--alpha", type=float, default=None, help="reward α for the controller (default: the config's)")
    p.add_argument("--cpu-caps", action="store_true", help="real CPU caps per node even if the config has them off")
    p.add_argument("--repeats", type=int, default=1, help="independent runs (fresh cluster and controller each)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "controller")
    args = p.parse_args(argv)

    from coderay.config import load_config
    from coderay.data import get_task
    from deployments.app import served_table

    cfg = load_config(args.config)
    table = served_table(cfg)
    coop = [r for r in table.rows if r.kind == "coop" and r.links_file]
    if not coop:
        raise SystemExit("the reward table has no trained cooperative path: run `coderay search` first")
    best = max(coop, key=lambda r: r.reward or 0.0)
    svc, host = best.local, best.host
    assert host is not None  # a cooperative row names its host
    cfg = cfg.model_copy(
        update={
            "controller": cfg.controller.model_copy(
                update={"interval_s": args.interval, "min_dwell_s": 3 * args.interval}
            ),
            "serving": cfg.serving.model_copy(update={"fallback_cooldown_s": 5.0}),
            "reward": cfg.reward.model_copy(update={"alpha": cfg.reward.alpha if args.alpha is None else args.alpha}),
            "emulation": cfg.emulation.model_copy(update={"cpu_caps": cfg.emulation.cpu_caps or args.cpu_caps}),
        }
    )
    shape = get_task(cfg.service(svc).task, data_root=cfg.data_root, seed=cfg.seed).input_shape
    host_shape = get_task(cfg.service(host).task, data_root=cfg.data_root, seed=cfg.seed).input_shape

    runs = []
    for k in range(args.repeats):
        print(f"run {k + 1}/{args.repeats}", flush=True)
        runs.append(one_run(args, cfg, table, svc, host, shape, host_shape))
        r = runs[-1]
        print(
            f"run {k + 1}: requests sent {r['sent']}, answered {r['answered']}; reactions {r['reactions']}", flush=True
        )
        for ph, v in r["phases"].items():
            print(f"  {ph:<10} {v}")
    summary = {
        "config": str(args.config),
        "service": svc,
        "host": host,
        "rate": args.rate,
        "batch": args.batch,
        "phase_s": args.phase_s,
        "calm_s": args.calm_s,
        "flood": [args.flood, args.flood_batch],
        "host_latency_ms": cfg.controller.host_latency_ms,
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    args.out.with_suffix(".md").write_text(report(summary))
    last = runs[-1]
    plot(last["_recs"], last["_samples"], last["_marks"], args.out.with_suffix(".png"), svc, host)
    print(report(summary))
    print(f"wrote {args.out.with_suffix('.png')}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 0 if all(r["answered"] == r["sent"] for r in runs) else 1


def report(summary: dict) -> str:
    """The runs as a markdown table, with the median (min–max) of each reaction time."""
    keys = [
        ("busy_drop_s", "flood → share through the host halved (s)"),
        ("calm_back_s", "flood over → back (s)"),
        ("lost_zero_s", "host lost → share 0 (s)"),
        ("lost_zero_by_log_s", "… by the switch log (s)"),
        ("back_coop_s", "host back → cooperating (s)"),
    ]
    runs = summary["runs"]
    lines = [
        f"# Controller benchmark: {summary['config']}",
        "",
        f"{summary['service']} under open-loop Poisson load ({summary['rate']:g} requests/s of "
        f"{summary['batch']} samples); host {summary['host']} flooded by {summary['flood'][0]} closed-loop "
        f"clients of {summary['flood'][1]} samples for {summary['phase_s']:g} s, then calm "
        f"{summary['calm_s']:g} s, lost {summary['phase_s']:g} s, back. host_latency_ms "
        f"{summary['host_latency_ms']:g}. {len(runs)} run(s), each on a fresh cluster and controller.",
        "",
        "| run | sent | answered | steady share | " + " | ".join(k[1] for k in keys) + " | busy p99 ms | lost p99 ms |",
        "|---" * (6 + len(keys)) + "|",
    ]
    fmt = lambda v: "not within the phase" if v is None else f"{v:g}"
    for i, r in enumerate(runs, 1):
        x = r["reactions"]
        lines.append(
            f"| {i} | {r['sent']} | {r['answered']} | {x['steady_share']:g} | "
            + " | ".join(fmt(x[k]) if k in x else "–" for k, _ in keys)
            + f" | {r['phases']['host busy']['p99_ms']:.0f} | {r['phases']['host lost']['p99_ms']:.0f} |"
        )
    med = []
    for k, _ in keys:
        vals = [r["reactions"][k] for r in runs if r["reactions"].get(k) is not None]
        med.append(f"{np.median(vals):g} ({min(vals):g}–{max(vals):g}), {len(vals)}/{len(runs)}" if vals else "–")
    lines.append(
        f"| median (min–max), runs within | {sum(r['sent'] for r in runs)} | "
        f"{sum(r['answered'] for r in runs)} | | " + " | ".join(med) + " | | |"
    )
    return "\n".join(lines) + "\n"


def plot(recs: list[dict], samples: list[dict], marks: dict, path: Path, svc: str, host: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0, end = marks["steady"], marks["end"]
    secs = np.arange(0, int(end - t0) + 1)
    ok = [r for r in recs if r["status"] == 200]
    rate = np.zeros(len(secs))
    p99 = np.full(len(secs), np.nan)
    for r in ok:
        i = int(r["done"] - t0)
        if 0 <= i < len(secs):
            rate[i] += r["samples"]
    for i in range(0, len(secs), 2):
        lat = sorted((r["done"] - r["t"]) * 1e3 for r in ok if i <= r["t"] - t0 < i + 2)
        if lat:
            p99[i : i + 2] = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(secs, rate, lw=1)
    axes[0].set_ylabel(f"{svc}: samples/s answered")
    axes[1].plot(secs, p99, lw=1, color="tab:red")
    axes[1].set_ylabel("p99 latency (ms, 2 s windows)")
    axes[1].set_yscale("log")
    ts = [s["t"] - t0 for s in samples]
    from coderay.pathspec import PathSpec

    via = [(lambda p: p.host if p.kind == "coop" else None)(PathSpec.parse(s["path"])) for s in samples]
    axes[2].step(ts, [s["share"] for s in samples], where="post", color="lightgrey", lw=1)
    for k, h in enumerate(sorted({v for v in via if v}, key=lambda v: v != host)):
        axes[2].step(
            ts,
            [s["share"] if v == h else np.nan for s, v in zip(samples, via)],
            where="post",
            lw=2,
            color=f"C{k + 2}",
            label=f"through {h}" + (" (the host flooded, then lost)" if h == host else ""),
        )
    axes[2].set_ylabel("cooperative share")
    axes[2].legend(loc="lower left", fontsize=8)
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_xlabel("seconds")
    bounds = [marks[p] - t0 for p in PHASES] + [end - t0]
    for ax in axes:
        for i in range(len(PHASES)):
            ax.axvspan(bounds[i], bounds[i + 1], alpha=0.08 * (i % 2 + 1), color="grey")
        ax.grid(alpha=0.3)
    for i, ph in enumerate(PHASES):
        axes[0].text(bounds[i] + 0.5, axes[0].get_ylim()[1] * 0.92, ph, fontsize=8)
    fig.suptitle("coderay controller: steady → host busy → host calm → host lost → host back (open-loop load)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
