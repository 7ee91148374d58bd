"""Time to serving of `coderay up`, fresh (nothing cached) and cached (the same workdir again), per phase; and
time to stop on SIGTERM. Writes bench/results/startup.md, .json and .png.

    .venv/bin/python bench/startup_bench.py [CONFIG] [--runs 3] [--workdir DIR]

Each round runs `coderay up` as a user does: once on an empty workdir, then once more on it (checkpoints, profiles
and the reward table cached). The phases are read off the CLI's own progress lines: the local cluster until
"[1/3]", training (or loading) until "[2/3]", the search until "[3/3]", deploying until "serving until Ctrl-C"
(printed once /healthz answers). A fresh `up` answers local-only while it searches ("answering": every service
deployed with its own model), serves its first table at "serving until" and trains the explored candidates
while serving: the run also waits for "search finished while serving" (the whole table served). Then
SIGTERM, and the seconds until the process has exited. Every run's best path and accuracies are kept, to check
that the runs agree. Nothing else should run on the machine meanwhile; the load average is recorded before and
after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from serving_bench import fmt  # noqa: E402

PHASES = ("cluster", "train", "search", "deploy")
MARKS = {
    "meanwhile: each service local-only": "answering",
    "[1/3]": "train",
    "[2/3]": "search",
    "[3/3]": "deploy",
    "serving until Ctrl-C": "serving",
    "search finished while serving": "whole",
}


def one_up(config: Path, workdir: Path, timeout_s: float) -> dict:
    """One `coderay up` to serving and back: seconds per phase, stop seconds, and what it found."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "coderay.cli", "up", str(config), "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    seen: dict[str, float] = {}
    lines: list[str] = []
    serving, whole = threading.Event(), threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            for mark, name in MARKS.items():
                if mark in line and name not in seen:
                    seen[name] = time.perf_counter() - began
                    if name == "serving":
                        serving.set()
                    if name == "whole":
                        whole.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not serving.wait(timeout_s):
            raise RuntimeError(f"not serving after {timeout_s:.0f} s; last lines:\n" + "\n".join(lines[-20:]))
        if any("to train while serving" in line for line in lines) and not whole.wait(timeout_s):
            raise RuntimeError(f"whole table not served after {timeout_s:.0f} s:\n" + "\n".join(lines[-20:]))
    finally:
        stop_began = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        stop_s = time.perf_counter() - stop_began
        reader.join(timeout=10)
    marks = [0.0] + [seen[m] for m in ("train", "search", "deploy", "serving")]
    text = "\n".join(lines)
    best = re.findall(r"^best path: (\S+)", text, re.M)
    return {
        "phases": {p: round(b - a, 1) for p, a, b in zip(PHASES, marks, marks[1:])},
        "serving_s": round(seen["serving"], 1),
        "answering_s": round(seen.get("answering", seen["serving"]), 1),
        "whole_s": round(seen.get("whole", seen["serving"]), 1),
        "first_path": best[0] if best else None,
        "stop_s": round(stop_s, 1),
        "rc": rc,
        "best_path": best[-1] if best else None,
        "test_acc": dict(re.findall(r"^\s+(\w+): \S+ on \S+ at \S+, test acc ([0-9.]+)", text, re.M)),
        "cached": "(cached)" in text,
    }


REFERENCE = """
import time, torch
torch.set_num_threads(1); torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
    torch.nn.Linear(64 * 49, 10))
opt = torch.optim.SGD(net.parameters(), lr=0.01)
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
start = time.perf_counter()
for _ in range(60):
    opt.zero_grad(); torch.nn.functional.cross_entropy(net(x), y).backward(); opt.step()
print(time.perf_counter() - start)
"""


def reference_s() -> float:
    """Seconds of a fixed one-thread torch workload (60 training steps of a small CNN): this VM's speed drifts by
    a third within a day, so each round states it beside its times."""
    out = subprocess.run([sys.executable, "-c", REFERENCE], capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip()), 2)


