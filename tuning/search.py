"""`run_tune_search`: CoDE's multi-stage path search (`coderay.search.staged_search`) run by Ray Tune.

`TuneExecutor` is the search's second executor: stage 1 is one Tune experiment ("predict", a trial per
candidate calling `coderay.candidate.predict_path`, handed out by `tuning.frontier.FrontierSearcher` best
reward bound first, so candidates that cannot beat their bar are pruned as in-process), stage 2 another
("train": a trial per selected candidate and local-only path calling `train_path`, and one per service for the
edge-early baseline). The algorithm, the selection, the merge and the table are `staged_search`'s, so the
table is the in-process one, saved in the same `search_dir` with `meta["engine"] = "tune"`, links where
serving loads them.

Each experiment is stored under `<workdir>/tune/<search key>-predict|-train`; a search that stops (Ctrl-C,
a crash, a lost driver) resumes from there with `Tuner.restore`: finished trials are not run again,
unfinished ones continue from their latest checkpoint. A failing trial is retried twice
(`FailureConfig(max_failures=2)`, from its latest checkpoint); one that still fails gets a row with an
`error` field and no reward. In stage 2 an ASHA scheduler on the per-epoch reward stops hopeless candidates
(row: `pruned_at_epoch`, `pruned_val_acc`, no reward); it is off for exhaustive searches, whose point is to
measure every candidate.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ray import tune
from tqdm.auto import tqdm

from coderay.candidate import SearchContext
from coderay.cluster import alive_resources, environ
from coderay.config import CoderayConfig
from coderay.pathspec import PathSpec
from coderay.plan import link_owner, link_services
from coderay.rows import BaselineRow, Row, row_from_dict
from coderay.search import NEVER_HANDED_OUT, Frontier, search_dir, staged_search
from coderay.table import RewardTable
from tuning.frontier import FrontierSearcher

__all__ = ["run_tune_search", "experiment_dir", "TuneExecutor"]

log = logging.getLogger(__name__)
MAX_FAILURES = 2


def experiment_dir(cfg: CoderayConfig, stage: str, *, exhaustive: bool) -> Path:
    """Where Tune keeps one stage's experiment ('predict' or 'train'): keyed like `search_dir`. It holds trial
    results and checkpoint pointers only; every parameter file stays in the store of the node that made it."""
    return cfg.root / "tune" / f"{search_dir(cfg, exhaustive=exhaustive).name}-{stage}"


def run_tune_search(
    cfg: CoderayConfig,
    *,
    address: str | None = None,
    exhaustive: bool | None = None,
    progress: bool = True,
    resume: bool = True,
    early_stop: bool | None = None,
    faults: Mapping[str, int] | None = None,
) -> RewardTable:
    """Run the path search on Ray Tune and write its reward table and links where serving finds them.

    address: a running cluster to join ('auto', 'HOST:PORT'); None: a local cluster of the config's nodes,
        started here and shut down at the end. A Ray session this process already has is used as it is.
    exhaustive: train every candidate (default: the config's `search.exhaustive`).
    resume: continue the stored experiments of this search (finished trials are kept); False starts over.
    early_stop: stop hopeless stage-2 trials with ASHA (default: on unless exhaustive).
    faults: fault injection for tests, path id → how many attempts of its trials raise (stage 1 and 2;
        `LOCAL:edge-early` for the baseline). Stored with the experiment: a resumed search keeps the first.
    """
    import ray

    from coderay.candidate import candidates
    from coderay.cluster import check_nodes, connect, start_local_cluster
    from coderay.netprobe import measured_network
    from coderay.provider import describe_on_nodes, metadata_services, train_on_nodes
    from tuning.split import local_side, stop_side

    exhaustive = cfg.search.exhaustive if exhaustive is None else exhaustive
    early_stop = not exhaustive if early_stop is None else early_stop
    cfg = cfg.portable() if not address else cfg.portable().on_real_cluster()
    locals_ = cfg.search.locals or [s.name for s in cfg.services]

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
        if not cfg.emulation.local:  # a real cluster: the network the model uses is measured
            cfg = cfg.model_copy(update={"network": measured_network(cfg, _pairs(cfg, locals_))})
            log.info("network measured: %s", [link.model_dump() for link in cfg.network.links])
        # each node trains (cached) and times its own blocks; this process keeps their metadata only
        train_on_nodes(cfg)
        ctx = SearchContext(cfg, metadata_services(cfg, describe_on_nodes(cfg)))
        if len(cfg.services) > 1:
            sides = {
                local: local_side(cfg, local, create=True, paths=[c.id for c in candidates(ctx, local)])
                for local in locals_
            }
        if not resume:
            shutil.rmtree(cfg.root / "tune" / "faults", ignore_errors=True)
        executor = TuneExecutor(
            ctx,
            exhaustive=exhaustive,
            resume=resume,
            progress=progress,
            early_stop=early_stop,
            faults=faults,
            sides=sides,
        )
        return staged_search(ctx, executor, exhaustive=exhaustive, out=search_dir(cfg, exhaustive=exhaustive))
    finally:
        for local in sides:
            stop_side(cfg, local)
        if cluster is not None:
            cluster.shutdown()
        elif joined:
            ray.shutdown()


def _pairs(cfg: CoderayConfig, locals_: Sequence[str]) -> list[tuple[str, str]]:
    """(local node, host node) for every local service of the search and every other service's node."""
    out = []
    for local in locals_:
        a = cfg.service(local).node
        out += [(a, s.node) for s in cfg.services if s.node != a and (a, s.node) not in out]
    return out


class TuneExecutor:
    """The search's per-candidate work as Tune trials: stage 1 one experiment, stage 2 (and the baselines)
    another, each trial pinned to the node that owns its blocks."""

    name = "tune"
    prunes = True  # stage 1's trials come from a FrontierSearcher: finished predictions raise the bar

    def __init__(
        self,
        ctx: SearchContext,
        *,
        exhaustive: bool,
        resume: bool,
        progress: bool,
        early_stop: bool,
        faults: Mapping[str, int] | None,
        sides: dict,
    ):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.exhaustive, self.resume, self.progress = exhaustive, resume, progress
        self.early_stop, self.faults, self.sides = early_stop, dict(faults or {}), sides
        names = {n.name for n in self.cfg.nodes}
        self.nodes = {r: nid for nid, res in alive_resources().items() for r in res if r in names}  # name → node id
        self.stages: dict[str, _Stage] = {}
        self.pruned: list[str] = []  # stage 2: stopped early by ASHA
        self.never_predicted = 0  # stage 1: candidates the searcher pruned
        self.scheduler = None

    def _extra(self, path_id: str) -> dict:
        if path_id not in self.faults:
            return {}
        return {"fail": int(self.faults[path_id]), "fault_dir": str(self.cfg.root / "tune" / "faults")}

    def _cand(self, spec: PathSpec) -> dict:
        """A trial's candidate: its path and the node it is pinned to (where the path's links run)."""
        node = self.cfg.service(link_owner(spec)).node
        return {"path_id": spec.id, "node": node, "cpus": min(1.0, self.cfg.node(node).cpus)} | self._extra(spec.id)

    def predict(self, frontier: Frontier) -> dict[str, Row]:
        """One experiment whose trials a `FrontierSearcher` hands out: local-only first (its trial row replaces the
        driver's), then the frontier's candidates while they can still beat their bar, as many at once as their
        nodes have CPUs for."""
        from tuning.trials import predict_trial

        first = [PathSpec.parse(r.path_id) for r in frontier.local_rows()]
        specs = first + [PathSpec.parse(r.path_id) for r in frontier.queued()]
        cands = {spec.id: self._cand(spec) for spec in specs}
        cpus = {nid: res.get("CPU", 0.0) for nid, res in alive_resources().items() if nid in self.nodes.values()}
        slots = {
            nid: _slots(n, [c["cpus"] for c in cands.values() if self.nodes[c["node"]] == nid])
            for nid, n in cpus.items()
        }
        stage = self.stages["predict"] = _run_stage(
            self.cfg,
            experiment_dir(self.cfg, "predict", exhaustive=self.exhaustive),
            predict_trial,
            FrontierSearcher(copy.deepcopy(frontier), first, cands, self.nodes, slots),
            resume=self.resume,
            progress=self.progress,
            scheduler=None,
            concurrency=sum(slots.values()) + len(slots),  # one waiting per node
        )
        rows = {}
        for pid in stage.results:
            res, spec = stage.results[pid], PathSpec.parse(pid)
            if res.error is not None or "row" not in (res.metrics or {}):
                rows[pid] = Row.failed(spec, stage.error(pid) or "no result")
            else:
                rows[pid] = row_from_dict(res.metrics["row"]).with_extra(**_trial_fields("predict", res.metrics))
        out = frontier.settle(rows)
        if left := [pid for pid, r in out.items() if r.error == NEVER_HANDED_OUT]:
            raise RuntimeError(
                f"the predict stage stopped with {len(left)} candidates not yet tried; run the search again to resume "
                f"it ({stage.path})"
            )
        self.never_predicted = len(specs) - len(rows)
        return out

    def measure(
        self, chosen: Sequence[Row], baselines: Sequence[str], links_dir: Path
    ) -> tuple[dict[str, Row], dict[str, list[Row]]]:
        space = [
            self._cand(PathSpec.parse(r.path_id)) | {"predicted": r.to_dict(), "links_dir": str(links_dir)}
            for r in chosen
        ]
        for local in baselines:
            pid = f"{local}:edge-early"
            node = self.cfg.service(local).node
            space.append(
                {
                    "path_id": pid,
                    "local": local,
                    "node": node,
                    "cpus": min(1.0, self.cfg.node(node).cpus),
                    "kind": "baseline",
                    "hosts": {
                        n: {"infos": [i.to_dict() for i in s.infos], "metrics": s.metrics}
                        for n, s in self.ctx.services.items()
                        if n != local
                    },
                }
                | self._extra(pid)
            )
        if self.early_stop and self.cfg.search.link_epochs * len(self.cfg.search.link_variants) > 1:
            self.scheduler = _asha(self.cfg)
        stage = self.stages["train"] = _run_stage(
            self.cfg,
            experiment_dir(self.cfg, "train", exhaustive=self.exhaustive),
            _dispatch_train,
            space,
            resume=self.resume,
            progress=self.progress,
            scheduler=self.scheduler,
        )
        measured = {r.path_id: self._merge(r, stage) for r in chosen}
        base = {}
        for local in baselines:
            res = stage.results.get(f"{local}:edge-early")
            if res is not None and res.error is None and "rows" in (res.metrics or {}):
                base[local] = [row_from_dict(d) for d in res.metrics["rows"].values()]
            else:
                base[local] = [
                    BaselineRow(
                        path_id=f"{local}:edge-early",
                        local=local,
                        kind="edge-early",
                        error=stage.error(f"{local}:edge-early") or "no result",
                    )
                ]
        return measured, base

    def _merge(self, row: Row, stage: _Stage) -> Row:
        """A stage-1 row updated with its stage-2 trial: measured (its links in the store of the node that
        trained them, and copied store to store where another node runs link_out), stopped early by ASHA, or
        failed."""
        from coderay.provider import copy_links

        res = stage.results.get(row.path_id)
        metrics = (res.metrics or {}) if res is not None else {}
        if res is not None and res.error is None and "row" in metrics:
            measured = row_from_dict(metrics["row"]).with_extra(**_trial_fields("train", metrics))
            if measured.trained and measured.links_file:
                spec = PathSpec.parse(measured.path_id)
                owner = self.cfg.service(link_owner(spec)).node
                copy_links(
                    self.cfg,
                    measured.links_file,
                    owner,
                    {self.cfg.service(s).node for s in link_services(spec, link_out=measured.link_out_on or "host")},
                )
            return measured
        if res is not None and res.error is None and "epoch" in metrics:
            self.pruned.append(row.path_id)
            return row.with_extra(
                pruned_at_epoch=metrics["epoch"], pruned_val_acc=metrics["val_acc"], **_trial_fields("train", metrics)
            )
        return replace(row, error=stage.error(row.path_id) or "no result", reward=None)

    def meta(self) -> dict:
        import ray

        s1, s2 = self.stages["predict"], self.stages["train"]
        split_nodes = dict(zip(self.sides, ray.get([s.node_id.remote() for s in self.sides.values()])))
        side_busy = dict(zip(self.sides, ray.get([s.stats.remote() for s in self.sides.values()])))
        rows_errors = {pid: s.error(pid) for s in (s1, s2) for pid in s.results if s.error(pid)}
        return {
            "tune": {
                "storage": str(self.cfg.root / "tune"),
                "experiments": [s1.path, s2.path],
                "nodes": self.nodes,
                "split_nodes": split_nodes,
                "split_busy": side_busy,
                "trials": {"predict": s1.total, "train": s2.total},
                "trials_run": {"predict": len(s1.started), "train": len(s2.started)},
                "reports_run": {"predict": s1.reports, "train": s2.reports},
                "stage_seconds": {"predict": s1.seconds, "train": s2.seconds},
                "phases": {"predict": _phase_totals(s1), "train": _phase_totals(s2)},
                "retries": s1.retries + s2.retries,
                "resumed": s1.restored or s2.restored,
                "early_stop": self.scheduler is not None,
                "pruned": self.pruned,
                "pruned_before_predicting": self.never_predicted,
                "errors": rows_errors,
            }
        }


def _dispatch_train(config: dict) -> None:
    """Stage 2's one trainable: a candidate's links, or the edge-early baseline."""
    from tuning.trials import baseline_trial, train_trial

    (baseline_trial if config["cand"].get("kind") == "baseline" else train_trial)(config)


PHASES = ("process_s", "handover_s", "data_s", "work_s", "cpu_s", "local_side_s", "local_side_calls")


def _phase_totals(stage: _Stage) -> dict:
    """Where a stage's trial time went (`tuning.trials` reports it per trial), summed over the trials this run
    ran; `first_trial_after_s`: from the stage's start to its first trial's start (Tune, actors, imports)."""
    ran = [p for r in stage.results.values() if (p := (r.metrics or {}).get("phases")) and p["began"] >= stage.began]
    out = {k: round(sum(p.get(k, 0) for p in ran), 3) for k in PHASES}
    out["trials"] = len(ran)
    out["first_trial_after_s"] = round(min(p["began"] for p in ran) - stage.began, 3) if ran else None
    return out


def _trial_fields(stage: str, metrics: dict) -> dict:
    return {
        "node": metrics.get("node"),
        f"{stage}_node_id": metrics.get("node_id"),
        f"{stage}_trial_seconds": metrics.get("trial_seconds"),
    }


def _asha(cfg: CoderayConfig):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        metric="reward",
        mode="max",
        max_t=cfg.search.link_epochs * len(cfg.search.link_variants),
        grace_period=1,
        reduction_factor=2,
    )


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
    results: dict = field(default_factory=dict)  # path id → ray.tune.Result
    seconds: float = 0.0
    began: float = 0.0  # wall clock at the stage's start
    bar: tqdm | None = None  # while the stage runs

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
                log.info("%s: %s failed, retrying from its last checkpoint", st.name, _path_id(trial))

    def on_trial_complete(self, iteration, trials, trial, **info):
        log.debug("complete %s", _path_id(trial))
        st = self.stage
        if st is not None and st.bar is not None:
            st.bar.update(1)
            r = trial.last_result or {}
            row = r.get("row") or {}
            if st.name == "train":
                what = (
                    f"val acc {row['val_acc']:.4f}, reward {row['reward']:.4f}"
                    if row.get("reward") is not None
                    else f"stopped at epoch {r.get('epoch')}"
                    if "epoch" in r
                    else "done"
                )
                log.info("train: %s on %s: %s", _path_id(trial), r.get("node"), what)

    def on_trial_error(self, iteration, trials, trial, **info):
        log.debug("error %s", _path_id(trial))
        st = self.stage
        if st is not None and st.bar is not None:
            st.bar.update(1)
            log.warning("%s: %s FAILED after %d retries", st.name, _path_id(trial), MAX_FAILURES)

    def on_experiment_end(self, trials, **info):
        st = self.stage
        if st is not None and st.bar is not None:
            st.bar.close()
            st.bar = None


