"""The reward table as the CLI prints it."""

import statistics
from dataclasses import replace

from coderay.candidate import candidates, reward_bound
from coderay.search import Frontier
from coderay.table import RewardTable


def test_pruned_rows_show_no_throughput(search_ctx):
    """A pruned row keeps its reward bound's costs (free links), whose throughput no path reaches: the table
    marks it pruned and leaves Th/s and ×local blank, while a predicted row shows its own."""
    specs = candidates(search_ctx, "digits")
    local = next(s for s in specs if s.kind == "local")
    bounds = [reward_bound(search_ctx, s) for s in specs if s.kind != "local"]
    bar = statistics.median(b.pred_reward for b in bounds)  # local-only's reward set so half the bounds fall under it
    local_row = replace(
        reward_bound(search_ctx, local, acc=search_ctx.services["digits"].metrics["val_acc"]), pred_reward=bar
    )
    frontier = Frontier(bounds, {"digits": local_row}, top_k=len(bounds), exhaustive=False)
    handed = {b.path_id: b for b in bounds}
    while (spec := frontier.next()) is not None:
        frontier.record(handed[spec.id])  # predicted as its bound
    table = RewardTable(list(frontier.result().values()))
    assert frontier.pruned and frontier.rows

    lines = {line.split()[0]: line.split() for line in table.format("digits").splitlines()[2:]}
    for pid in frontier.pruned:
        assert table.row(pid).th_total is not None  # the bound's, which the table must not show
        assert lines[pid][2] == "pruned" and lines[pid][7:9] == ["-", "-"], lines[pid]
    for pid in frontier.rows:
        assert lines[pid][2] == "no" and float(lines[pid][7]) > 0 and float(lines[pid][8]) > 0, lines[pid]
