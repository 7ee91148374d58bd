"""`run_tune_search`: CoDE's multi-stage path search as two Ray Tune experiments.

Stage 1 ("predict"): one trial per candidate path runs `coderay.search.predict_path`. Stage 2 ("train"):
the candidates `coderay.search.stage2_selection` picks from stage 1's rows (top-k by predicted reward, or
every candidate when exhaustive), the local-only path of each service, and the edge-early baseline, one
trial each, run `train_path` (`edge_early_rows`). The rows merge exactly as in `coderay.search.run_search`
and land in the same place: `finish_table`, `RewardTable.save` into `search_dir(cfg, exhaustive=...)`,
`pareto.png`, the links under its `links/` (copied from each trial's final checkpoint), with
`meta["engine"] = "tune"`.

Each experiment is stored under `<workdir>/tune/<search key>-predict|-train`; a search that stops (Ctrl-C,
a crash, a lost driver) resumes from there with `Tuner.restore`: finished trials are not run again,
unfinished ones continue from their latest checkpoint. A failing trial is retried twice
(`FailureConfig(max_failures=2)`, from its latest checkpoint); one that still fails gets a row with an
`error` field and no reward. In stage 2 an ASHA scheduler on the per-epoch reward stops hopeless candidates
(row: `pruned_at_epoch`, `pruned_val_acc`, no reward); it is off for exhaustive searches, whose point is to
measure every candidate.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ray import tune
from tqdm.auto import tqdm

from coderay.config import CoderayConfig
from coderay.paths import PathSpec
from coderay.search import SearchContext, candidates, finish_table, search_dir, stage2_selection
from coderay.table import COLUMNS, RewardTable

__all__ = ["run_tune_search", "experiment_dir"]

log = logging.getLogger(__name__)
MAX_FAILURES = 2


def experiment_dir(cfg: CoderayConfig, stage: str, *, exhaustive: bool, private: bool = True) -> Path:
    """Where Tune keeps one stage's experiment ('predict' or 'train'): keyed like `search_dir`."""
    return cfg.root / "tune" / f"{search_dir(cfg, exhaustive=exhaustive).name}{'' if private else '-shared'}-{stage}"