# Tune's own progress tables off (verbose=0: progress is ours) and no automatic TensorBoard logger, which
# logs a "Summary name ... is illegal" line for every path-id metric; CSV and JSON results stay (passed below).
_QUIET = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


def _slots(cpus: float, trials: Sequence[float]) -> int:
    """How many trials can run at once on a node of `cpus` CPUs: as many as of its smallest trial fit."""
    return int((cpus + 1e-9) // min(trials)) if trials else 0


def _run_stage(
    cfg: CoderayConfig,
    path: Path,
    trainable: Callable,
    space: list[dict] | FrontierSearcher,
    *,
    resume: bool,
    progress: bool,
    scheduler,
    concurrency: int | None = None,
) -> _Stage:
    """Run (or resume) the experiment at `path`: a trial per entry of `space`, or per candidate a searcher hands
    out (at most `concurrency` at once); results by path id."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from tuning.trials import trial_resources

    name = path.name.rsplit("-", 1)[1]
    log.debug("%s: stage begins", name)
    key = str(path)
    searcher = space if isinstance(space, FrontierSearcher) else None
    cands = {} if isinstance(space, FrontierSearcher) else {"cand": tune.grid_search(space)}
    total = space.total if isinstance(space, FrontierSearcher) else len(space)
    stage = _STAGES[key] = _Stage(name, progress, path=key, total=total)
    with environ(_QUIET):  # Tune reads them while it runs this stage
        try:
            fn = tune.with_resources(trainable, trial_resources)
            if resume and tune.Tuner.can_restore(path):
                stage.restored = True
                tuner = tune.Tuner.restore(str(path), trainable=fn, resume_errored=True)
            else:
                if path.exists():
                    shutil.rmtree(path)
                tuner = tune.Tuner(
                    fn,
                    param_space={"cfg": cfg.model_dump(mode="json")} | cands,
                    tune_config=tune.TuneConfig(
                        scheduler=scheduler,
                        search_alg=searcher,
                        num_samples=1 if searcher is None else -1,  # a searcher: until it says FINISHED
                        max_concurrent_trials=concurrency,
                        reuse_actors=True,
                        trial_dirname_creator=_trial_dirname,
                    ),
                    run_config=tune.RunConfig(
                        name=path.name,
                        storage_path=str(path.parent),
                        verbose=0,
                        failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                        callbacks=[_Watch(key), CSVLoggerCallback(), JsonLoggerCallback()],
                    ),
                )
            began = time.perf_counter()
            stage.began = time.time()
            log.debug("%s: fit", name)
            results = tuner.fit()
            log.debug("%s: fit returned", name)
            stage.seconds = round(time.perf_counter() - began, 1)
            for i in range(len(results)):
                stage.results[_path_of(results[i])] = results[i]
            stage.total = len(results)
            if results.num_terminated + results.num_errors < len(results):
                raise RuntimeError(
                    f"the {name} stage stopped with {len(results) - results.num_terminated - results.num_errors} "
                    f"of {len(results)} trials unfinished; run the search again to resume it ({path})"
                )
            return stage
        finally:
            if stage.bar is not None:
                stage.bar.close()
            _STAGES.pop(key, None)
