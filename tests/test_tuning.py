"""The path search on Ray Tune (issue #5), on a local 2-node cluster shared by the module.

One search with two injected faults, then the same search again (resumed), compared with the in-process
search of the same config (`searched_table`, which must run first: both engines write the same search dir).
"""

import tempfile
from pathlib import Path

import pytest
import ray
import torch

from coderay.links import load_links
from coderay.search import search_dir
from coderay.store import node_store

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster(trained_cfg, searched_table):
    from coderay.cluster import LocalCluster

    assert searched_table.meta["engine"] == "in-process"  # computed before Tune rewrites the search dir
    c = LocalCluster(trained_cfg)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def node_ids(cluster, trained_cfg):
    from coderay.cluster import alive_resources

    names = {n.name for n in trained_cfg.nodes}
    return {r: nid for nid, res in alive_resources().items() for r in res if r in names}


@pytest.fixture(scope="module")
def faults(searched_table):
    """The in-process best path fails its first attempt in both stages (the retry succeeds); the candidate
    predicted worst fails all 1 + max_failures attempts of stage 1 (and succeeds when resumed)."""
    rows = [r for r in searched_table.rows if r["kind"] in ("coop", "skip") and r["pred_reward"] is not None]
    best = searched_table.best("digits")["path_id"]
    worst = min(rows, key=lambda r: r["pred_reward"])["path_id"]
    assert best != worst
    return {"best": best, "worst": worst, "faults": {best: 1, worst: 3}}


def _checkpoint_temps() -> set[str]:
    """The trials' temporary checkpoint directories in this machine's temp dir."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("coderay-ckpt-*")}


@pytest.fixture(scope="module")
def checkpoint_temps() -> dict:
    return {"before": _checkpoint_temps()}


@pytest.fixture(scope="module")
def tune_runs(trained_cfg, cluster, faults, checkpoint_temps):
    from tuning.search import run_tune_search

    first = run_tune_search(trained_cfg, progress=False, resume=False, faults=faults["faults"])
    second = run_tune_search(trained_cfg, progress=False, faults=faults["faults"])
    checkpoint_temps["after"] = _checkpoint_temps()
    return first, second


def test_trials_leave_no_temporary_checkpoint(tune_runs, checkpoint_temps):
    """Every stage-2 epoch reports its links as a checkpoint from a temporary directory; Tune copies it into
    the experiment, and the trial removes its own copy (126 were left in /tmp after a day of searches)."""
    assert checkpoint_temps["after"] <= checkpoint_temps["before"]


def test_split_learning_matches_local_blocks(trained_cfg, search_ctx, cluster):
    """The local tail run by the local node's actor gives the same output and input gradient as in-process,
    and the host's stand-in for the local service holds no weights."""
    from tuning.split import local_side, remote_service, stop_side

    path = "digits:mnist:0:1:2:3"
    side = local_side(trained_cfg, "digits", create=True, paths=[path])
    try:
        svc = remote_service(trained_cfg, "digits", side, path)
        assert svc.model is None and len(svc.blocks) == len(search_ctx.services["digits"].blocks)
        (tail,) = svc.blocks[2:]
        assert sum(p.numel() for p in tail.parameters()) == 0
        real = torch.nn.Sequential(*search_ctx.services["digits"].blocks[2:])
        x = torch.randn(4, *svc.boundaries[2], generator=torch.Generator().manual_seed(0))
        xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yl = tail(xr), real(xl)
        torch.testing.assert_close(yr, yl)
        g = torch.randn_like(yl)
        yr.backward(g)
        yl.backward(g)
        torch.testing.assert_close(xr.grad, xl.grad)
        assert svc.boundaries == search_ctx.services["digits"].boundaries
        (wider,) = svc.blocks[1:]  # 2..5: not the path's tail (lin = 3)
        with pytest.raises(Exception, match="not a range of"):
            wider(torch.randn(2, *svc.boundaries[1]))
        (head,) = svc.blocks[:2]  # 1..lin-1: the link's target, allowed
        svc_input = torch.randn(2, *svc.boundaries[0])
        torch.testing.assert_close(
            head(svc_input), torch.nn.Sequential(*search_ctx.services["digits"].blocks[:2])(svc_input)
        )
        other = remote_service(trained_cfg, "digits", side, "digits:mnist:0:1:1:1")
        with pytest.raises(Exception, match="not a candidate"):
            other.blocks[:1][0](svc_input)
    finally:
        stop_side(trained_cfg, "digits")