def run_tune_search(cfg: CoderayConfig, *, address: str | None = None, exhaustive: bool | None = None,
                    progress: bool = True, resume: bool = True, early_stop: bool | None = None,
                    private: bool = True, faults: Mapping[str, int] | None = None) -> RewardTable:
    """Run the path search on Ray Tune and write its reward table and links where serving finds them.

    address: a running cluster to join ('auto', 'HOST:PORT'); None: a local cluster of the config's nodes,
        started here and shut down at the end. A Ray session this process already has is used as it is.
    exhaustive: train every candidate (default: the config's `search.exhaustive`).
    resume: continue the stored experiments of this search (finished trials are kept); False starts over.
    early_stop: stop hopeless stage-2 trials with ASHA (default: on unless exhaustive).
    private: split learning for cooperative paths, the local blocks staying on the local node (see
        `tuning`); False loads the local model into the host's trial (faster, no privacy).
    faults: fault injection for tests, path id → how many attempts of its trials raise (stage 1 and 2;
        `LOCAL:edge-early` for the baseline). Stored with the experiment: a resumed search keeps the first.
    """
    import ray

    from coderay.cluster import check_nodes, connect, start_local_cluster
    from tuning.split import local_side, stop_side
    from tuning.trials import predict_trial

    start = time.perf_counter()
    exhaustive = cfg.search.exhaustive if exhaustive is None else exhaustive
    early_stop = not exhaustive if early_stop is None else early_stop
    cfg = _portable(cfg)
    out = search_dir(cfg, exhaustive=exhaustive)
    ctx = SearchContext.load(cfg, progress=progress)     # trains what is missing: trials only read caches
    locals_ = cfg.search.locals or [s.name for s in cfg.services]
    cands = {local: candidates(ctx, local) for local in locals_}

    cluster, joined = None, False
    if ray.is_initialized():
        check_nodes(cfg)
    elif address:
        connect(cfg, address)
        joined = True
    else:
        cluster = start_local_cluster(cfg)
        check_nodes(cfg)
    sides = {}
    try:
        sides = {local: local_side(cfg, local, create=True) for local in locals_
                 if private and any(c.kind == "coop" for c in cands[local])}
        nodes = {r: n["NodeID"] for n in ray.nodes() if n.get("Alive") for r in n.get("Resources", {})
                 if r in {x.name for x in cfg.nodes}}          # node name → Ray node id

        if not resume:
            shutil.rmtree(cfg.root / "tune" / "faults", ignore_errors=True)

        def extra(pid: str) -> dict:
            if not faults or pid not in faults:
                return {"private": private}
            return {"private": private, "fail": int(faults[pid]), "fault_dir": str(cfg.root / "tune" / "faults")}

        # ---- stage 1: predict every candidate
        space = [_cand(cfg, spec) | extra(spec.id) for local in locals_ for spec in cands[local]]
        s1 = _run_stage(cfg, experiment_dir(cfg, "predict", exhaustive=exhaustive, private=private), predict_trial,
                        space, resume=resume, progress=progress, scheduler=None)

        # ---- stage 2: train the chosen candidates, measure the local-only path, score the baseline
        preds: dict[str, list[dict]] = {}
        space = []
        for local in locals_:
            preds[local] = []
            for spec in cands[local]:
                res = s1.results.get(spec.id)
                if res is None or res.error is not None or "row" not in (res.metrics or {}):
                    preds[local].append(_error_row(spec, s1.error(spec.id)))
                else:
                    preds[local].append(res.metrics["row"] | _trial_fields("predict", res.metrics))
            ok = [r for r in preds[local] if r.get("pred_reward") is not None]
            chosen = set(stage2_selection(ok, cfg.search.top_k, exhaustive))
            for r in ok:
                if r["path_id"] in chosen or r["kind"] == "local":
                    space.append(_cand(cfg, PathSpec.parse(r["path_id"]))
                                 | {k: r[k] for k in ("th_local", "th_host", "th_ratio")} | extra(r["path_id"]))
            if getattr(cfg.search, "baselines", False):
                pid = f"{local}:edge-early"
                space.append({"path_id": pid, "local": local, "node": cfg.service(local).node,
                              "cpus": min(1.0, cfg.node(cfg.service(local).node).cpus), "kind": "baseline",
                              "hosts": {n: {"infos": [i.to_dict() for i in s.infos], "metrics": s.metrics}
                                        for n, s in ctx.services.items() if n != local}} | extra(pid))
        scheduler = _asha(cfg) if early_stop and cfg.search.link_epochs > 1 else None
        s2 = _run_stage(cfg, experiment_dir(cfg, "train", exhaustive=exhaustive, private=private), _dispatch_train,
                        space, resume=resume, progress=progress, scheduler=scheduler)

        # ---- merge, in run_search's order: candidates, then the baseline
        links_dir = out / "links"
        rows, pruned = [], []
        for local in locals_:
            for i, row in enumerate(preds[local]):
                if row["path_id"] in s2.results:
                    preds[local][i] = _merge(row, s2, links_dir)
                    if "pruned_at_epoch" in preds[local][i]:
                        pruned.append(row["path_id"])
            rows += preds[local]
            res = s2.results.get(f"{local}:edge-early")
            if res is not None:
                if res.error is None and "rows" in res.metrics:
                    rows += list(res.metrics["rows"].values())
                else:
                    rows.append(dict.fromkeys(COLUMNS) | {
                        "path_id": f"{local}:edge-early", "local": local, "kind": "edge-early", "trained": False,
                        "error": s2.error(f"{local}:edge-early") or "no result"})
        errors = {r["path_id"]: r["error"] for r in rows if r.get("error")}
        split_nodes = dict(zip(sides, ray.get([s.node_id.remote() for s in sides.values()])))
        meta = {"config": cfg.name, "mode": "exhaustive" if exhaustive else "staged", "engine": "tune",
                "seconds": round(time.perf_counter() - start, 1),
                "tune": {"storage": str(cfg.root / "tune"), "experiments": [s1.path, s2.path],
                         "nodes": nodes, "split_nodes": split_nodes, "trials": {"predict": s1.total, "train": s2.total},
                         "trials_run": {"predict": len(s1.started), "train": len(s2.started)},
                         "reports_run": {"predict": s1.reports, "train": s2.reports},
                         "stage_seconds": {"predict": s1.seconds, "train": s2.seconds},
                         "retries": s1.retries + s2.retries, "resumed": s1.restored or s2.restored,
                         "early_stop": scheduler is not None, "private": private, "pruned": pruned, "errors": errors}}
        table = finish_table(cfg, rows, meta)
        table.meta["dir"] = str(out)
        table.save(out)
        RewardTable([r for r in table.rows if r.get("th_total") is not None], table.meta).plot(out / "pareto.png")
        table.meta["from_cache"] = False
        if progress:
            tqdm.write(f"reward table: {out / 'table.json'} ({len(rows)} rows, {len(errors)} failed, "
                       f"{len(pruned)} stopped early; {meta['seconds']} s)")
        return table
    finally:
        for local in sides:
            stop_side(cfg, local)
        if cluster is not None:
            cluster.shutdown()
        elif joined:
            ray.shutdown()


