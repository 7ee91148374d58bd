"""Typed reward-table rows: one scoring function, a lossless JSON/CSV round trip, re-scoring without torch."""

import csv
import dataclasses
import json
import subprocess
import sys

import pytest

from coderay.config import NetworkSpec, RewardSpec
from coderay.rows import BaselineRow, Row, csv_columns, row_from_dict, score
from coderay.table import RewardTable
from coderay.throughput import PathCosts

COSTS = PathCosts(
    local_full=0.01,
    local_part=0.002,
    host_full=0.004,
    host_part=0.003,
    batch=32,
    guest_quota=8,
    bytes_out=3136,
    bytes_back=12544,
)
NET = NetworkSpec(bandwidth_mbps=200, rtt_ms=1)


def coop(**kw) -> Row:
    return Row(
        path_id="d:m:0:1:2:3",
        local="d",
        kind="coop",
        host="m",
        lout=0,
        hin=1,
        hout=2,
        lin=3,
        local_node="a",
        host_node="b",
        acc_local_val=0.99,
        acc_local_test=0.98,
        pred_acc=0.9,
        val_acc=0.97,
        test_acc=0.96,
        trained=True,
        costs=COSTS,
        **kw,
    )


def test_score_derives_every_output_from_the_inputs():
    row = score(coop(), RewardSpec(alpha=8), NET)
    # the throughput model written out for COSTS: the host's batch of B = 32 keeps s = 8 slots for guests, so it
    # takes t_H = 24 · 4 ms + 8 · 3 ms = 0.12 s and admits s / t_H guest samples/s, under the network's cap
    # (200 Mbit/s over 3136 + 12544 bytes a sample) and the local node's (1 / 2 ms of head and tail)
    t_batch = 24 * 0.004 + 8 * 0.003
    th_host = 8 / t_batch
    assert th_host < 200e6 / 8 / (3136 + 12544) and th_host < 1 / 0.002
    th_local = (1 - th_host * 0.002) / 0.01  # the local node's time left, at 10 ms a sample
    ratio = (th_local + th_host) / (1 / 0.01)  # over local-only's 100 samples/s
    assert (th_host, th_local, ratio) == pytest.approx((200 / 3, 260 / 3, 23 / 15))
    assert (row.th_host, row.th_local, row.th_total, row.th_ratio) == pytest.approx(
        (th_host, th_local, th_local + th_host, ratio)
    ) and row.bottleneck == "quota"
    assert (row.host_own_before, row.host_own_after) == pytest.approx((1 / 0.004, 24 / t_batch))
    assert row.latency_ms == pytest.approx((0.002 + 0.003 + (3136 + 12544) * 8 / 200e6) * 1e3 + 1)
    a_val = (th_local * 0.99 + th_host * 0.97) / (th_local + th_host)
    assert row.acc_avg == pytest.approx(a_val) and row.reward == pytest.approx(a_val**8 * ratio)
    assert row.pred_reward < row.reward  # predicted accuracy 0.90 < measured 0.97
    # new measurements re-score the row: a slower host part lowers Th^h and the reward
    slower = score(dataclasses.replace(row, costs=dataclasses.replace(COSTS, host_part=0.03)), RewardSpec(alpha=8), NET)
    assert slower.th_host < row.th_host and slower.reward < row.reward
    # a reward floor zeroes a path whose average accuracy falls too far
    floor = score(dataclasses.replace(row, val_acc=0.5), RewardSpec(alpha=8, accuracy_floor=0.02), NET)
    assert floor.reward == 0


def test_rows_read_as_mappings_and_carry_engine_facts_in_extra():
    row = coop().with_extra(predict_node_id="n1")
    assert row["kind"] == "coop" and row.get("error") is None and row["predict_node_id"] == "n1"
    assert "predict_node_id" in set(row) and "extra" not in set(row)
    with pytest.raises(KeyError):
        row["no_such_column"]


def test_table_round_trips_through_json_and_csv(tmp_path):
    base = BaselineRow(
        path_id="d:edge-early:m:1:3",
        local="d",
        kind="edge-early",
        host="m",
        lout=1,
        hin=2,
        hout=3,
        lin=None,
        exit_after=3,
        local_node="a",
        host_node="b",
        acc_local_val=0.99,
        acc_local_test=0.98,
        val_acc=0.95,
        test_acc=0.94,
        costs=COSTS,
        mirrored_params=1234,
    )
    rows = [
        score(coop(), RewardSpec(), NET).with_extra(node="b"),
        score(base, RewardSpec(), NET),
        Row(path_id="d:m:0:1:1:1", local="d", kind="coop", host="m", error="injected fault"),
    ]
    table = RewardTable(rows, {"engine": "test"})
    table.save(tmp_path)
    back = RewardTable.load(tmp_path)
    assert back.rows == rows and back.rows[0]["node"] == "b"
    assert isinstance(back.rows[1], BaselineRow) and back.baselines("d") == [back.rows[1]]
    assert [r.path_id for r in back.for_service("d")] == ["d:m:0:1:2:3", "d:m:0:1:1:1"]
    with open(tmp_path / "table.csv") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0]) == csv_columns() and float(lines[0]["cost_host_part"]) == COSTS.host_part
    assert row_from_dict(json.loads(json.dumps(rows[0].to_dict()))) == rows[0]
    # re-scored with another reward shape: every reward changes, nothing else needed
    rescored = back.rescored(RewardSpec(alpha=1), NET)
    assert rescored.rows[0].reward > back.rows[0].reward and rescored.rows[2].reward is None


@pytest.mark.parametrize(
    "module",
    ["coderay.table", "coderay.rows", "coderay.plan", "coderay.pathspec", "coderay.routing", "coderay.controller"],
)
def test_the_table_routing_and_controller_need_no_torch(module):
    """The controller is a detached actor on the head: loading torch there costs seconds and memory for nothing."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_failed_row_keeps_identity():
    from coderay.pathspec import PathSpec

    row = Row.failed(PathSpec.parse("d:m:0:1:2:3"), "boom")
    assert (row.kind, row.hout, row.error, row.reward) == ("coop", 2, "boom", None)
