"""CPU caps for emulated nodes: real busy processes under a node's quota, clean-up, the budget, refusal."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from fake_cgroup import FakeKernel

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
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, node, str(share), str(start), str(BURN_S), str(threads)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
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
        assert got <= share * 1.2, f"attempt {i}: {got:.3f} CPU used above a {share} CPU quota; joins: " + "; ".join(
            json.dumps(r["join"]) for r in rs
        )
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
    gone = subprocess.run(
        [sys.executable, "-c", "from coderay import capacity; capacity.join('edge-gone', 0.2)"],
        env=os.environ | {"PYTHONPATH": str(REPO)},
        check=True,
    )
    assert gone.returncode == 0
    alive = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from coderay import capacity; "
            "capacity.join('edge-alive', 0.2); print('in', flush=True); time.sleep(60)",
        ],
        env=os.environ | {"PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
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
        run = subprocess.run(
            [sys.executable, str(REPO / "bench" / "capacity_check.py"), "--json", "--share", "0.3", "--burn-s", "1.2"],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ | {"PYTHONPATH": str(REPO)},
        )
    finally:
        capacity.sweep()  # had the script died: its owner is gone and its groups are empty, remove them
    assert run.returncode in (0, 1), run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    one, two = r["one_actor"], r["two_actors"]
    print(
        f"{r['mechanism']}: Ray actor share 0.3 asked, {one['got']:.3f} got ({one['threads_inside']}/"
        f"{one['threads']} threads in group); 2 actors of one node {two['got']:.3f} together"
    )
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
    assert all(
        (d / "cgroup.subtree_control").read_text() == "+cpu" for d in (tmp_path, group.parent.parent, group.parent)
    )
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
    node_ms = sustained_block_ms(
        cfg, spec, [Costly(0.002), Costly(0.005)], (1, 28, 28), seconds=0.05, cpu_clock=lambda: clock["cpu_s"]
    )
    assert share < 1 and node_ms == pytest.approx([2 / share, 5 / share])
    inside = f"/{capacity.PARENT}/{session}/{spec.node}"
    assert len(seen) >= 6 and all(g.rstrip("/").endswith(inside) for g in seen), set(seen)
    assert _thread_group() == before and not before.rstrip("/").endswith(inside)


# --------------------------------------------------------------------------- where groups go, and back

_changes: list[tuple[str, tuple]] | None = None


def _audit(event: str, args: tuple) -> None:
    if _changes is None:
        return
    if event in ("os.mkdir", "os.rmdir", "os.remove", "os.rename", "os.chmod", "os.chown", "os.truncate"):
        _changes.append((event, args))
    elif event == "open":
        _, mode, flags = args
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & writes):
            _changes.append((event, args))


sys.addaudithook(_audit)


def _changes_made_by(fn) -> list[tuple[str, tuple]]:
    """Every file-system change (mkdir, rmdir, a file opened for writing, ...) this process made while `fn` ran."""
    global _changes
    _changes = []
    try:
        fn()
        return _changes
    finally:
        _changes = None


def _use(kernel: FakeKernel, monkeypatch) -> FakeKernel:
    """Make `kernel` capacity's kernel, its tree the cgroup root, with no join records from other tests."""
    monkeypatch.setattr(capacity, "_fs", kernel)
    monkeypatch.setattr(capacity, "_homes", {})
    monkeypatch.setenv(capacity.ROOT_ENV, str(kernel.root))
    monkeypatch.setenv(capacity.SESSION_ENV, "fake")
    monkeypatch.delenv(capacity.SWITCH_ENV, raising=False)
    assert capacity.detect(refresh=True).kind == (capacity.V1 if kernel.version == 1 else capacity.V2)
    return kernel


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def fake(request, tmp_path, monkeypatch) -> FakeKernel:
    """A fake kernel behind a fake cgroup tree (v1 and v2): the bookkeeping runs everywhere, the machine's own
    tree untouched."""
    return _use(FakeKernel(tmp_path, request.param), monkeypatch)


@pytest.mark.parametrize("tree", ["machine", "fake-v1", "fake-v1-with-parent", "fake-v2-cpu-off"])
def test_detection_only_reads(tree, tmp_path, monkeypatch):
    """detect() decides from the mount table, permissions and controller files: no mkdir, no rmdir, no write,
    not even a probe group removed again at once (others on the machine see it); on this machine's tree too."""
    monkeypatch.delenv(capacity.SWITCH_ENV, raising=False)
    monkeypatch.setattr(capacity, "_detected", {})
    if tree == "machine":
        monkeypatch.delenv(capacity.ROOT_ENV, raising=False)
    else:
        kernel = FakeKernel(tmp_path, 2 if tree.startswith("fake-v2") else 1)
        if tree == "fake-v1-with-parent":
            kernel.group("/coderay")
        monkeypatch.setenv(capacity.ROOT_ENV, str(kernel.root))
    assert _changes_made_by(lambda: capacity.detect(refresh=True)) == []
    det = capacity.detect()
    if tree == "fake-v2-cpu-off":  # cpu is off in the root's subtree_control, but the file is writable: join may
        assert det.kind == capacity.V2 and (kernel.root / "cgroup.subtree_control").read_text() == "\n"
    elif tree != "machine":
        assert det.kind == capacity.V1
        assert (kernel.root / capacity.PARENT).exists() == (tree == "fake-v1-with-parent")  # made by the test only


