"""Survey: every torchvision classification model split into N blocks at a small input, each in its own process.

For each model: `coderay.models.get_model(NAME, num_classes=10, input_shape=...)` (the small-input adaptation
on), `split_model(blocks=N)`, `profile_blocks`, and `torch.equal` of the composed blocks against the whole
model on a random batch (eval). One JSON line per model (appended, so an interrupted survey resumes: a model
already in the file is skipped) and a markdown table.

    .venv/bin/python bench/model_survey.py [--input 1x28x28] [--blocks 4] [--timeout-s 300] [--skip NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(name: str, shape: tuple[int, int, int], blocks: int) -> dict:
    import torch

    from coderay.blocks import profile_blocks, split_model
    from coderay.models import get_model

    torch.set_num_threads(1)
    rec: dict = {"name": name, "input": "x".join(map(str, shape))}
    start = time.time()
    try:
        model = get_model(name, num_classes=10, input_shape=shape).eval()
        rec["build_s"] = round(time.time() - start, 1)
        rec["stages"] = len(model.stage_names)
        x = torch.randn(2, *shape)
        with torch.no_grad():
            ref = model(x)
        parts = split_model(model, blocks=blocks)
        infos = profile_blocks(parts, shape, measure_latency=False)
        y = x
        with torch.no_grad():
            for part in parts:
                y = part(y)
        rec |= {
            "exact": bool(torch.equal(y, ref)),
            "shapes": [list(i.out_shape) for i in infos],
            "params": sum(i.params for i in infos),
            "ok": True,
        }
    except Exception as e:  # noqa: BLE001 — the survey records why a model fails
        rec |= {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    rec["s"] = round(time.time() - start, 1)
    return rec


def table(records: list[dict]) -> str:
    lines = [
        "| model | ok | exact | stages (valid cuts + 1) | params | block outputs | build s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: r["name"]):
        if r["ok"]:
            shapes = " → ".join("x".join(map(str, s)) for s in r["shapes"])
            lines.append(
                f"| {r['name']} | yes | {r['exact']} | {r['stages']} | {r['params'] / 1e6:.1f}M | {shapes} "
                f"| {r.get('build_s')} |"
            )
        else:
            err = r["error"].replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {r['name']} | **no** | | | | {err} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default="1x28x28")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--timeout-s", type=float, default=300.0, help="per model")
    p.add_argument("--skip", nargs="*", default=[], help="models not to run (e.g. the largest)")
    p.add_argument("--only", nargs="*", help="these models only")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_survey")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dims = [int(v) for v in args.input.split("x")]
    if len(dims) != 3:
        p.error(f"--input is CxHxW, e.g. 1x28x28; got {args.input!r}")
    shape = (dims[0], dims[1], dims[2])
    if args.one:
        print(json.dumps(one(args.one, shape, args.blocks)))
        return 0

    from coderay.models import list_torchvision_models

    jsonl = args.out.with_suffix(".jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["name"] for line in jsonl.read_text().splitlines()} if jsonl.exists() else set()
    names = [n for n in (args.only or list_torchvision_models()) if n not in done and n not in args.skip]
    for k, name in enumerate(names, 1):
        print(f"[{k}/{len(names)}] {name}", flush=True)
        cmd = [sys.executable, __file__, "--one", name, "--input", args.input, "--blocks", str(args.blocks)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, cwd=ROOT)
            rec = (
                json.loads(out.stdout.strip().splitlines()[-1])
                if out.returncode == 0 and out.stdout.strip()
                else {"name": name, "ok": False, "error": f"exit {out.returncode}: {out.stderr.strip()[-300:]}"}
            )
        except subprocess.TimeoutExpired:
            rec = {"name": name, "ok": False, "error": f"timeout after {args.timeout_s:g} s"}
        with jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    args.out.with_suffix(".md").write_text(f"# Model survey at {args.input}, N = {args.blocks}\n\n" + table(records))
    print(f"wrote {jsonl} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
