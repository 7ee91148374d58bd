"""The controller's state file and its per-replica tables, without Ray: real files under tmp_path, a real
`Controller` run in-process, a real killed writer. A file that does not fit is set aside and the controller starts
fresh; a good file comes back exactly; a write leaves the old or the new state, never a part; silent ingress
replicas are forgotten."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coderay import controller as ctl_mod
from coderay.config import CoderayConfig
from coderay.controller import (
    REPLICA_GONE_S,
    STATE_SCHEMA,
    Controller,
    StateMismatch,
    parse_state,
    read_state,
    remove_stale_temps,
    stale_replicas,
    state_path,
    table_key,
    write_state,
)
from coderay.policy import Measurements, NodeLoad
from coderay.routing import initial_routes
from coderay.rows import Row, score
from coderay.throughput import PathCosts

REPO = Path(__file__).resolve().parents[1]
COOP = "digits:mnist:0:1:3:4"
STATS = {
    "services": {"digits": {"requests": 4, "samples": 8, "fallbacks": 0, "latency_s": 0.2, "by_path": {}}},
    "pinned": [],
    "routes": {},
}


@pytest.fixture
def cfg(tmp_path) -> CoderayConfig:
    return CoderayConfig.model_validate(
        {
            "workdir": str(tmp_path / "work"),
            "nodes": [{"name": "edge-a"}, {"name": "edge-b"}],
            "network": {"bandwidth_mbps": 1000, "rtt_ms": 1},
            "services": [
                {"name": "digits", "arch": "small_cnn", "task": "digits", "node": "edge-a"},
                {"name": "mnist", "arch": "small_cnn", "task": "mnist5k", "node": "edge-b", "guest_quota": 8},
            ],
        }
    )


def table(cfg: CoderayConfig) -> list[Row]:
    """digits: local-only (10 ms a sample) and one cooperative path through mnist's blocks; mnist: local-only."""
    costs = PathCosts(
        local_full=0.01,
        local_part=0.002,
        host_full=0.004,
        host_part=0.003,
        batch=16,
        guest_quota=8,
        bytes_out=1568,
        bytes_back=2048,
    )
    rows = [
        Row(
            path_id="digits:local",
            local="digits",
            kind="local",
            local_node="edge-a",
            acc_local_val=0.99,
            val_acc=0.99,
            trained=True,
            costs=PathCosts(local_full=0.01, local_part=0.01),
        ),
        Row(
            path_id=COOP,
            local="digits",
            kind="coop",
            host="mnist",
            lout=0,
            hin=1,
            hout=3,
            lin=4,
            local_node="edge-a",
            host_node="edge-b",
            acc_local_val=0.99,
            val_acc=0.975,
            trained=True,
            links_file="/links/coop.pt",
            costs=costs,
        ),
        Row(
            path_id="mnist:local",
            local="mnist",
            kind="local",
            local_node="edge-b",
            acc_local_val=0.98,
            val_acc=0.98,
            trained=True,
            costs=PathCosts(local_full=0.004, local_part=0.004),
        ),
    ]
    return [score(r, cfg.reward, cfg.network) for r in rows]


def lived(cfg: CoderayConfig) -> Controller:
    """A controller with a history: three intervals measured (digits' node slower than profiled), digits moved
    off local-only, so its queues, slowdowns, rows and logs all differ from a fresh one."""
    c = Controller(cfg, table(cfg), run=False)
    c.policy.current["digits"] = ("digits:local", 0.0)
    c.policy.since.clear()
    t0 = time.time()
    for i in range(3):
        m = Measurements(
            t=t0 + i,
            dt=1.0,
            arrivals={"digits": 100.0, "mnist": 10.0},
            nodes={
                "edge-a": NodeLoad(own_samples=100, compute_s=1.5),
                "edge-b": NodeLoad(own_samples=10, compute_s=0.04),
            },
        )
        decisions = c.policy.step(m)
        c.decisions.extend(decisions)
        c.switches.extend(d for d in decisions if d.switched)
        c.live_rows = c.policy.live_rows()
        c.ticks += 1
    c.restarts = 2
    return c


def good_doc(cfg: CoderayConfig) -> dict:
    """A state file's contents as a controller with a history writes them, through JSON."""
    doc = json.loads(json.dumps(lived(cfg).state_doc()))
    assert doc["switches"] and doc["policy"]["slowdown"] and doc["ticks"] == 3  # not a fresh state
    return doc


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------- a file that does not fit


