"""The Tune trainables of the path search: one trial per candidate and stage, pinned to the node it trains on.

Every trial rebuilds the config from `config["cfg"]` (a `model_dump`, never a file path), loads the
services it needs from its node's store (never trains a model; never another node's model; a reused process
keeps them for its next trial) and calls coderay's own per-candidate functions (`predict_path`, `build_path`,
`train_path`, `edge_early_rows`): one implementation, two engines.

- a cooperative path's trial runs on the host's node with the host's blocks; the local blocks are reached
  through the local node's `LocalSide` actor (`tuning.split`);
- local-only and skip paths (and the edge-early baseline) run on the local node, which owns every block
  they touch.

Each report carries the node the trial ran on (`node`, `node_id`) and where its wall time went so far
(`phases`: process start and imports, Tune's hand-over, data, work, the wait on the local side; the search's
profile, `bench/results/tune_trial_profile.md`). Stage-2 trials report the validation accuracy and the reward
it implies after every epoch (what the early-stopping scheduler ranks), with the links as a checkpoint; the
last report carries the measured row and the final links.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch
from ray import tune

from coderay.candidate import SearchContext, build_path, predict_path, train_path, training_plan
from coderay.config import CoderayConfig
from coderay.links import load_links, save_links
from coderay.pathspec import PathSpec
from coderay.rows import Row, row_from_dict, score
from coderay.services import ServiceProfile, load_services
from coderay.store import node_store, relative, resolve
from tuning.split import WAITED, RemoteBlocks, local_side, remote_service

__all__ = ["predict_trial", "train_trial", "baseline_trial", "trial_resources", "STATE_FILE"]

STATE_FILE = "state.json"
_CONTEXTS: dict[tuple, SearchContext] = {}  # per worker process: reused actors keep their loaded services


def _process_began() -> float:
    """When this process started (epoch seconds), from /proc; now where there is none."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(ln.split()[1]) for ln in lines if ln.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()


_PROCESS = {"began": _process_began(), "imported": time.time(), "last_end": 0.0, "trials": 0}
_MARKS: dict = {}  # the current trial's marks: wall clock at its start and once its data is loaded, counters


def _begin() -> None:
    """Mark a trial's start. A previous trial of this process counts once it has reported (Tune may stop a
    trial's thread inside its last `report`, so nothing after that runs)."""
    if _MARKS.get("reported"):
        _PROCESS["trials"] += 1
    first = _PROCESS["trials"] == 0
    _MARKS.clear()
    _MARKS.update(
        begin=time.time(),
        first=first,
        after=_PROCESS["imported"] if first else _PROCESS["last_end"],
        cpu=time.process_time(),
        waited=WAITED["seconds"],
        calls=WAITED["calls"],
    )


def _phases() -> dict:
    """Where this trial's wall time went so far: the process's start and imports (its first trial only), the
    hand-over since the process's previous trial (or its imports), services and data, the work and, of it,
    the trial's CPU and its wait on the local side. Every report carries them, the last one the totals."""
    first, begin, now = _MARKS["first"], _MARKS["begin"], time.time()
    data = _MARKS.get("data", begin)
    _PROCESS["last_end"], _MARKS["reported"] = now, True
    return {
        "first_in_process": first,
        "process_s": round(_PROCESS["imported"] - _PROCESS["began"], 3) if first else 0.0,
        "handover_s": round(begin - _MARKS["after"], 3),
        "data_s": round(data - begin, 3),
        "work_s": round(now - data, 3),
        "cpu_s": round(time.process_time() - _MARKS["cpu"], 3),
        "local_side_s": round(WAITED["seconds"] - _MARKS["waited"], 3),
        "local_side_calls": WAITED["calls"] - _MARKS["calls"],
        "began": begin,
        "ended": now,
    }


def trial_resources(config: dict) -> tune.PlacementGroupFactory:
    """One bundle on the trial's node: its CPU share plus a sliver of the node's custom resource."""
    from coderay.cluster import PIN

    return tune.PlacementGroupFactory([{"CPU": config["cand"]["cpus"], config["cand"]["node"]: PIN}])