def test_local_side_serves_concurrent_trials(trained_cfg, search_ctx, cluster):
    """Trials on different hosts call the local side at once: each caller's forward and backward pair up (a
    pending graph is the caller's own), and the gradients are those of the local blocks in this process."""
    from concurrent.futures import ThreadPoolExecutor

    from tuning.split import SIDE_THREADS, local_side, remote_service, stop_side

    assert SIDE_THREADS > 1
    paths = ["digits:mnist:0:1:2:3", "digits:mnist:0:1:1:2"]
    side = local_side(trained_cfg, "digits", create=True, paths=paths)
    blocks = search_ctx.services["digits"].blocks
    try:

        def trial(path: str, seed: int) -> None:
            lin = int(path.rsplit(":", 1)[1])
            (tail,) = remote_service(trained_cfg, "digits", side, path).blocks[lin - 1 :]
            real = torch.nn.Sequential(*blocks[lin - 1 :])
            gen = torch.Generator().manual_seed(seed)
            for _ in range(6):
                x = torch.randn(8, *search_ctx.services["digits"].boundaries[lin - 1], generator=gen)
                xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
                g = torch.randn(8, 10, generator=gen)
                tail(xr).backward(g)
                real(xl).backward(g)
                torch.testing.assert_close(xr.grad, xl.grad)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(trial, paths * 2, range(4)))
        busy = ray.get(side.stats.remote())
        assert busy["calls"] == 4 * 6 * 2 and busy["seconds"] >= busy["cpu_seconds"] > 0
    finally:
        stop_side(trained_cfg, "digits")


def test_trials_report_where_their_time_went(tune_runs, faults):
    """Each trial reports its phases (process start and imports, Tune's hand-over, services and data, the work
    and, of it, the local side's share); the meta sums them per stage over the trials that ran."""
    first, second = tune_runs
    tune = first.meta["tune"]
    p1, p2 = tune["phases"]["predict"], tune["phases"]["train"]
    assert p1["trials"] == tune["trials"]["predict"] - 1  # the worst candidate never reported
    assert p2["trials"] == tune["trials"]["train"]
    for p in (p1, p2):
        assert all(p[k] >= 0 for k in ("handover_s", "data_s", "cpu_s", "local_side_s"))
        assert p["process_s"] > 0 and p["work_s"] > 0 and p["first_trial_after_s"] > 0
    assert 0 < p1["local_side_calls"] + p2["local_side_calls"] <= tune["split_busy"]["digits"]["calls"]
    resumed = second.meta["tune"]["phases"]
    assert (resumed["predict"]["trials"], resumed["train"]["trials"]) == (1, 0)  # only what ran again


def test_table_and_links_land_where_serving_loads_them(trained_cfg, searched_table, tune_runs):
    from coderay.table import RewardTable

    table = tune_runs[1]
    out = search_dir(trained_cfg, exhaustive=False)
    on_disk = RewardTable.load(out)
    assert on_disk.meta["engine"] == "tune" and (out / "pareto.png").exists()
    assert [r["path_id"] for r in on_disk.rows] == [r["path_id"] for r in searched_table.rows]
    for mine, theirs in zip(table.rows, searched_table.rows):
        assert set(theirs) <= set(mine)
    trained = [r for r in table.rows if r["trained"] and r["kind"] in ("coop", "skip")]
    assert len(trained) == trained_cfg.search.top_k
    for r in trained:  # in the store of the node that trained them, named relative to it
        assert r["links_file"].startswith(f"links/{out.name}/")
        owner = r["host_node"] or r["local_node"]
        assert load_links(node_store(trained_cfg, owner) / r["links_file"])[0] == r["path_id"]


def test_trials_run_on_the_host_node(trained_cfg, tune_runs, node_ids):
    first, _ = tune_runs
    assert first.meta["tune"]["split_nodes"] == {"digits": node_ids["edge-a"]}  # local blocks stay local
    node_of = {s.name: s.node for s in trained_cfg.services}
    for r in first.rows:
        if r["kind"] not in ("coop", "skip", "local") or r.get("error"):
            continue
        where = node_ids[node_of[r["host"] if r["kind"] == "coop" else r["local"]]]
        assert r["predict_node_id"] == where, r["path_id"]
        if r["trained"] or r["kind"] == "local":
            assert r["train_node_id"] == where, r["path_id"]
    assert any(r["kind"] == "coop" and r["trained"] for r in first.rows)


def test_tune_matches_in_process_search(searched_table, tune_runs):
    """Same seeds, same functions: the same best path and the same accuracies (up to float noise) for every
    candidate path. (The edge-early baseline rows are not compared: its first exit head is initialised
    before the seed is set, so it differs between any two processes.)"""
    for table in tune_runs:
        assert table.best("digits")["path_id"] == searched_table.best("digits")["path_id"]
        for theirs in searched_table.for_service("digits"):
            mine = table.row(theirs["path_id"])
            if mine.get("error"):
                continue
            assert mine["trained"] == theirs["trained"], mine["path_id"]
            for key in ("pred_acc", "val_acc", "test_acc"):
                if theirs.get(key) is not None:
                    assert abs(mine[key] - theirs[key]) <= 0.03, (mine["path_id"], key)


def test_failing_trial_is_retried_then_reported(tune_runs, faults):
    first, _ = tune_runs
    tune = first.meta["tune"]
    best = first.row(faults["best"])  # failed once per stage, then succeeded
    assert not best.get("error") and best["reward"] is not None
    worst = first.row(faults["worst"])  # failed 3 times: reported, no reward
    assert "injected fault" in worst["error"] and worst["reward"] is None and worst["pred_reward"] is None
    assert tune["errors"] == {faults["worst"]: worst["error"]}
    assert tune["retries"] == 2 + 2  # best: 1 per stage; worst: max_failures