def _truncated(doc: dict) -> bytes:
    data = json.dumps(doc).encode()
    return data[: len(data) // 2]


def _mutated(change: Callable[[dict], object]) -> Callable[[dict], bytes]:
    def apply(doc: dict) -> bytes:
        change(doc)
        return json.dumps(doc).encode()

    return apply


BAD = {  # case: (how the good file is spoilt, what the warning must say)
    "truncated": (_truncated, "not valid JSON"),
    "not an object": (lambda doc: b"[1, 2]", "expected a JSON object"),
    "ticks a string": (_mutated(lambda d: d.update(ticks="3")), "ticks is '3', not int"),
    "a queue a string": (
        _mutated(lambda d: d["policy"]["q_local"].update(digits="lots")),
        "policy.q_local['digits'] is 'lots'",
    ),
    "a row's reward a string": (_mutated(lambda d: d["rows"][0].update(reward="high")), "rows[0]: reward is 'high'"),
    "a row's costs incomplete": (_mutated(lambda d: d["rows"][1]["costs"].pop("local_part")), "rows[1]: costs"),
    "a decision's share a string": (
        _mutated(lambda d: d["decisions"][0].update(share="0.5")),
        "decisions[0]: share is '0.5'",
    ),
    "older code: no schema": (_mutated(lambda d: d.pop("schema")), "schema None"),
    "older code: no switches": (_mutated(lambda d: d.pop("switches")), "switches missing"),
    "older code: decisions renamed": (
        _mutated(lambda d: d.update(decision_log=d.pop("decisions"))),
        "decisions missing",
    ),
    "older code: a decision field missing": (
        _mutated(lambda d: d["decisions"][0].pop("previous_share")),
        "decisions[0]: previous_share missing",
    ),
    "another table": (_mutated(lambda d: d.update(table_key="0123abcd")), "another reward table"),
    "a row not in the table": (
        _mutated(lambda d: d["rows"][0].update(path_id="digits:gone")),
        "not the reward table's paths",
    ),
    "a current path not in the table": (
        _mutated(lambda d: d["policy"]["current"].update(digits=["digits:x", 0.5])),
        "'digits:x', not in the reward table",
    ),
    "a service not configured": (
        _mutated(lambda d: d["policy"]["current"].update(cifar=["cifar:local", 0.0])),
        "service 'cifar'",
    ),
    "older code: no move checks": (_mutated(lambda d: d["policy"].pop("trial")), "policy.trial missing"),
    "a move under check without its rate": (
        _mutated(lambda d: d["policy"]["trial"].update(digits={"path": "digits:local", "share": 0.0})),
        "policy.trial['digits']",
    ),
    "a measured rate a string": (
        _mutated(lambda d: d["policy"]["measured"].update(digits={"rates": {"digits:local@0": "fast"}, "until": 1.0})),
        "policy.measured['digits']",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_state_file_that_does_not_fit_is_set_aside_and_the_actor_starts_fresh(cfg, case, caplog):
    spoil, reason = BAD[case]
    path = state_path(cfg)
    path.parent.mkdir(parents=True)
    bad = spoil(good_doc(cfg))
    path.write_bytes(bad)
    caplog.set_level(logging.WARNING, logger="coderay.controller")
    c = Controller(cfg, table(cfg), run=True)  # the actor's path: set aside, then write a fresh state
    c.stop()
    assert not c.reloaded and c.ticks == 0 and not c.decisions and not c.switches
    assert c.policy.routes == {svc: dict(r) for svc, r in initial_routes(cfg, table(cfg)).items()}
    aside = [p for p in path.parent.iterdir() if p.name.startswith("state.json.bad-")]
    assert len(aside) == 1 and aside[0].read_bytes() == bad
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in w and reason in w and aside[0].name in w for w in warned), warned
    fresh = parse_state(
        json.loads(path.read_text()), key=c.key, services=c.services, path_ids=[r.path_id for r in c.base_rows]
    )
    assert fresh.ticks == 0 and fresh.decisions == []


def test_parse_state_names_the_misfit_for_every_spoilt_file(cfg):
    """Each case above is caught by the one check, not later: `parse_state` (or JSON) refuses it."""
    rows = table(cfg)
    for case, (spoil, reason) in BAD.items():
        try:
            doc = json.loads(spoil(good_doc(cfg)))
        except ValueError:
            assert case == "truncated"
            continue
        with pytest.raises(StateMismatch) as err:
            parse_state(doc, key=table_key(cfg, rows), services={"digits", "mnist"}, path_ids=[r.path_id for r in rows])
        assert reason in str(err.value), (case, str(err.value))


def test_a_reader_leaves_a_bad_file_in_place_and_starts_fresh(cfg, caplog):
    path = state_path(cfg)
    path.parent.mkdir(parents=True)
    bad = _truncated(good_doc(cfg))
    path.write_bytes(bad)
    caplog.set_level(logging.WARNING, logger="coderay.controller")
    c = Controller(cfg, table(cfg), run=False)
    assert not c.reloaded and c.ticks == 0
    assert files(path.parent) == ["state.json"] and path.read_bytes() == bad
    assert any(str(path) in r.getMessage() and "left in place" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- a file that fits


def test_a_good_state_file_round_trips_exactly(cfg, caplog):
    before = lived(cfg)
    write_state(state_path(cfg), before.state_doc())
    written = json.loads(state_path(cfg).read_text())
    caplog.set_level(logging.WARNING, logger="coderay.controller")
    after = Controller(cfg, table(cfg), run=False)
    assert after.reloaded and not caplog.records
    again = json.loads(json.dumps(after.state_doc()))
    volatile = {"saved_at", "version", "measurements"}  # a new write time; the routes' version moves on
    assert {k: v for k, v in again.items() if k not in volatile} == {
        k: v for k, v in written.items() if k not in volatile
    }
    assert again["version"] == written["version"] + 1
    assert after.live_rows == before.live_rows and list(after.switches) == list(before.switches)
    assert after.policy.state() == json.loads(json.dumps(before.policy.state()))
    assert files(state_path(cfg).parent) == ["state.json"]


# ---------------------------------------------------------------------- the writer


def test_the_writer_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        steps.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else f"fsync file of {os.fstat(fd).st_size} B")
        real_fsync(fd)

    def replace(src, dst) -> None:
        steps.append(f"replace onto {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(ctl_mod.os, "fsync", fsync)
    monkeypatch.setattr(ctl_mod.os, "replace", replace)
    doc = {"schema": STATE_SCHEMA, "ticks": 1, "text": "x" * 1000}
    write_state(path, doc)
    size = len(json.dumps(doc).encode())
    assert steps == [f"fsync file of {size} B", "replace onto state.json", "fsync dir"]
    assert json.loads(path.read_text()) == doc and files(tmp_path) == ["state.json"]


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_a_write_that_fails_leaves_the_old_state_whole_and_no_temp_file(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "state.json"
    old = {"schema": STATE_SCHEMA, "ticks": 1}
    write_state(path, old)

    def boom(*args) -> None:
        raise OSError(f"{fail_at} failed")

    monkeypatch.setattr(ctl_mod.os, fail_at, boom)
    with pytest.raises(OSError, match=f"{fail_at} failed"):
        write_state(path, {"schema": STATE_SCHEMA, "ticks": 2, "big": ["y" * 100] * 100})
    assert json.loads(path.read_text()) == old and files(tmp_path) == ["state.json"]


def test_a_writer_killed_before_the_rename_leaves_the_old_state_and_its_temp_is_cleared(tmp_path):
    path = tmp_path / "state.json"
    old = {"schema": STATE_SCHEMA, "ticks": 1}
    write_state(path, old)
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from coderay import controller\n"
        "controller.os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)\n"
        "controller.write_state(Path(sys.argv[1]), {'schema': 2, 'ticks': 2, 'big': ['z' * 100] * 100})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, timeout=120, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert json.loads(path.read_text()) == old
    left = [p for p in tmp_path.iterdir() if p.name != "state.json"]
    assert len(left) == 1 and json.loads(left[0].read_text())["ticks"] == 2  # the new state, complete, unrenamed
    assert remove_stale_temps(path) == left and files(tmp_path) == ["state.json"]


def test_the_actor_clears_a_killed_writers_temp_file_at_start(cfg):
    path = state_path(cfg)
    write_state(path, good_doc(cfg))
    leftover = path.parent / f".{path.name}.k1ll3d.tmp"
    leftover.write_text('{"partial')
    c = Controller(cfg, table(cfg), run=True)
    c.stop()
    assert c.reloaded and files(path.parent) == ["state.json"]


def test_read_state_without_a_file_is_a_fresh_start_without_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="coderay.controller")
    assert read_state(tmp_path / "state.json", key="k", services=["digits"], path_ids=[]) is None
    assert not caplog.records and files(tmp_path) == []


# ---------------------------------------------------------------------- ingress replicas that are gone


def test_stale_replicas_are_those_silent_beyond_the_bound():
    now = 1000.0
    seen = {"gone": now - REPLICA_GONE_S - 0.1, "late": now - REPLICA_GONE_S + 0.1, "live": now}
    assert stale_replicas(seen, now) == ["gone"]
    assert stale_replicas(seen, now, after_s=0.05) == ["gone", "late"]


def test_the_controller_forgets_replicas_gone_silent_and_keeps_live_ones(cfg):
    c = Controller(cfg, table(cfg), run=False)
    for rid in ("r-live", "r-gone"):
        c.sync(rid, STATS)
    c.ingress["r-gone"]["seen"] -= REPLICA_GONE_S + 1  # its last call, long ago
    c._prev_ingress.update({"r-live": STATS, "r-gone": STATS, "r-older": STATS})  # what the last tick kept
    assert c.prune_replicas(time.time()) == ["r-gone"]
    assert set(c.ingress) == {"r-live"} and set(c._prev_ingress) == {"r-live"}
    assert set(c.status()["ingress_replicas"]) == {"r-live"}
    c.sync("r-gone", STATS)  # a replica that comes back is counted again
    assert c.prune_replicas(time.time()) == [] and set(c.ingress) == {"r-live", "r-gone"}
