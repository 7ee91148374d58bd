"""Stage 2 beyond the top-k (`search.explore`): candidates of high modelled throughput whose least-squares
prediction undersells what a trained link reaches are trained too, with their own link variants and epochs."""

from pathlib import Path

from coderay.candidate import SearchContext, train_path, training_plan
from coderay.config import ExploreSpec, LinkVariant
from coderay.pathspec import PathSpec
from coderay.rows import Row
from coderay.search import PARTIAL, InProcess, explore_selection, finish_search, staged_search
from coderay.table import RewardTable


def _row(lin: int, hout: int, pred_acc: float, th_ratio: float) -> Row:
    spec = PathSpec("a", lout=0, lin=lin, host="h", hin=1, hout=hout)
    return Row.of(spec, pred_acc=pred_acc, th_ratio=th_ratio, pred_reward=0.0)


def test_explore_takes_the_fastest_candidates_within_reach_of_local_only():
    local = Row.of(PathSpec("a", lout=0, lin=1), pred_acc=0.99)
    rows = [
        local,
        _row(3, 2, 0.98, 1.6),  # already in the top-k
        _row(4, 3, 0.915, 2.8),  # within 0.10 of local-only: the fastest such
        _row(5, 4, 0.88, 3.1),  # faster, but out of reach
        _row(4, 2, 0.95, 2.2),
        _row(5, 3, 0.93, 2.4),
    ]
    picked = {rows[1].path_id}
    assert explore_selection(rows, picked, ExploreSpec(count=2)) == [rows[2].path_id, rows[5].path_id]
    assert explore_selection(rows, picked, ExploreSpec(count=1, reach=0.2)) == [rows[3].path_id]
    assert explore_selection(rows, picked, ExploreSpec(count=0)) == []
    assert explore_selection(rows, picked | {rows[2].path_id}, ExploreSpec(count=1)) == [rows[5].path_id]


def _exploring(ctx: SearchContext, count: int = 1) -> SearchContext:
    explore = ExploreSpec(count=count, epochs=2, variants=[LinkVariant(capacity="bottleneck", distill=0.5)])
    search = ctx.cfg.search.model_copy(update={"explore": explore})
    return SearchContext(ctx.cfg.model_copy(update={"search": search}), ctx.services)


def test_an_explored_candidate_trains_with_the_explore_variants_and_epochs(search_ctx, tmp_path):
    ctx = _exploring(search_ctx)
    spec = PathSpec("digits", lout=0, lin=4, host="mnist", hin=1, hout=3)
    plain = Row.of(spec, pred_acc=0.5)
    assert training_plan(ctx.cfg, plain) == (ctx.cfg.search.link_variants, ctx.cfg.search.link_epochs)
    seen: list[int] = []
    row, _ = train_path(
        ctx,
        spec,
        progress=False,
        links_dir=tmp_path,
        predicted=plain.with_extra(explored=True),
        on_epoch=lambda e, loss, acc: seen.append(e),
    )
    assert seen == [1, 2] and row.link_variant == "bottleneck+distill0.5"
    assert row.extra["explored"] is True and row.trained and row.val_acc is not None


def test_a_search_with_explore_trains_one_more_candidate_and_marks_it(search_ctx, searched_table, tmp_path):
    ctx = _exploring(search_ctx)
    table = staged_search(ctx, InProcess(ctx, progress=False), exhaustive=False, out=tmp_path / "explore")
    rows = table.for_service("digits")
    trained = {r["path_id"] for r in rows if r["trained"] and r["kind"] != "local"}
    before = {r["path_id"] for r in searched_table.for_service("digits") if r["trained"] and r["kind"] != "local"}
    explored = [r for r in rows if r.get("explored")]
    assert len(explored) == 1 and trained == before | {explored[0]["path_id"]}
    assert explored[0]["link_variant"] == "bottleneck+distill0.5"
    assert Path(table.meta["dir"]) == tmp_path / "explore"


def test_a_deferred_search_leaves_its_explored_candidates_and_baselines_then_finishes_to_the_same_table(
    search_ctx, tmp_path
):
    """`coderay up` serves the table without them first (`defer`); `finish_search` makes it the table a whole
    search makes, saved where `load_table` finds it."""
    ctx = _exploring(search_ctx)
    whole = staged_search(ctx, InProcess(ctx, progress=False), exhaustive=False, out=tmp_path / "whole")
    out = tmp_path / "deferred"
    first = staged_search(ctx, InProcess(ctx, progress=False), exhaustive=False, out=out, defer=True)
    explored = [r for r in whole.rows if r.get("explored")]
    assert first.meta["pending"] == {"explore": [explored[0].path_id], "baselines": ["digits"]}
    assert not first.row(explored[0].path_id).trained and not [r for r in first.rows if not r.is_path]
    assert (out / PARTIAL / "table.json").exists() and not (out / "table.json").exists()
    assert first.best("digits").path_id != explored[0].path_id  # served first: a path trained already

    done = finish_search(ctx, InProcess(ctx, progress=False), first, out=out)
    key = lambda t: [(r.path_id, r.trained, r.val_acc, r.test_acc, r.reward) for r in t.rows]  # noqa: E731
    assert key(done) == key(whole) and "pending" not in done.meta
    assert done.meta["summary"] == whole.meta["summary"]
    assert not (out / PARTIAL).exists() and (out / "table.json").exists()
    saved = RewardTable.load(out)
    assert key(saved) == key(whole)
