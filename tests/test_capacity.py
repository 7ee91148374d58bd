"""CPU caps for emulated nodes: real busy processes under a node's quota, clean-up, the budget, refusal."""
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from coderay import capacity
from coderay.config import NodeSpec

REPO = Path(__file__).resolve().parent.parent
BURN_S = 3.0

# A child that starts `threads` busy threads, joins the node (moving the threads already running), then
# measures its own CPU time over BURN_S seconds of wall time starting at the shared `start` instant.
CHILD = textwrap.dedent("""
    import json, sys, threading, time
    from coderay import capacity
    node, share, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[5])
    start, burn_s = float(sys.argv[3]), float(sys.argv[4])
    stop = time.time() + 3600
    def spin():
        while time.time() < stop:
            pass
    for _ in range(threads):
        threading.Thread(target=spin, daemon=True).start()
    result = capacity.join(node, share)
    c_join = time.process_time()
    again = capacity.join(node, share)   # idempotent
    while time.time() < start:
        time.sleep(0.005)
    t0, c0 = time.time(), time.process_time()
    stop = start + burn_s
    spin()
    wall, cpu = time.time() - t0, time.process_time() - c0
    print(json.dumps({"join": result.as_dict(), "again": again.as_dict(), "cpu": cpu, "wall": wall,
                      "cpu_since_join": time.process_time() - c_join}))
""")


def _skip_unless_caps() -> capacity.Detection:
    det = capacity.detect(refresh=True)
    if not det.available:
        pytest.skip(f"the OS refuses CPU caps: {det.reason}")
    return det