def test_fake_groups_nest_under_coderay_and_leave_goes_home(fake):
    """join makes and writes below <root>/coderay only; moves between nodes keep the record; leave sends the
    process (with a thread born inside the node) back to the service group it came from, not to the root."""
    pid = fake.spawn(4242, "/system.slice/app.service")
    home = fake.group("/system.slice/app.service")
    coderay = fake.root / capacity.PARENT
    group = coderay / "fake" / "edge-a"
    r = capacity.join("edge-a", 0.5, pid=pid)
    assert r.capped and r.group == str(group) and fake.where(pid) == "/coderay/fake/edge-a"
    assert fake.made == [coderay, group.parent, group]
    outside = [p for p, _ in fake.written if not p.is_relative_to(coderay)]
    assert outside == ([] if fake.version == 1 else [fake.root / "cgroup.subtree_control"])  # v2: cpu on for coderay
    before_leave = len(fake.written)
    fake.add_thread(pid, 4243)
    assert capacity.join("edge-b", 0.2, pid=pid).capped and fake.where(4243) == "/coderay/fake/edge-b"
    assert capacity.join("edge-a", 0.5, pid=pid).capped  # timing_as's way back to the previous node
    assert capacity.leave(pid) is True
    assert fake.where(pid) == fake.where(4243) == "/system.slice/app.service"
    assert [w for w in fake.written[before_leave:] if not w[0].is_relative_to(coderay)] == [
        (home / "cgroup.procs", str(pid))
    ]
    assert (fake.root / "cgroup.procs").read_text() == ""
    assert capacity.leave(pid) is False and fake.where(pid) == "/system.slice/app.service"  # no record: stays


def test_fake_v1_leave_returns_each_thread_to_its_own_group(tmp_path, monkeypatch):
    """cgroup v1 places threads one by one: each goes back to its own group; one born inside the node follows
    the main thread."""
    fake = _use(FakeKernel(tmp_path, 1), monkeypatch)
    pid = fake.spawn(500, {500: "/app", 501: "/app", 502: "/app/io"})
    assert capacity.join("edge-a", 0.4, pid=pid).threads == 3
    fake.add_thread(pid, 503)
    assert capacity.leave(pid)
    assert [fake.where(t) for t in (500, 501, 502, 503)] == ["/app", "/app", "/app/io", "/app"]
    assert sorted((p.relative_to(fake.root).as_posix(), t) for p, t in fake.written if p.name == "tasks") == [
        ("app/io/tasks", "502"),
        ("app/tasks", "500"),
        ("app/tasks", "501"),
        ("app/tasks", "503"),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="detection reads the mount table on Linux only")
def test_fake_mount_table_container_view(tmp_path, monkeypatch):
    """Detection from /proc/self/mountinfo: a container's mount shows its own group as the top, and /proc paths
    carry that prefix; the process still goes home to its own directory. A read-only mount is refused."""
    fake = FakeKernel(tmp_path, 1, view="/docker/c1")
    monkeypatch.setattr(capacity, "_fs", fake)
    monkeypatch.setattr(capacity, "_homes", {})
    monkeypatch.setattr(capacity, "_detected", {})
    monkeypatch.delenv(capacity.ROOT_ENV, raising=False)
    monkeypatch.delenv(capacity.SWITCH_ENV, raising=False)
    monkeypatch.setenv(capacity.SESSION_ENV, "fake")
    fake.mountinfo()
    det = capacity.detect(refresh=True)
    assert (det.kind, det.cpu_root, det.cpu_base, det.acct_root) == (capacity.V1, fake.root, "/docker/c1", fake.root)
    pid = fake.spawn(77, "/docker/c1/app")
    assert capacity.join("edge-a", 0.5, pid=pid).capped and fake.where(pid) == "/docker/c1/coderay/fake/edge-a"
    assert capacity.leave(pid) and fake.where(pid) == "/docker/c1/app"
    fake.mountinfo(read_only=True)
    det = capacity.detect(refresh=True)
    assert det.kind == capacity.NONE and "read-only" in det.reason