def _merge(row: dict, stage: _Stage, links_dir: Path) -> dict:
    """A stage-1 row updated with its stage-2 trial: measured (links copied to `links_dir`), stopped early
    by ASHA, or failed."""
    res = stage.results[row["path_id"]]
    metrics = res.metrics or {}
    if res.error is None and "row" in metrics:
        measured = metrics["row"] | _trial_fields("train", metrics)
        if measured.get("trained"):
            measured["links_file"] = str(_copy_links(res.checkpoint, links_dir))
        return row | measured | {"pred_acc": row["pred_acc"], "pred_reward": row["pred_reward"]}
    if res.error is None and "epoch" in metrics:
        return row | {"pruned_at_epoch": metrics["epoch"], "pruned_val_acc": metrics["val_acc"]} | _trial_fields(
            "train", metrics)
    return row | {"error": stage.error(row["path_id"]) or "no result", "reward": None}


def _dispatch_train(config: dict) -> None:
    """Stage 2's one trainable: a candidate's links, or the edge-early baseline."""
    from tuning.trials import baseline_trial, train_trial

    (baseline_trial if config["cand"].get("kind") == "baseline" else train_trial)(config)


def _portable(cfg: CoderayConfig) -> CoderayConfig:
    """The config with absolute paths: trials run in other directories (and on other machines)."""
    update = {"workdir": str(cfg.root)}
    if cfg.data_root:
        update["data_root"] = str(Path(cfg.data_root).expanduser().resolve())
    return cfg.model_copy(update=update)


def _cand(cfg: CoderayConfig, spec: PathSpec) -> dict:
    """A trial's candidate: its path and the node it is pinned to (the host's for a cooperative path)."""
    node = cfg.service(spec.host if spec.kind == "coop" else spec.local).node
    return {"path_id": spec.id, "node": node, "cpus": min(1.0, cfg.node(node).cpus)}


def _error_row(spec: PathSpec, error: str | None) -> dict:
    """A candidate whose stage-1 trial failed for good: every column present, nothing measured."""
    return dict.fromkeys(COLUMNS) | {"path_id": spec.id, "local": spec.local, "kind": spec.kind, "host": spec.host,
                                     "lout": spec.lout, "hin": spec.hin, "hout": spec.hout, "lin": spec.lin,
                                     "trained": False, "error": error or "no result"}


def _trial_fields(stage: str, metrics: dict) -> dict:
    return {"node": metrics.get("node"), f"{stage}_node_id": metrics.get("node_id"),
            f"{stage}_trial_seconds": metrics.get("trial_seconds")}


def _copy_links(checkpoint, links_dir: Path) -> Path:
    """The final links of a trial, from its checkpoint to where serving loads them."""
    links_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d:
        (src,) = Path(d).glob("*.pt")
        dest = links_dir / src.name
        shutil.copyfile(src, dest)
    return dest


def _asha(cfg: CoderayConfig):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric="reward", mode="max", max_t=cfg.search.link_epochs,
                         grace_period=1, reduction_factor=2)


# ---------------------------------------------------------------------------------------------- one stage

@dataclass
class _Stage:
    """What a stage's run did, filled by `_Watch` (callbacks are pickled with the experiment, so they
    reach this through `_STAGES` by key)."""
    name: str
    progress: bool
    path: str = ""
    total: int = 0
    restored: bool = False
    started: set = field(default_factory=set)
    reports: int = 0
    retries: int = 0
    results: dict = field(default_factory=dict)      # path id → ray.tune.Result
    seconds: float = 0.0
    bar: object = None

    def error(self, path_id: str) -> str | None:
        res = self.results.get(path_id)
        if res is None or res.error is None:
            return None
        return f"{type(res.error).__name__}: {_last_line(res.error)}"