@pytest.fixture
def session(monkeypatch):
    """A private capacity session; every group it made is removed (processes evicted) afterwards."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(capacity.SESSION_ENV, name)
    monkeypatch.delenv(capacity.ROOT_ENV, raising=False)
    monkeypatch.delenv(capacity.SWITCH_ENV, raising=False)
    yield name
    capacity.cleanup(name, evict=True)
    det = capacity.detect()
    if det.available:
        assert not (det.cpu_root / capacity.PARENT / name).exists(), "stale cgroup left behind"


def _children(node: str, share: float, n: int, threads: int = 0) -> list[dict]:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    start = time.time() + 0.5  # every child has joined by then (they import only the stdlib)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, node, str(share), str(start), str(BURN_S),
                               str(threads)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=30)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


FLOOR = 0.5  # of the share: a busy machine can leave a group below its quota; a cap far too tight cannot pass


def _measured(node: str, share: float, n: int, threads: int = 0, attempts: int = 3) -> tuple[str, list[dict]]:
    """Children of one node measured until they got their share within ±20% (at most `attempts` times, each
    in a group of its own). A quota is a ceiling: no attempt may exceed it, but a machine busy with other work
    can leave a group below it, which only a quieter attempt tells apart from a cap that is too tight; the
    tests then accept down to FLOOR of the share (the kernel's own throttling counts say the cap bound)."""
    for i in range(attempts):
        name = f"{node}-{i}"
        rs = _children(name, share, n, threads)
        got = sum(r["cpu"] / r["wall"] for r in rs)
        assert got <= share * 1.2, f"attempt {i}: {got:.3f} CPU used above a {share} CPU quota; joins: " + \
            "; ".join(json.dumps(r["join"]) for r in rs)
        if share * 0.8 <= got:
            break
    return name, rs


def test_busy_multithreaded_process_gets_its_share(session):
    det = _skip_unless_caps()
    share = 0.25
    node, (r,) = _measured("edge-small", share, 1, threads=2)  # main thread + 2 spinning threads, 3 x uncapped
    got = r["cpu"] / r["wall"]
    print(f"{det.kind}: share {share} asked, {got:.3f} got (1 process, {r['join']['threads_total']} threads)")
    assert r["join"]["mechanism"] == det.kind and r["join"]["capped"]
    assert r["join"]["threads"] == r["join"]["threads_total"] >= 3  # threads running before join moved too
    assert r["again"]["group"] == r["join"]["group"]
    assert share * FLOOR <= got <= share * 1.2
    used = capacity.usage(node)
    assert used.mechanism == det.kind and used.share == pytest.approx(share)
    assert used.nr_throttled > 0
    if used.cpu_s is not None:  # v1 without cpuacct cannot say; the group also counts the child's exit
        assert used.cpu_s == pytest.approx(r["cpu_since_join"], rel=0.1, abs=0.3)


def test_processes_of_one_node_share_its_quota(session):
    det = _skip_unless_caps()
    share = 0.3
    node, rs = _measured("edge-pair", share, 2)
    got = [r["cpu"] / r["wall"] for r in rs]
    print(f"{det.kind}: node share {share} asked, {sum(got):.3f} got by 2 processes together ({got})")
    assert rs[0]["join"]["group"] == rs[1]["join"]["group"]
    assert share * FLOOR <= sum(got) <= share * 1.2
    used = capacity.usage(node)
    if used.cpu_s is not None:
        assert used.cpu_s == pytest.approx(sum(r["cpu_since_join"] for r in rs), rel=0.1, abs=0.3)


def test_cleanup_removes_groups(session):
    det = _skip_unless_caps()
    gone = subprocess.run([sys.executable, "-c", "from coderay import capacity; capacity.join('edge-gone', 0.2)"],
                          env=os.environ | {"PYTHONPATH": str(REPO)}, check=True)
    assert gone.returncode == 0
    alive = subprocess.Popen([sys.executable, "-c", "import sys, time; from coderay import capacity; "
                              "capacity.join('edge-alive', 0.2); print('in', flush=True); time.sleep(60)"],
                             env=os.environ | {"PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout.readline().strip() == "in"
        groups = det.cpu_root / capacity.PARENT / session
        assert (groups / "edge-gone").is_dir() and capacity.group_pids("edge-alive") == [alive.pid]
        removed = capacity.cleanup(session)  # the exited process's group goes, the live one stays
        assert str(groups / "edge-gone") in removed and not (groups / "edge-gone").exists()
        assert (groups / "edge-alive").is_dir()
        capacity.cleanup(session, evict=True)  # the live process is moved out, uncapped, and lives on
        assert not groups.exists() and alive.poll() is None
    finally:
        alive.kill()
        alive.wait()


def test_plan_shares_budget_rule():
    # tiny config on this machine: demand 1*1 + 1*2 = 3 reference CPUs, 1.5 available beside the reserve
    plan = capacity.plan_shares([("edge-a", 1, 1.0), ("edge-b", 1, 2.0)], machine_cpus=2, reserve=0.5)
    assert plan.scale == pytest.approx(0.5) and plan.total == pytest.approx(1.5)
    assert plan.shares == pytest.approx({"edge-a": 0.5, "edge-b": 1.0})
    assert plan.shares["edge-b"] / plan.shares["edge-a"] == pytest.approx(2.0)  # speed 2 computes twice as fast
    # plenty of CPUs: real time, but the fastest core still has to fit in one real core
    assert capacity.plan_shares([("a", 2, 0.5), ("b", 1, 1.0)], 64, 1).shares == {"a": 1.0, "b": 1.0}
    fast = capacity.plan_shares([("a", 1, 1.0), ("b", 1, 4.0)], 64, 1)
    assert fast.scale == pytest.approx(0.25) and fast.limited_by == "fastest core"
    # the budget binds: three 1-CPU nodes on 2 cores with 0.5 reserved
    tight = capacity.plan_shares([NodeSpec(name=n, cpus=1, speed=1) for n in "xyz"], 2, 0.5)
    assert tight.limited_by == "machine budget" and tight.total == pytest.approx(1.5)
    assert tight.shares["x"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no CPU left"):
        capacity.plan_shares([("a", 1, 1)], 2, 2)
    with pytest.raises(ValueError, match="min_share"):
        capacity.plan_shares([("a", 1, 1), ("b", 1000, 1)], 2, 0.5, min_share=0.01)
    with pytest.raises(ValueError, match="duplicate"):
        capacity.plan_shares([("a", 1, 1), ("a", 1, 1)], 2, 0.5)


def test_refusal_is_reported_and_warned_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(capacity.ROOT_ENV, str(tmp_path / "missing"))
    caplog.set_level(logging.WARNING, logger="coderay.capacity")
    first = capacity.join("edge-small", 0.3)
    second = capacity.join("edge-small", 0.3)
    assert first.mechanism.startswith("none: ") and "does not exist" in first.mechanism
    assert not first.capped and first.effective_share is None and second.mechanism == first.mechanism
    assert len([r for r in caplog.records if "UNCAPPED" in r.message]) == 1
    assert capacity.usage("edge-small").cpu_s is None and capacity.cleanup() == []

    monkeypatch.setenv(capacity.ROOT_ENV, str(tmp_path))  # a plain directory is no cgroup controller
    assert capacity.join("edge-small", 0.3).mechanism.startswith("none: ")
    assert "not a cgroup cpu controller" in capacity.detect().reason and list(tmp_path.iterdir()) == []
    monkeypatch.delenv(capacity.ROOT_ENV)
    monkeypatch.setenv(capacity.SWITCH_ENV, "off")
    assert capacity.join("edge-small", 0.3).mechanism == "none: disabled by CODERAY_CAPACITY=off"
    with pytest.raises(ValueError, match="share"):
        capacity.join("edge-small", 0)


def test_ray_actor_joined_in_init_gets_node_share(monkeypatch):
    """bench/capacity_check.py in its own process (its own Ray): a multi-threaded Ray worker is capped whole."""
    det = _skip_unless_caps()
    monkeypatch.delenv(capacity.SESSION_ENV, raising=False)
    try:
        run = subprocess.run([sys.executable, str(REPO / "bench" / "capacity_check.py"), "--json", "--share",
                              "0.3", "--burn-s", "1.2"], capture_output=True, text=True, timeout=120,
                             env=os.environ | {"PYTHONPATH": str(REPO)})
    finally:
        capacity.cleanup(all_sessions=True)  # had the script died: its groups are empty now, remove them
    assert run.returncode in (0, 1), run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    one, two = r["one_actor"], r["two_actors"]
    print(f"{r['mechanism']}: Ray actor share 0.3 asked, {one['got']:.3f} got ({one['threads_inside']}/"
          f"{one['threads']} threads in group); 2 actors of one node {two['got']:.3f} together")
    assert r["mechanism"] == det.kind
    assert one["threads_inside"] == one["threads"] > 5  # gRPC and Ray's own threads moved with the worker
    assert two["threads_inside"] == two["threads"]
    assert 0.3 * FLOOR <= one["got"] <= 0.36 and 0.3 * FLOOR <= two["got"] <= 0.36
    assert not r["stale"]


def test_v2_layout_on_a_fake_tree(tmp_path, monkeypatch):
    """No cgroup v2 cpu controller here: check the v2 files written and read on a fake tree. The move itself
    cannot happen in a plain directory, and join says so instead of claiming a cap."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for d in (tmp_path, tmp_path / capacity.PARENT, tmp_path / capacity.PARENT / "fake"):  # the kernel makes these
        d.mkdir(exist_ok=True)
        (d / "cgroup.subtree_control").write_text("")
    monkeypatch.setenv(capacity.ROOT_ENV, str(tmp_path))
    monkeypatch.setenv(capacity.SESSION_ENV, "fake")
    assert capacity.detect(refresh=True).kind == capacity.V2
    r = capacity.join("edge-v2", 0.3)
    group = tmp_path / capacity.PARENT / "fake" / "edge-v2"
    assert (group / "cpu.max").read_text() == "6000 20000"
    assert all((d / "cgroup.subtree_control").read_text() == "+cpu"
               for d in (tmp_path, group.parent.parent, group.parent))
    assert r.mechanism.startswith("none: cgroup-v2 refused") and "stayed outside" in r.mechanism
    (group / "cpu.stat").write_text("usage_usec 1500000\nnr_periods 10\nnr_throttled 4\nthrottled_usec 250000\n")
    used = capacity.usage("edge-v2")
    assert (used.cpu_s, used.nr_throttled, used.throttled_s, used.share) == (1.5, 4, 0.25, 0.3)


def _thread_group() -> str:
    """This thread's cpu group, as the kernel reports it (cgroup v1: a group per thread)."""
    for line in Path("/proc/thread-self/cgroup").read_text().splitlines():
        _, controllers, where = line.split(":", 2)
        if "cpu" in controllers.split(",") or controllers == "":
            return where
    return ""


def test_capped_profile_is_the_node_time_of_each_blocks_cpu(session):
    """`sustained_block_ms` under a node's quota: each block runs inside the node's group and its figure is its
    CPU time per pass over the node's share (the throughput model's unit: time on that node). The CPU clock is
    the test's own (each block costs a known number of CPU seconds), so the arithmetic is checked without timing
    anything; the thread is back outside the group afterwards. Real timings are bench/capacity_check.py's."""
    _skip_unless_caps()
    import torch

    from coderay.config import load_config
    from coderay.emulation import node_capacity
    from coderay.services import sustained_block_ms

    cfg = load_config(REPO / "configs" / "demo.yaml")
    spec = cfg.service("digits")
    share = node_capacity(cfg)[spec.node].share
    clock = {"cpu_s": 0.0}
    seen: list[str] = []

    class Costly(torch.nn.Module):
        def __init__(self, cpu_s: float):
            super().__init__()
            self.cpu_s = cpu_s

        def forward(self, x):
            seen.append(_thread_group())
            clock["cpu_s"] += self.cpu_s
            return x + 1

    before = _thread_group()
    node_ms = sustained_block_ms(cfg, spec, [Costly(0.002), Costly(0.005)], (1, 28, 28), seconds=0.05,
                                 cpu_clock=lambda: clock["cpu_s"])
    assert share < 1 and node_ms == pytest.approx([2 / share, 5 / share])
    inside = f"/{capacity.PARENT}/{session}/{spec.node}"
    assert len(seen) >= 6 and all(g.rstrip("/").endswith(inside) for g in seen), set(seen)
    assert _thread_group() == before and not before.rstrip("/").endswith(inside)