def _setup(config: dict) -> tuple[CoderayConfig, dict]:
    """The trial's config and candidate. The trial computes at this machine's speed, as the in-process search
    does: a node's CPU cap emulates its serving capacity, and what the throughput model reads (block profiles,
    link timings) is still timed inside the node's group (`coderay.emulation.timing_as`)."""
    _begin()
    torch.set_num_threads(1)
    return CoderayConfig.model_validate(config["cfg"]), config["cand"]


def _context(cfg: CoderayConfig, spec: PathSpec, cand: dict) -> SearchContext:
    """The services this trial may hold, from its node's store: for a cooperative path the host's blocks and
    the local service as `RemoteBlocks` (split learning), the local service for the others. Cached per process
    (Tune reuses trial actors)."""
    key = (cfg.fingerprint(cfg), spec.local, spec.host)
    if key not in _CONTEXTS:
        if spec.kind == "coop":
            assert spec.host is not None  # a cooperative path names its host
            services = load_services(cfg, [spec.host], train_missing=False, progress=False)
            services[spec.local] = remote_service(cfg, spec.local, local_side(cfg, spec.local), spec.id)
        else:
            services = load_services(cfg, [spec.local], train_missing=False, progress=False)
        _CONTEXTS.clear()  # one search at a time per worker
        _CONTEXTS[key] = SearchContext(cfg, services)
    ctx = _CONTEXTS[key]
    if spec.kind == "coop":
        blocks = ctx.service_model(spec.local).blocks
        assert isinstance(blocks, RemoteBlocks)  # a cooperative trial's local service is its split-learning stand-in
        blocks.path_id = spec.id  # the side serves this candidate's ranges only
    return ctx


def _where(cand: dict) -> dict:
    return {
        "node": cand["node"],
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "trial_seconds": round(time.time() - _MARKS["begin"], 3),
    }


def _report(cand: dict, metrics: dict, checkpoint: tune.Checkpoint | None = None) -> None:
    """A trial's report: `metrics`, where it runs and where its wall time went so far. Tune has copied a
    checkpoint into the experiment's storage when `report` returns, so its temporary directory goes."""
    tune.report(metrics | _where(cand) | {"phases": _phases()}, checkpoint=checkpoint)
    if checkpoint is not None:
        shutil.rmtree(checkpoint.path, ignore_errors=True)


def _maybe_fail(cand: dict, stage: str) -> None:
    """Fault injection for tests: the first `fail` attempts of this candidate's trial in `stage` raise."""
    if not cand.get("fail"):
        return
    marker = Path(cand["fault_dir"]) / f"{stage}-{cand['path_id'].replace(':', '+')}.attempts"
    marker.parent.mkdir(parents=True, exist_ok=True)
    attempt = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(attempt))
    if attempt <= cand["fail"]:
        raise RuntimeError(f"injected fault in {cand['path_id']} (attempt {attempt} of {cand['fail']} failing)")


def predict_trial(config: dict) -> None:
    """Stage 1 for one candidate: `predict_path` (least-squares links + a few steps, modelled throughput)."""
    cfg, cand = _setup(config)
    spec = PathSpec.parse(cand["path_id"])
    ctx = _context(cfg, spec, cand)
    _MARKS["data"] = time.time()
    _maybe_fail(cand, "predict")
    row = predict_path(ctx, spec)
    _report(cand, {"row": row.to_dict(), "reward": row.pred_reward})


def _epoch_reward(cfg: CoderayConfig, predicted: Row, val_acc: float) -> float:
    """The reward a validation accuracy implies for this path (costs from its stage-1 row)."""
    reward = score(replace(predicted, val_acc=val_acc), cfg.reward, cfg.network).reward
    assert reward is not None  # a path's row with its validation accuracy has a reward
    return reward


def _checkpoint(module, epoch: int, store_dir: Path, cfg: CoderayConfig, node: str) -> tune.Checkpoint:
    """The links after `epoch`, saved in this node's store; Tune's checkpoint holds only the epoch and the
    file's store-relative name (a retry runs on the same node and reads it back from there)."""
    name = relative(save_links(module, store_dir), cfg, node)
    d = Path(tempfile.mkdtemp(prefix="coderay-ckpt-"))
    (d / STATE_FILE).write_text(json.dumps({"epoch": epoch, "links": name}))
    return tune.Checkpoint.from_directory(str(d))  # type: ignore[return-value]  # typed as train's base class


