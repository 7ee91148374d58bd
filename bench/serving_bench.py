"""Serving benchmark: latency and throughput over HTTP of the local-only path and of the best cooperative path.

Deploys a config (default: the demo, whose services `coderay train` has trained) on a local multi-node Ray
cluster, loads (or runs) its in-process search, and for each path and client concurrency sends requests of
`--batch` held-out samples as raw float32 (`application/octet-stream`). Writes a Markdown report.

    .venv/bin/python bench/serving_bench.py [CONFIG] [--requests 120] [--batch 8] [--concurrency 1 8]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def held_out_pixels(task) -> np.ndarray:
    """The test split as raw [0, 1] float32 pixels (normalisation inverted)."""
    x = torch.stack([task.test[i][0] for i in range(len(task.test))])
    mean, std = torch.tensor(task.mean).view(-1, 1, 1), torch.tensor(task.std).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1).numpy().astype("<f4")


def run_level(url: str, svc: str, pixels: np.ndarray, *, batch: int, requests: int, concurrency: int) -> dict:
    lat, server, delays, failures, paths = [], [], [], 0, set()
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker(seed: int) -> None:
        nonlocal failures
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                x = pixels[rng.integers(0, len(pixels), batch)]
                start = time.perf_counter()
                r = client.post(f"/v1/services/{svc}/infer", content=x.tobytes(),
                                headers={"Content-Type": "application/octet-stream",
                                         "X-Shape": ",".join(map(str, x.shape))})
                elapsed = (time.perf_counter() - start) * 1e3
                with lock:
                    if r.status_code != 200 or r.json()["fallback"]:
                        failures += 1
                        continue
                    body = r.json()
                    lat.append(elapsed)
                    server.append(body["latency_ms"])
                    delays.append(body["network"]["delay_ms"])
                    paths.add(body["path"])

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {"concurrency": concurrency, "requests": len(lat), "failures": failures, "paths": sorted(paths),
            "p50_ms": statistics.median(lat), "p99_ms": q[98], "server_p50_ms": statistics.median(server),
            "emulated_delay_ms": statistics.median(delays), "req_per_s": len(lat) / wall,
            "samples_per_s": len(lat) * batch / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=ROOT / "configs" / "demo.yaml", type=Path)
    p.add_argument("--requests", type=int, default=120, help="requests per path and concurrency level")
    p.add_argument("--batch", type=int, default=8, help="samples per request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.md")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    from ray import serve

    from coderay.cluster import LocalCluster
    from coderay.config import load_config
    from coderay.data import get_task
    from coderay.search import run_search
    from deployments.app import deploy, free_port

    cfg = load_config(args.config)
    if not Path(cfg.workdir).is_absolute():
        cfg = cfg.model_copy(update={"workdir": str((ROOT / cfg.workdir).resolve())})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    table = run_search(cfg, progress=False)
    search_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cluster = LocalCluster(cfg)
    cluster_s = time.perf_counter() - t0
    results, deploy_s = {}, None
    try:
        t0 = time.perf_counter()
        url = deploy(cfg, table, port=free_port())
        deploy_s = time.perf_counter() - t0
        for local in table.locals:
            rows = table.for_service(local)
            coop = [r for r in rows if r["kind"] == "coop" and r.get("links_file") and r.get("reward") is not None]
            paths = [f"{local}:local"] + ([max(coop, key=lambda r: r["reward"])["path_id"]] if coop else [])
            svc = cfg.service(local)
            pixels = held_out_pixels(get_task(svc.task, data_root=cfg.data_root, seed=cfg.seed))
            with httpx.Client(base_url=url, timeout=60) as client:
                for path_id in paths:
                    assert client.put(f"/v1/services/{local}/route", json={"path": path_id}).status_code == 200
                    run_level(url, local, pixels, batch=args.batch, requests=16, concurrency=2)   # warm-up
                    for conc in args.concurrency:
                        res = run_level(url, local, pixels, batch=args.batch, requests=args.requests,
                                        concurrency=conc)
                        results[(local, path_id, conc)] = res
                        print(f"{path_id:<28} c={conc:<3} p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  "
                              f"{res['samples_per_s']:7.1f} samples/s  failures {res['failures']}", flush=True)
        load_during = os.getloadavg()[0]
    finally:
        serve.shutdown()
        cluster.shutdown()

    lines = [
        "# Serving benchmark (HTTP, Ray Serve)", "",
        f"Config `{args.config.name}` ({', '.join(f'{n.name}: {n.cpus:g} CPU' for n in cfg.nodes)}; head node 1 CPU "
        f"for the proxy and ingress), on {platform.machine()} with {os.cpu_count()} cores, "
        f"Python {platform.python_version()}. Written by `bench/serving_bench.py` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}.", "",
        f"- Requests: {args.batch} held-out samples each (the local task's test split, raw [0, 1] pixels as "
        f"little-endian float32, `application/octet-stream`), {args.requests} per row, after 16 warm-up requests.",
        f"- Network between nodes {'emulated' if cfg.serving.emulate_network else 'not emulated'}: "
        f"{cfg.network.bandwidth_mbps:g} Mbit/s, RTT {cfg.network.rtt_ms:g} ms by default"
        + "".join(f"; {'–'.join(link.between)} {link.bandwidth_mbps:g} Mbit/s, RTT {link.rtt_ms:g} ms"
                  for link in cfg.network.links)
        + " (per cross-node hop: RTT/2 + bytes / bandwidth, slept in the receiving replica).",
        f"- Dynamic batching on block groups: batch = the service's batch_size samples, wait "
        f"{cfg.serving.batch_wait_timeout_s * 1e3:g} ms; the host admits at most guest_quota guest samples per batch.",
        "- Node `speed` is not emulated in serving (every replica computes at this machine's speed); the modelled "
        "throughput in the reward table divides profiles by it.",
        f"- Search {'loaded from cache' if table.meta.get('from_cache') else f'ran in {search_s:.0f} s'}; "
        f"local cluster started in {cluster_s:.0f} s; deploy took {deploy_s:.0f} s.",
        f"- Machine load (1-min average) {load_before:.1f} before the run and {load_during:.1f} at its end: anything "
        "above the benchmark's own processes shares the 2 cores with it.", "",
        "| path | clients | requests | p50 ms | p99 ms | server p50 ms | emulated net ms | req/s | samples/s "
        "| failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (local, path_id, conc), r in results.items():
        lines.append(f"| `{path_id}` | {conc} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['server_p50_ms']:.1f} | {r['emulated_delay_ms']:.1f} | {r['req_per_s']:.1f} | "
                     f"{r['samples_per_s']:.0f} | {r['failures']} |")
    lines += ["", "Reward-table figures of the same paths (in-process, one thread; modelled with emulated node "
              "speeds):",
              "", "| path | test acc | modelled Th/s | ×local (modelled) |",
              "|---|---:|---:|---:|"]
    for path_id in dict.fromkeys(k[1] for k in results):
        r = table.row(path_id)
        lines.append(f"| `{path_id}` | {r['test_acc']:.4f} | {r['th_total']:.0f} | {r['th_ratio']:.2f} |")
    lines += ["", "Latency is measured at the client (HTTP round trip); server p50 is the ingress's time running the "
              "path (all hops, batching waits and emulated delays included, decoding excluded). On 2 cores the "
              "proxy, ingress, every replica and the clients share the CPUs, so the cooperative path's extra hops "
              "cost latency here that separate machines would overlap."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