def test_fake_timing_as_comes_back_to_where_the_process_was(fake, tiny_cfg):
    """emulation.timing_as, nested: back in the outer node after the inner, back home after the outer."""
    from coderay import emulation

    cfg = tiny_cfg.model_copy(update={"emulation": tiny_cfg.emulation.model_copy(update={"cpu_caps": True})})
    me = fake.spawn(os.getpid(), "/system.slice/coderay.service")
    emulation._plan.cache_clear()  # plans are cached per config: this one must see the fake tree
    try:
        with emulation.timing_as(cfg, "edge-a") as cap:
            assert cap.capped and fake.where(me) == "/coderay/fake/edge-a"
            with emulation.timing_as(cfg, "edge-b"):
                assert fake.where(me) == "/coderay/fake/edge-b"
            assert fake.where(me) == "/coderay/fake/edge-a"
        assert fake.where(me) == "/system.slice/coderay.service"
    finally:
        emulation._plan.cache_clear()


def test_fake_sweep_removes_only_stale_sessions(fake):
    """Stale = owner gone (exited, a zombie, or its pid now someone else's) and no task in any group. Kept: a
    live owner's empty session, a dead owner's session with a worker left, a hand-named one (unless asked)."""
    fake.spawn(100, "/user", start=5000)
    fake.spawn(104, "/user", start=4000)
    fake.zombie(104)
    dead, reused, live = (
        "20260101-000000-101-4000-aaaaaa",
        "20260101-000000-100-4999-bbbbbb",
        "20260101-000000-100-5000-cccccc",
    )
    orphans, old_style, zombie = (
        "20260101-000000-102-4000-dddddd",
        "20260101-000000-103-eeeeee",
        "20260101-000000-104-4000-ffffff",
    )
    for i, name in enumerate([dead, reused, live, orphans, old_style, zombie, "by-hand"]):
        fake.spawn(200 + i, "/user")
        assert capacity.join("edge-a", 0.3, pid=200 + i, session=name).capped
        if name != orphans:
            fake.exit(200 + i)
    fake.spawn(210, "/user")
    assert capacity.join("edge-b", 0.3, pid=210, session=orphans).capped
    fake.exit(210)  # the orphans' session: one node's worker gone, the other's still running
    coderay = fake.root / capacity.PARENT
    assert {capacity.session_owner(n) for n in (live, old_style, "by-hand")} == {(100, 5000), (103, None), None}

    removed = capacity.sweep()
    assert sorted(Path(p).name for p in removed if Path(p).parent == coderay) == sorted(
        [dead, reused, old_style, zombie]
    )
    assert sorted(p.name for p in coderay.iterdir() if p.is_dir()) == sorted([live, orphans, "by-hand"])
    assert (coderay / orphans / "edge-b").is_dir()  # a session in use is kept whole
    assert (fake.root / "user").is_dir() and all(p.is_relative_to(coderay) for p in fake.removed)
    assert capacity.sweep(unowned=True) == [str(coderay / "by-hand" / "edge-a"), str(coderay / "by-hand")]
    fake.exit(203)  # the orphaned worker ends
    assert sorted(capacity.sweep()) == sorted(str(coderay / orphans / g) for g in ("edge-a", "edge-b", ""))
    assert [p.name for p in coderay.iterdir() if p.is_dir()] == [live]


def test_fake_new_session_names_its_owner_and_sweeps(fake):
    """new_session records this process as owner in the name and removes a crashed run's empty groups."""
    fake.spawn(os.getpid(), "/user", start=777)
    crashed = "20260101-000000-301-1-abcdef"
    fake.spawn(300, "/user")
    assert capacity.join("edge-a", 0.3, pid=300, session=crashed).capped
    fake.exit(300)
    name = capacity.new_session()
    assert os.environ[capacity.SESSION_ENV] == name and capacity.session_owner(name) == (os.getpid(), 777)
    assert not (fake.root / capacity.PARENT / crashed).exists()
    fake.spawn(301, "/user")
    assert capacity.join("edge-a", 0.3, pid=301).capped
    fake.exit(301)
    assert capacity.sweep() == [] and (fake.root / capacity.PARENT / name / "edge-a").is_dir()  # its owner runs


def test_session_names_cannot_climb_out_of_coderays_group(fake, monkeypatch):
    """A session named ".." would put <root>/coderay/.. = the root in clean-up's hands: refused before any path."""
    outside = fake.group("/system.slice")
    monkeypatch.setenv(capacity.SESSION_ENV, "..")
    for call in (
        capacity.cleanup,
        lambda: capacity.usage("system.slice"),
        lambda: capacity.group_pids("x"),
        lambda: capacity.threads_in_group("x"),
    ):
        with pytest.raises(ValueError, match="session name"):
            call()
    assert outside.is_dir() and fake.removed == []