def test_resume_runs_no_finished_trial_again(tune_runs, faults):
    first, second = tune_runs
    tune = second.meta["tune"]
    assert tune["resumed"]
    assert tune["trials_run"] == {"predict": 1, "train": 0}  # only the errored trial, resumed
    assert tune["reports_run"]["train"] == 0  # no training epoch at all
    assert tune["errors"] == {}
    assert second.row(faults["worst"])["pred_acc"] is not None
    for a in first.rows:
        if a["path_id"] != faults["worst"]:
            b = second.row(a["path_id"])
            assert (a["val_acc"], a["test_acc"], a["pred_acc"]) == (b["val_acc"], b["test_acc"], b["pred_acc"])


def test_searcher_prunes_and_selects_as_in_process(trained_cfg, search_ctx, cluster):
    """Stage 1 on Tune with a bar that prunes (local-only's reward raised to the median bound; the tiny config's
    own bar is under every bound): candidates under their bar get no trial, a node runs one trial at a time, and
    and reuses one process; predicting one at a time from the trials' own predictions never needs one Tune pruned
    and selects the same rows."""
    import statistics
    from dataclasses import replace

    from coderay.candidate import SearchContext, candidates, reward_bound
    from coderay.search import Frontier, stage2_selection
    from tuning.search import TuneExecutor
    from tuning.split import local_side, stop_side

    cfg = trained_cfg.model_copy(update={"search": trained_cfg.search.model_copy(update={"top_k": 1})})  # own dir
    specs = candidates(search_ctx, "digits")
    bounds = [reward_bound(search_ctx, s) for s in specs if s.kind != "local"]
    local = reward_bound(search_ctx, specs[0], acc=search_ctx.services["digits"].metrics["val_acc"])
    assert specs[0].kind == "local"
    local_rows = {"digits": replace(local, pred_reward=statistics.median(b.pred_reward for b in bounds))}

    sides = {"digits": local_side(cfg, "digits", create=True, paths=[s.id for s in specs])}
    try:
        ctx = SearchContext(cfg, search_ctx.services)
        executor = TuneExecutor(
            ctx, exhaustive=False, resume=False, progress=False, early_stop=False, faults=None, sides=sides
        )
        rows = executor.predict(Frontier(bounds, local_rows, top_k=1, exhaustive=False))
    finally:
        stop_side(cfg, "digits")
    pruned = {pid for pid, r in rows.items() if r.get("pruned")}
    stage = executor.stages["predict"]
    assert pruned and executor.never_predicted == len(pruned) and not pruned & set(stage.results)
    assert len(stage.results) + len(pruned) == len(specs)

    spans: dict[str, list] = {}
    pids: dict[str, set] = {}
    for res in stage.results.values():
        assert res.error is None
        spans.setdefault(res.metrics["node_id"], []).append(
            (res.metrics["phases"]["began"], res.metrics["phases"]["ended"])
        )
        pids.setdefault(res.metrics["node_id"], set()).add(res.metrics["pid"])
    assert len(spans) == 2
    for node in spans.values():  # one CPU per node: one trial at a time
        node.sort()
        assert all(end <= nxt for (_, end), (nxt, _) in zip(node, node[1:]))
    assert all(len(p) == 1 for p in pids.values()), pids  # a node's trials reuse one process (its imports, data)

    one_by_one = Frontier(bounds, local_rows, top_k=1, exhaustive=False)
    while (spec := one_by_one.next()) is not None:
        one_by_one.record(rows[spec.id])  # KeyError: a candidate Tune pruned was worth predicting
    ref = one_by_one.result()
    assert stage2_selection(list(ref.values()), 1, False) == stage2_selection(list(rows.values()), 1, False)


def test_tune_trains_an_explored_candidate_with_the_explore_links(trained_cfg, cluster, tune_runs):
    """`search.explore` on Tune: one more candidate trained, on its host's node, with the explore variant and
    epochs (its trial builds the explore variant's links, not the search's first)."""
    from coderay.config import ExploreSpec, LinkVariant
    from tuning.search import run_tune_search

    explore = ExploreSpec(count=1, epochs=2, variants=[LinkVariant(capacity="bottleneck", distill=0.5)])
    cfg = trained_cfg.model_copy(update={"search": trained_cfg.search.model_copy(update={"explore": explore})})
    table = run_tune_search(cfg, progress=False, resume=False)
    explored = [r for r in table.for_service("digits") if r.get("explored")]
    assert len(explored) == 1
    row = explored[0]
    assert row["trained"] and row["link_variant"] == "bottleneck+distill0.5" and row["val_acc"] is not None
    assert row["epochs"] == 2 and not row.get("error")
    plain = [r for r in table.for_service("digits") if r["trained"] and r["kind"] != "local" and not r.get("explored")]
    assert plain and all(r["link_variant"] == "1x1" for r in plain)
