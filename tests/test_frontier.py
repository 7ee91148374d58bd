"""Stage 1's pruning: the reward bound is above what a fitted path earns, and the Frontier prunes only candidates
that could never be trained, so the selection and the best path are those of predicting every candidate."""

import copy
import random
from dataclasses import replace

import pytest

from coderay.candidate import build_path, candidates, path_costs, predict_path, reward_bound
from coderay.pathspec import PathSpec
from coderay.rows import Row
from coderay.search import Frontier, stage2_selection


def _row(local: str, lin: int, hout: int, reward: float | None, *, kind: str = "coop") -> Row:
    if kind == "local":
        return Row.of(PathSpec(local, lout=0, lin=1), pred_reward=reward)
    return Row.of(PathSpec(local, lout=0, lin=lin, host="h", hin=1, hout=hout), pred_reward=reward)


def _predict_all(frontier: Frontier, truth: dict[str, float]) -> dict[str, Row]:
    while (spec := frontier.next()) is not None:
        frontier.record(_row(spec.local, spec.lin, spec.hout or 0, truth[spec.id]))
    return frontier.result()


def _predict_concurrently(frontier: Frontier, truth: dict[str, float], rng: random.Random) -> dict[str, Row]:
    """As the Tune searcher does: a copy of the frontier hands out up to 3 candidates at once, passing over those
    whose node is busy (here: one trial per host block `hout`), predictions finish in any order, and the
    frontier settles with the rows the copy got."""
    mine, running, rows = copy.deepcopy(frontier), [], {}

    def free(spec: PathSpec) -> bool:
        return spec.hout not in {s.hout for s in running}

    while True:
        while len(running) < 3 and (spec := mine.next(accept=free)) is not None:
            running.append(spec)
        if not running:
            return frontier.settle(rows)
        spec = running.pop(rng.randrange(len(running)))
        rows[spec.id] = _row(spec.local, spec.lin, spec.hout or 0, truth[spec.id])
        mine.record(rows[spec.id])


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("engine", ["one at a time", "concurrent"])
def test_pruning_keeps_the_selection_of_predicting_everything(seed, engine):
    rng = random.Random(seed)
    top_k = rng.choice([1, 2, 3])
    local_reward = {"a": rng.uniform(0.2, 1.2), "b": rng.uniform(0.2, 1.2)}
    bounds, truth = [], {}
    for local in ("a", "b"):
        for lin in range(2, 6):
            for hout in range(1, 5):
                bound = rng.uniform(0.0, 2.0)
                row = _row(local, lin, hout, bound)
                bounds.append(row)
                truth[row.path_id] = bound * rng.choice([0.0, rng.uniform(0.3, 1.0), 1.0])  # never above the bound
    local_rows = {loc: _row(loc, 1, 0, r, kind="local") for loc, r in local_reward.items()}

    frontier = Frontier(bounds, local_rows, top_k=top_k, exhaustive=False)
    one_by_one = _predict_all(copy.deepcopy(frontier), truth)
    rows = one_by_one if engine == "one at a time" else _predict_concurrently(frontier, truth, rng)
    full = _predict_all(Frontier(bounds, local_rows, top_k=top_k, exhaustive=True), truth)

    assert set(rows) == set(full)  # every candidate has a row: predicted or pruned
    for local in ("a", "b"):
        mine = [r for r in rows.values() if r.local == local]
        everything = [r for r in full.values() if r.local == local]
        worth = {r.path_id for r in everything if r.pred_reward is not None and r.pred_reward > local_reward[local]}
        chosen = set(stage2_selection(mine, top_k, False)) & worth
        assert chosen == set(stage2_selection(everything, top_k, False)) & worth
    pruned = [r for r in rows.values() if r.extra.get("pruned")]
    assert all(r.pred_reward is None and r.pred_acc is None for r in pruned)
    assert not any(r.error for r in rows.values())
    predicted = {pid for pid, r in rows.items() if r.pred_reward is not None}
    assert predicted >= {pid for pid, r in one_by_one.items() if r.pred_reward is not None}  # out of order: more
    assert not any(r.extra.get("pruned") for r in full.values())  # exhaustive: nothing pruned


def test_the_bar_is_local_only_then_the_kth_prediction():
    local = {"a": _row("a", 1, 0, 0.9, kind="local")}
    bounds = [_row("a", 4, 1, 3.0), _row("a", 3, 1, 2.0), _row("a", 2, 1, 1.5), _row("a", 2, 2, 0.8)]
    f = Frontier(bounds, local, top_k=2, exhaustive=False)
    assert f.bar("a") == 0.9
    first = f.next()
    assert first is not None and first.id == bounds[0].path_id  # best bound first
    f.record(replace(bounds[0], pred_reward=1.6))
    assert f.bar("a") == 0.9  # one prediction of the two the bar waits for
    second = f.next()
    assert second is not None
    f.record(replace(bounds[1], pred_reward=1.7))
    assert f.bar("a") == 1.6  # the 2nd best prediction
    assert f.next() is None  # 1.5 and 0.8 cannot reach the top 2: pruned without a fit
    assert set(f.pruned) == {bounds[2].path_id, bounds[3].path_id}
    assert f.pruned[bounds[3].path_id].extra["reward_bound"] == 0.8


def test_the_reward_bound_is_above_the_fitted_path(search_ctx):
    """Free links and perfect accuracy: no fitted path of the tiny config earns more than its bound, and the bound's
    activation shapes (hence bytes on the wire) are those of the fitted links."""
    specs = [s for s in candidates(search_ctx, "digits") if s.kind != "local"]
    for spec in specs[:: max(1, len(specs) // 6)]:
        bound, row = reward_bound(search_ctx, spec), predict_path(search_ctx, spec)
        assert bound.th_total >= row.th_total > 0
        if row.pred_reward is not None:
            assert bound.pred_reward >= row.pred_reward
        costs = path_costs(search_ctx, build_path(search_ctx, spec)[0])
        assert (bound.costs.bytes_out, bound.costs.bytes_back) == (costs.bytes_out, costs.bytes_back)
        assert bound.costs.local_part <= costs.local_part and bound.costs.host_part <= costs.host_part


def test_local_only_bound_with_its_accuracy_is_its_prediction(search_ctx):
    spec = next(s for s in candidates(search_ctx, "digits") if s.kind == "local")
    acc = search_ctx.services["digits"].metrics["val_acc"]
    assert reward_bound(search_ctx, spec, acc=acc).pred_reward == pytest.approx(
        predict_path(search_ctx, spec).pred_reward
    )