def train_trial(config: dict) -> None:
    """Stage 2 for one candidate: `train_path` from the least-squares start, one report per epoch (links
    checkpointed), the measured row and final links in the last report. A retry after a failure continues
    from the last checkpointed links for the remaining epochs, with a fresh optimiser and learning-rate
    schedule (`fit` has no resumable state): close to, not bit-identical with, an uninterrupted run. With
    several link variants the epochs count across them and a retry starts over (no per-variant checkpoint)."""
    cfg, cand = _setup(config)
    spec = PathSpec.parse(cand["path_id"])
    ctx = _context(cfg, spec, cand)
    _MARKS["data"] = time.time()
    predicted = row_from_dict(cand["predicted"])
    variants, per_variant = training_plan(cfg, predicted)
    resumable = len(variants) == 1
    epochs = per_variant * len(variants)
    explored = bool(predicted.extra.get("explored"))
    if spec.kind == "local":
        _maybe_fail(cand, "train")
        row, _ = train_path(ctx, spec, progress=False, predicted=predicted)
        _report(cand, {"row": row.to_dict(), "reward": row.reward})
        return

    module, _ = build_path(ctx, spec, variants[0])
    node = cand["node"]
    links_dir = Path(cand["links_dir"])  # store-relative
    work = node_store(cfg, node) / "checkpoints" / links_dir.name / spec.id.replace(":", "__")
    done = 0
    checkpoint = tune.get_checkpoint() if resumable else None
    if checkpoint is not None:  # a retry: continue from the last epoch's links
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
        done = state["epoch"]
        for name, link in load_links(resolve(state["links"], cfg, node))[1].items():
            module.links[name].load_state_dict(link.state_dict())
    _maybe_fail(cand, "train")

    def on_epoch(epoch: int, loss: float, val_acc: float) -> None:
        epoch += done
        if epoch >= epochs:  # the final report below carries this epoch
            return
        report = {"epoch": epoch, "loss": loss, "val_acc": val_acc}
        if not explored:  # an explored candidate trains longer, to where the others cannot: ASHA never ranks it
            report["reward"] = _epoch_reward(cfg, predicted, val_acc)
        _report(cand, report, checkpoint=_checkpoint(module, epoch, work, cfg, node) if resumable else None)

    row, module = train_path(
        ctx,
        spec,
        epochs=max(per_variant - done, 1),
        progress=False,
        module=module,
        links_dir=node_store(cfg, node) / links_dir,
        on_epoch=on_epoch,
        predicted=predicted,
    )
    assert row.links_file is not None  # train_path saved the links
    row = replace(row, links_file=relative(Path(row.links_file), cfg, node)).with_extra(
        epochs=epochs, resumed_from_epoch=done
    )
    _report(
        cand,
        {"epoch": epochs, "val_acc": row.val_acc, "reward": row.reward, "row": row.to_dict()},
        checkpoint=_checkpoint(module, epochs, work, cfg, node),
    )
    shutil.rmtree(work, ignore_errors=True)


def baseline_trial(config: dict) -> None:
    """The edge-early baseline rows of one local service (`coderay.baselines.edge_early_rows`), on the local
    node. The baseline mirrors the local model's tail by definition; of the hosts it needs only their block
    profiles, which come in the trial's config (`cand["hosts"]`): no host weight is loaded here."""
    from coderay.baselines import edge_early_rows
    from coderay.provider import metadata_services

    cfg, cand = _setup(config)
    _maybe_fail(cand, "train")
    local = cand["local"]
    services: dict[str, ServiceProfile] = dict(load_services(cfg, [local], train_missing=False, progress=False))
    services |= metadata_services(cfg, cand["hosts"])
    _MARKS["data"] = time.time()
    rows = edge_early_rows(SearchContext(cfg, services), local)
    best = max((r.reward for r in rows if r.reward is not None), default=None)
    _report(cand, {"rows": {r.path_id: r.to_dict() for r in rows}, "reward": best})