_STAGES: dict[str, _Stage] = {}


def _last_line(error: BaseException) -> str:
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else repr(error)


def _path_id(trial) -> str:
    return trial.config["cand"]["path_id"]


def _trial_dirname(trial) -> str:
    return f"{_path_id(trial).replace(':', '+')}-{trial.trial_id}"


def _path_of(result) -> str:
    return Path(result.path).name.rsplit("-", 1)[0].replace("+", ":")


class _Watch(tune.Callback):
    """Progress (a bar per stage, a line per finished trial) and the counts that show what ran."""

    def __init__(self, key: str):
        self.key = key

    @property
    def stage(self) -> _Stage | None:
        return _STAGES.get(self.key)

    def on_step_begin(self, iteration, trials, **info):
        st = self.stage
        if st is not None and st.progress and st.bar is None and trials:
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            st.bar = tqdm(total=st.total, initial=done, desc=f"tune {st.name}", unit="trial")

    def on_trial_start(self, iteration, trials, trial, **info):
        log.debug("start %s", _path_id(trial))
        if self.stage is not None:
            self.stage.started.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.stage is not None:
            self.stage.reports += 1

    def on_trial_recover(self, iteration, trials, trial, **info):
        log.debug("recover %s", _path_id(trial))
        st = self.stage
        if st is not None:
            st.retries += 1
            if st.progress:
                tqdm.write(f"{st.name}: {_path_id(trial)} failed, retrying from its last checkpoint")

    def on_trial_complete(self, iteration, trials, trial, **info):
        log.debug("complete %s", _path_id(trial))
        st = self.stage
        if st is not None and st.bar is not None:
            st.bar.update(1)
            r = trial.last_result or {}
            row = r.get("row") or {}
            if st.name == "train":
                what = (f"val acc {row['val_acc']:.4f}, reward {row['reward']:.4f}" if row.get("reward") is not None
                        else f"stopped at epoch {r.get('epoch')}" if "epoch" in r else "done")
                tqdm.write(f"train: {_path_id(trial)} on {r.get('node')}: {what}")

    def on_trial_error(self, iteration, trials, trial, **info):
        log.debug("error %s", _path_id(trial))
        st = self.stage
        if st is not None and st.bar is not None:
            st.bar.update(1)
            tqdm.write(f"{st.name}: {_path_id(trial)} FAILED after {MAX_FAILURES} retries")

    def on_experiment_end(self, trials, **info):
        st = self.stage
        if st is not None and st.bar is not None:
            st.bar.close()
            st.bar = None



def _run_stage(cfg: CoderayConfig, path: Path, trainable: Callable, space: list[dict], *, resume: bool, progress: bool,
               scheduler) -> _Stage:
    """Run (or resume) the experiment at `path`: a trial per entry of `space`; results by path id."""
    from tuning.trials import trial_resources

    name = path.name.rsplit("-", 1)[1]
    log.debug("%s: stage begins", name)
    key = str(path)
    stage = _STAGES[key] = _Stage(name, progress, path=key, total=len(space))
    quiet = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"     # Tune's own tables off (verbose=0): progress is ours
    try:
        fn = tune.with_resources(trainable, trial_resources)
        if resume and tune.Tuner.can_restore(path):
            stage.restored = True
            tuner = tune.Tuner.restore(str(path), trainable=fn, resume_errored=True)
        else:
            if path.exists():
                shutil.rmtree(path)
            tuner = tune.Tuner(
                fn, param_space={"cfg": cfg.model_dump(mode="json"), "cand": tune.grid_search(space)},
                tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True,
                                            trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=path.name, storage_path=str(path.parent), verbose=0,
                    failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                    callbacks=[_Watch(key)]))
        began = time.perf_counter()
        log.debug("%s: fit", name)
        grid = tuner.fit()
        log.debug("%s: fit returned", name)
        stage.seconds = round(time.perf_counter() - began, 1)
        for result in grid:
            stage.results[_path_of(result)] = result
        stage.total = len(grid)
        if grid.num_terminated + grid.num_errors < len(grid):
            raise RuntimeError(f"the {name} stage stopped with {len(grid) - grid.num_terminated - grid.num_errors} "
                               f"of {len(grid)} trials unfinished; run the search again to resume it ({path})")
        return stage
    finally:
        if quiet is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = quiet
        if stage.bar is not None:
            stage.bar.close()
        _STAGES.pop(key, None)