def report(
    runs: dict[str, list[dict]], args, loads: list[tuple[float, float]], started: str, references: list[float]
) -> str:
    lines = [
        "# `coderay up`: seconds to serving, fresh and cached",
        "",
        f"Measured {started} on this machine ({os.cpu_count()} cores), {len(runs['fresh'])} rounds, config "
        f"`{args.config}`; load average before/after each round: "
        + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in loads)
        + f"; the machine's speed, a fixed one-thread torch workload before each round: {fmt(references, 2)} s "
        "(lower is faster). Fresh: an empty workdir (train, search, deploy); cached: the same workdir again. "
        "Nodes' CPU caps are emulated (cgroup quotas). Figures: median (min–max) of the rounds.",
        "",
        "| run | first answers (local-only while searching) | to serving | "
        + " | ".join(PHASES)
        + " | path served first | whole table served | best path | stop on SIGTERM | test acc |",
        "|---|---|---|" + "---|" * len(PHASES) + "---|---|---|---|---|",
    ]
    for kind in ("fresh", "cached"):
        rs = runs[kind]
        accs = sorted({json.dumps(r["test_acc"], sort_keys=True) for r in rs})
        lines.append(
            f"| {kind} | {fmt([r.get('answering_s', r['serving_s']) for r in rs])} s "
            f"| **{fmt([r['serving_s'] for r in rs])} s** | "
            + " | ".join(fmt([r["phases"][p] for r in rs]) for p in PHASES)
            + " | "
            + ", ".join(sorted({str(r.get("first_path")) for r in rs}))
            + f" | {fmt([r.get('whole_s', r['serving_s']) for r in rs])} s | "
            + ", ".join(sorted({str(r["best_path"]) for r in rs}))
            + f" | {fmt([r['stop_s'] for r in rs], 1)} s | "
            + "; ".join(", ".join(f"{k} {v}" for k, v in json.loads(a).items()) for a in accs)
            + " |"
        )
    lines += ["", f"Command: `.venv/bin/python bench/startup_bench.py {' '.join(sys.argv[1:])}`"]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6))
    kinds = ["fresh", "cached"]
    for y, kind in enumerate(kinds):
        left = 0.0
        for p in PHASES:
            w = statistics.median(r["phases"][p] for r in runs[kind])
            ax.barh(y, w, left=left, label=p if y == 0 else None, color=f"C{PHASES.index(p)}")
            if w > 6:
                ax.text(left + w / 2, y, f"{w:.0f}", ha="center", va="center", color="white", fontsize=8)
            left += w
    ax.axvline(180, ls="--", color="grey", lw=1)
    ax.axvline(30, ls=":", color="grey", lw=1)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("seconds to serving (median of rounds)")
    ax.legend(ncol=4, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from coderay.config import DEFAULT_CONFIG

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/coderay-startup-bench"))
    ap.add_argument("--timeout-s", type=float, default=900)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "startup")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs: dict[str, list[dict]] = {"fresh": [], "cached": []}
    loads: list[tuple[float, float]] = []
    references: list[float] = []
    for k in range(args.runs):
        workdir = args.workdir / f"round-{k}"
        shutil.rmtree(workdir, ignore_errors=True)
        before = os.getloadavg()[0]
        references.append(reference_s())
        for kind in ("fresh", "cached"):
            r = one_up(args.config, workdir, args.timeout_s)
            runs[kind].append(r)
            print(f"round {k + 1} {kind}: serving after {r['serving_s']} s {r['phases']}, stopped in {r['stop_s']} s")
        loads.append((before, os.getloadavg()[0]))
        doc = {"started": started, "runs": runs, "loads": loads, "reference_s": references}
        args.out.with_suffix(".json").write_text(json.dumps(doc))
        args.out.with_suffix(".md").write_text(report(runs, args, loads, started, references))
    plot(runs, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