# A child with its main thread in one group and a second thread in another (v1; v2 moves processes, so both
# share one), that joins a node and leaves it, reporting each thread's cpu group (and the main thread's cpuacct
# group) before, inside and after.
HOMES_CHILD = textwrap.dedent("""
    import json, os, queue, sys, threading
    from pathlib import Path
    from coderay import capacity
    det = capacity.detect()
    v1 = det.kind == capacity.V1
    def group(controller):
        for line in Path("/proc/thread-self/cgroup").read_text().splitlines():
            _, names, where = line.split(":", 2)
            if (controller in names.split(",")) if v1 else names == "":
                return where
    def move(directory):
        Path(directory, "tasks" if v1 else "cgroup.procs").write_text(
            str(threading.get_native_id() if v1 else os.getpid()))
    asks, answers = queue.Queue(), queue.Queue()
    def side():
        move(sys.argv[2])
        for _ in iter(asks.get, None):
            answers.put(group("cpu"))
    def both():
        asks.put(1)
        return [group("cpu"), answers.get(timeout=10), group("cpuacct")]
    move(sys.argv[1])
    threading.Thread(target=side, daemon=True).start()
    before = both()
    joined = capacity.join("edge-home", 0.3)
    inside = both()
    back = capacity.leave()
    print(json.dumps({"before": before, "inside": inside, "after": both(), "capped": joined.capped, "back": back}))
    asks.put(None)
""")


def test_leave_returns_each_thread_to_its_group_on_this_machine(session):
    """On the real tree: threads placed in groups of their own (inside the session, so clean-up takes them)
    join a node and leave it; each is back in its own group, the cpuacct hierarchy back where it was."""
    det = _skip_unless_caps()
    homes = det.cpu_root / capacity.PARENT / session / "homes"
    main_home, side_home = homes / "main", homes / ("side" if det.kind == capacity.V1 else "main")
    for d in (main_home, side_home):
        d.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        [sys.executable, "-c", HOMES_CHILD, str(main_home), str(side_home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout.strip().splitlines()[-1])
    rel = f"/{capacity.PARENT}/{session}"
    assert r["capped"] and r["back"]
    assert [g.endswith(f"{rel}/homes/{d.name}") for g, d in zip(r["before"], (main_home, side_home))] == [True] * 2
    assert [g.endswith(f"{rel}/edge-home") for g in r["inside"][:2]] == [True, True]
    assert r["after"] == r["before"]


# A driver that starts a session and joins it; "orphan" leaves a forked worker behind in the group, "live" leaves
# the group again and stays alive (owner running, group empty), "exit" just ends.
SESSION_CHILD = textwrap.dedent("""
    import os, sys, time
    from coderay import capacity
    name = capacity.new_session()
    assert capacity.join("edge-s", 0.2).capped
    worker = 0
    if sys.argv[1] == "orphan":
        worker = os.fork()
        if worker == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            time.sleep(60)
            os._exit(0)
    if sys.argv[1] == "live":
        capacity.leave()
    print(name, worker, flush=True)
    if sys.argv[1] == "live":
        time.sleep(60)
""")


def test_sweep_on_this_machine_keeps_live_sessions(session):
    """On the real tree: sweep removes a session whose driver exited and whose groups are empty; it keeps one
    whose driver runs (groups empty) and one whose driver exited but whose worker still runs, until it ends."""
    det = _skip_unless_caps()
    env = os.environ | {"PYTHONPATH": str(REPO)}

    def driver(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", SESSION_CHILD, mode], capture_output=True, text=True, timeout=60, env=env, check=True
        ).stdout.split()
        return out[0], int(out[1])

    orphan, worker = driver("orphan")  # drivers sweep at start-up: the one to be swept here starts last
    live = subprocess.Popen([sys.executable, "-c", SESSION_CHILD, "live"], stdout=subprocess.PIPE, text=True, env=env)
    names = [orphan]
    try:
        live_name = live.stdout.readline().split()[0]
        names.append(live_name)
        dead, _ = driver("exit")
        names.append(dead)
        roots = [r for r in {det.cpu_root, det.acct_root} if r is not None]
        assert all((r / capacity.PARENT / dead / "edge-s").is_dir() for r in roots)
        removed = capacity.sweep()
        assert str(det.cpu_root / capacity.PARENT / dead) in removed
        assert not any((r / capacity.PARENT / dead).exists() for r in roots)
        assert (det.cpu_root / capacity.PARENT / live_name / "edge-s").is_dir() and live.poll() is None
        assert capacity.group_pids("edge-s", session=orphan) == [worker]
        assert (det.cpu_root / capacity.PARENT / orphan / "edge-s").is_dir()
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while capacity.group_pids("edge-s", session=orphan) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert str(det.cpu_root / capacity.PARENT / orphan) in capacity.sweep()
        assert (det.cpu_root / capacity.PARENT / live_name).is_dir()
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass
        live.kill()
        live.wait()
        for name in names:
            capacity.cleanup(name, evict=True)
