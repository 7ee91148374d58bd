"""Real CPU capacity for emulated edge nodes: one Linux CPU quota per node, shared by all its processes.

Ray's CPU counts are logical (they limit scheduling, not use), so on one machine every emulated node would
otherwise run at the machine's full speed. Here each node gets a cgroup with a CFS bandwidth quota; every
process doing that node's work (a Serve replica, a Tune trial, a profiling run) calls `join(node, share)`
once, which moves the whole process - all its threads - into the node's group. The node's *total* is capped:
two replicas of one node share its quota.

Groups live at ``<cpu controller>/coderay/<session>/<node>``, always below coderay's own parent group
``coderay`` (session and node names are checked before any path is built, so none can climb out of it):
cgroup v1 (``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``; CPU seconds from the ``cpuacct`` hierarchy,
co-mounted or not) or cgroup v2 (``cpu.max`` = "quota period", ``cpu.stat``; the cpu controller is enabled
down the tree through ``cgroup.subtree_control``). `detect()` says which one this OS allows and, if neither,
why not; it only reads (the mount table, permissions, which controllers are on) and changes nothing.

The session comes from ``CODERAY_CAPACITY_SESSION`` (set it in the driver before Ray starts so every worker
inherits it; `new_session()` does that) and keeps concurrent runs on one machine apart. A session made by
`new_session()` names its owner, the driver's pid and start time (cgroup directories hold no files of ours,
so the name is the record). `join` records where each thread (v1, which places threads one by one) or the
process (v2) was before its first join, and `leave` sends it back there rather than to the hierarchy's root,
so a process that lived in a service's or a container's group keeps that group's limits. `cleanup()` removes
a session's groups whose processes have exited (and can evict the ones that have not); call it when the run
ends. `sweep()` removes what crashed runs left: the sessions whose owner is gone and whose groups hold no
task. `new_session()` sweeps; so does ``coderay cleanup``.

Where the OS refuses (not Linux, no cgroup cpu controller, read-only or unprivileged cgroup files,
``CODERAY_CAPACITY=off``) `join` logs one warning naming the reason and runs uncapped; its result says
``"none: <reason>"`` so an API response or a table can say its figures are *not* capacity-emulated. No
duty-cycle fallback (a thread sending SIGSTOP/SIGCONT) is offered on purpose: it stops every thread of a Ray
worker - gRPC, health checks, Serve's event loop - for whole slices, so it emulates a stalling machine rather
than a slower one, turns latencies into artefacts of the slice length, can leave a process stopped if the
throttler dies, and still cannot cap a node's processes *together*. Uncapped and said so is the honest
fallback; coderay's arithmetic emulation (profiles divided by ``speed``) still applies and is reported as such.

Budget rule (`plan_shares`)
---------------------------
A node with ``cpus`` cores of relative ``speed`` does ``cpus * speed`` reference-core seconds of work per
second. On this machine the reference core is scaled down by one factor ``scale`` for all nodes, so that
the emulated nodes, not Ray's proxy, the ingress, the driver or the load generator, are the bottleneck:

    share(node) = cpus * speed * scale          (CPUs of quota for the node's group)
    scale       = min(1,                         never faster than real time,
                      (machine_cpus - reserve) / sum(cpus * speed),   all nodes together fit beside
                                                                      the reserved headroom,
                      1 / max(speed))            one emulated core of the fastest node fits in one real
                                                 core: a single-threaded stage on a speed-2 node must get
                                                 2x the CPU of a speed-1 one, which a quota above one
                                                 core could not give it.

The reserve is the headroom kept unquota'd for Ray's proxy, the ingress, the driver and the load generator
(0.5 CPU by default: on this 2-core machine the ingress used ~20% and the proxy ~6% of a CPU at 8 clients,
plus a load generator). Measured rates convert back to the configured edge by dividing by ``scale``
(a rate measured at scale 0.4 is 1/0.4 = 2.5x that rate on the modelled nodes); times multiply by it.
Quotas are ceilings: other load on the machine can still take CPU away from a node, which is why `usage()`
reports the CPU seconds each node actually got and how often it was throttled.

Only call `join` from a process that belongs to one node for its whole life (a Serve replica, a Tune trial
actor, a profiling subprocess), not from a pooled Ray task worker that later runs other nodes' tasks (or
call `join` again there: joining another node moves the process).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "V1",
    "V2",
    "NONE",
    "DEFAULT_PERIOD_US",
    "Detection",
    "JoinResult",
    "Usage",
    "SharePlan",
    "detect",
    "join",
    "leave",
    "usage",
    "cleanup",
    "sweep",
    "group_pids",
    "session_pids",
    "threads_in_group",
    "session_id",
    "new_session",
    "session_owner",
    "plan_shares",
    "machine_cpus",
]

log = logging.getLogger(__name__)

V1, V2, NONE = "cgroup-v1", "cgroup-v2", "none"
PARENT = "coderay"  # every coderay group lives under <controller root>/coderay/
DEFAULT_PERIOD_US = 20_000  # CFS period (kernel: 1 ms .. 1 s); see join()
MIN_QUOTA_US = 1_000  # the kernel's smallest quota
SESSION_ENV = "CODERAY_CAPACITY_SESSION"
ROOT_ENV = "CODERAY_CGROUP_ROOT"  # point detection at another root (a test's tmp dir, a delegated tree)
SWITCH_ENV = "CODERAY_CAPACITY"  # "off" disables caps (reported as none: disabled ...)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# new_session's names: <date>-<time>-<owner pid>[-<owner start ticks>]-<6 hex>
_OWNED = re.compile(r"^\d{8}-\d{6}-(\d+)(?:-(\d+))?-[0-9a-f]{6}$")

_warned: set[str] = set()
_detected: dict[tuple[str | None, str | None], Detection] = {}


class Cgroupfs:
    """The kernel as coderay reaches it: /proc to read, and the only calls that change a cgroup tree.

    Every write, mkdir and rmdir on a group goes through the one instance `_fs`, so a test can stand a fake
    kernel behind a fake tree (tests/fake_cgroup.py) and check where coderay writes, not only what it reads."""

    proc = Path("/proc")

    def write(self, path: Path, text: str) -> None:
        path.write_text(text)

    def mkdir(self, path: Path) -> None:
        path.mkdir()

    def rmdir(self, path: Path) -> None:
        path.rmdir()


_fs = Cgroupfs()


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    """What this OS allows: `kind` is "cgroup-v1", "cgroup-v2" or "none"; `reason` says why (not)."""

    kind: str
    reason: str
    cpu_root: Path | None = None  # the cpu controller's mount (v1) or the unified mount (v2)
    acct_root: Path | None = None  # v1: the cpuacct hierarchy (may equal cpu_root); v2: cpu_root
    cpu_base: str = "/"  # the hierarchy path cpu_root shows (/proc/<pid>/cgroup paths start there)
    acct_base: str = "/"  # the same for acct_root

    @property
    def available(self) -> bool:
        return self.kind != NONE

    @property
    def root(self) -> Path:
        """`cpu_root` of an available detection (every caller checks `available` first)."""
        if self.cpu_root is None:
            raise RuntimeError(f"no cgroup cpu controller: {self.reason}")
        return self.cpu_root

    @property
    def mechanism(self) -> str:
        """The label results and tables carry: "cgroup-v1", "cgroup-v2" or "none: <reason>"."""
        return self.kind if self.available else f"{NONE}: {self.reason}"


@dataclass(frozen=True)
class _Mount:
    """One cgroup mount from /proc/self/mountinfo."""

    fstype: str  # "cgroup" (v1) or "cgroup2"
    point: Path
    base: str  # the hierarchy path shown at `point` ("/" unless a container's view)
    options: frozenset[str]  # super options: the v1 controllers bound to this hierarchy
    read_only: bool


def _unescape(field_: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field_)


def _mounts() -> list[_Mount]:
    """Every cgroup mount this process sees."""
    try:
        lines = (_fs.proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(fields) < 6 or len(post_fields) < 3 or post_fields[0] not in ("cgroup", "cgroup2"):
            continue
        supers = frozenset(post_fields[2].split(","))
        out.append(
            _Mount(
                post_fields[0],
                Path(_unescape(fields[4])),
                _unescape(fields[3]),
                supers,
                "ro" in fields[5].split(",") or "ro" in supers,
            )
        )
    return out


def _refusal(root: Path, kind: str, read_only: bool = False) -> str | None:
    """Why this process could not make coderay's groups under `root`, judged by reading alone (None: it can).

    Reads the mount's flags, the permissions of coderay's parent group (of the root where the parent does not
    exist yet) and, in v2, whether the cpu controller is on, or may be turned on, above the node groups.
    Detection must not write: a probe group at the root is visible to everything else on the machine."""
    uid = os.geteuid()
    if read_only:
        return f"{root} is mounted read-only"
    parent = root / PARENT
    if parent.is_dir():
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{parent} is not writable by uid {uid}"
    elif not os.access(root, os.W_OK | os.X_OK):
        return f"cannot create {parent}: {root} is not writable by uid {uid}"
    if kind == V2:
        for group in (root, parent):
            ctl = group / "cgroup.subtree_control"
            if not group.is_dir():
                continue
            try:
                enabled = "cpu" in ctl.read_text().split()
            except OSError as e:
                return f"cannot read {ctl} ({e.strerror or e})"
            if not enabled and not os.access(ctl, os.W_OK):
                return f"the cpu controller is off in {ctl}, which uid {uid} cannot change"
    return None


def _detect_at(root: Path, *, base: str = "/", read_only: bool = False) -> Detection:
    """Detection for an explicit root: a v1 cpu hierarchy or a v2 mount (or anything else: refused)."""
    if not root.is_dir():
        return Detection(NONE, f"cgroup root {root} does not exist")
    if (root / "cpu.cfs_quota_us").exists():
        why = _refusal(root, V1, read_only)
        if why:
            return Detection(NONE, f"cgroup v1 cpu controller at {root}: {why}")
        acct = root if (root / "cpuacct.usage").exists() else None
        return Detection(V1, f"cgroup v1 cpu controller at {root}", root, acct, base, base)
    if (root / "cgroup.controllers").exists():
        try:
            controllers = (root / "cgroup.controllers").read_text().split()
        except OSError as e:
            return Detection(NONE, f"cannot read {root / 'cgroup.controllers'} ({e.strerror or e})")
        if "cpu" not in controllers:
            return Detection(NONE, f"cgroup v2 at {root} has no cpu controller (bound to v1, or not delegated)")
        why = _refusal(root, V2, read_only)
        if why:
            return Detection(NONE, f"cgroup v2 at {root}: {why}")
        return Detection(V2, f"cgroup v2 cpu.max at {root}", root, root, base, base)
    return Detection(NONE, f"{root} is not a cgroup cpu controller (no cpu.cfs_quota_us, no cgroup.controllers)")


def _detect() -> Detection:
    if os.environ.get(SWITCH_ENV, "").lower() in ("0", "off", "no", "false", "none"):
        return Detection(NONE, f"disabled by {SWITCH_ENV}={os.environ[SWITCH_ENV]}")
    if os.environ.get(ROOT_ENV):
        return _detect_at(Path(os.environ[ROOT_ENV]))
    if not sys.platform.startswith("linux"):
        return Detection(NONE, f"not Linux ({sys.platform}): no cgroups")
    mounts = _mounts()
    v1_cpu = [m for m in mounts if m.fstype == "cgroup" and "cpu" in m.options]
    v1_acct = [m for m in mounts if m.fstype == "cgroup" and "cpuacct" in m.options]
    v2 = [m for m in mounts if m.fstype == "cgroup2"]
    reasons = []
    if v1_cpu:
        det = _detect_at(v1_cpu[0].point, base=v1_cpu[0].base, read_only=v1_cpu[0].read_only)
        if det.available:
            acct, acct_base = det.acct_root, det.acct_base
            if acct is None and v1_acct and _refusal(v1_acct[0].point, V1, v1_acct[0].read_only) is None:
                acct, acct_base = v1_acct[0].point, v1_acct[0].base
            return Detection(
                V1,
                det.reason + (f", usage from {acct}" if acct else ", no cpuacct: usage unknown"),
                det.cpu_root,
                acct,
                det.cpu_base,
                acct_base,
            )
        reasons.append(det.reason)
    for m in v2:
        det = _detect_at(m.point, base=m.base, read_only=m.read_only)
        if det.available:
            return det
        reasons.append(det.reason)
    if not reasons:
        reasons.append("no cgroup cpu controller mounted")
    return Detection(NONE, "; ".join(reasons))


def detect(*, refresh: bool = False) -> Detection:
    """Which capping mechanism this process can use ("cgroup-v1", "cgroup-v2", "none") and why (not).

    Cached per (`CODERAY_CGROUP_ROOT`, `CODERAY_CAPACITY`); `refresh` looks again. Only reads."""
    key = (os.environ.get(ROOT_ENV) or None, os.environ.get(SWITCH_ENV) or None)
    if refresh or key not in _detected:
        _detected[key] = _detect()
        log.debug("capacity: %s (%s)", _detected[key].kind, _detected[key].reason)
    return _detected[key]


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("CPU caps unavailable, emulated nodes run UNCAPPED (figures are not capacity-emulated): %s", reason)


# --------------------------------------------------------------------------- processes


def _start_ticks(pid: int | str) -> int | None:
    """When `pid` started, in clock ticks after boot (what tells it from a later process given its pid); None
    once it has exited (a zombie counts as exited)."""
    try:
        stat = (_fs.proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name before ")" may hold spaces
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(_fs.proc / str(pid) / "task"))
    except OSError:
        return []


def _controller(det: Detection) -> str:
    """The controller field of det's cpu hierarchy in /proc/<pid>/cgroup ("" is the v2 line)."""
    return "cpu" if det.kind == V1 else ""


def _proc_group(pid: int | str, tid: int | str | None, controller: str) -> str | None:
    """The hierarchy path of `pid`'s (thread `tid`'s) group in the hierarchy of `controller`, from /proc."""
    path = _fs.proc / str(pid) / "task" / str(tid) / "cgroup" if tid is not None else _fs.proc / str(pid) / "cgroup"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == controller == "" or (controller and controller in controllers.split(",")):
            return where
    return None


def _group_dir(root: Path, base: str, where: str) -> Path | None:
    """The directory of hierarchy path `where` under a mount that shows `base`; None when outside its view."""
    top = base.rstrip("/")
    if where != top and not where.startswith(top + "/"):
        return None
    rel = where[len(top) :].strip("/")
    return root / rel if rel else root


def _threads_in(pid: int, det: Detection, rel: str) -> tuple[int, int]:
    """(threads of `pid` whose cpu group ends with `rel`, all threads of `pid`)."""
    inside = total = 0
    for tid in _tids(pid):
        where = _proc_group(pid, tid, _controller(det))
        if where is None:
            continue  # the thread exited while we looked
        total += 1
        inside += where.rstrip("/").endswith(rel)
    return inside, total


def _hierarchies(det: Detection) -> list[tuple[str, Path, str]]:
    """(controller, mount point, base) of each hierarchy `join` moves a process in: cpu, and cpuacct where
    it is mounted apart."""
    out = [(_controller(det), det.root, det.cpu_base)]
    if det.kind == V1 and det.acct_root is not None and det.acct_root != det.cpu_root:
        out.append(("cpuacct", det.acct_root, det.acct_base))
    return out


@dataclass(frozen=True)
class _Home:
    """Where a process was before its first join: per hierarchy (by controller), each thread's group (v1) or
    the process's (v2, keyed by its pid). `start` tells the process from a later one with its pid."""

    start: int | None
    groups: dict[str, dict[int, str]]


_homes: dict[tuple[Path, int], _Home] = {}  # by (cpu hierarchy, pid): a record holds only its own
_homes_lock = threading.Lock()


def _remember_home(det: Detection, pid: int) -> None:
    """Record where `pid` is now, unless it joined before (then it is in a node's group, not at home)."""
    start = _start_ticks(pid)
    with _homes_lock:
        known = _homes.get((det.root, pid))
        if known is not None and known.start == start:
            return
    groups: dict[str, dict[int, str]] = {}
    for controller, _, _ in _hierarchies(det):
        ids: list[tuple[int, int | None]] = [(t, t) for t in _tids(pid)] if det.kind == V1 else [(pid, None)]
        where = {key: _proc_group(pid, tid, controller) for key, tid in ids}
        groups[controller] = {key: w for key, w in where.items() if w is not None}
    with _homes_lock:
        known = _homes.get((det.root, pid))
        if known is None or known.start != start:
            _homes[det.root, pid] = _Home(start, groups)


def _existing(root: Path, base: str, where: str) -> Path:
    """The group `where` or, if it is gone or outside this mount's view, its nearest ancestor still here."""
    d = _group_dir(root, base, where) or root
    while d != root and not d.is_dir():
        d = d.parent
    return d


def _send(det: Detection, pid: int, root: Path, base: str, where: dict[int, str]) -> None:
    """Move `pid` in one hierarchy to the groups in `where`; threads born since the record follow the main
    thread's. One write to cgroup.procs when every thread goes to one group (it also takes threads born
    meanwhile); one per thread to `tasks` otherwise (v1)."""
    fallback = where.get(pid) or next(iter(where.values()))
    if det.kind == V2:
        _fs.write(_existing(root, base, fallback) / "cgroup.procs", str(pid))
        return
    targets = {tid: where.get(tid, fallback) for tid in _tids(pid)}
    if len(set(targets.values())) <= 1:
        _fs.write(_existing(root, base, next(iter(targets.values()), fallback)) / "cgroup.procs", str(pid))
        return
    for tid, group in targets.items():
        try:
            _fs.write(_existing(root, base, group) / "tasks", str(tid))
        except ProcessLookupError:
            pass  # that thread ended meanwhile


# --------------------------------------------------------------------------- sessions and groups


def session_id() -> str:
    """This run's session: `CODERAY_CAPACITY_SESSION`, or "default" when unset."""
    return os.environ.get(SESSION_ENV) or "default"


def session_owner(name: str) -> tuple[int, int | None] | None:
    """(pid, start ticks or None) of the process that started session `name`, for names `new_session` made;
    None for a name given by hand (its owner is unknown)."""
    m = _OWNED.match(name)
    return (int(m[1]), int(m[2]) if m[2] else None) if m else None


def _owner_alive(name: str) -> bool | None:
    """Whether session `name`'s owner still runs (the same process, not a later one with its pid); None when
    the name names no owner."""
    owner = session_owner(name)
    if owner is None:
        return None
    now = _start_ticks(owner[0])
    return now is not None and owner[1] in (None, now)


def new_session(name: str | None = None) -> str:
    """Start a session for this process and every process it starts later (Ray inherits the environment):
    sets `CODERAY_CAPACITY_SESSION` and returns it. Call in the driver before Ray starts.

    A made-up name records this process as the session's owner (pid and start time), which is how `sweep`
    later tells a crashed run's groups from a live one's; start-up sweeps, so crashed runs leave nothing for
    long."""
    if name is None:
        pid = os.getpid()
        start = _start_ticks(pid)
        owner = f"{pid}-{start}" if start is not None else str(pid)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{owner}-{uuid.uuid4().hex[:6]}"
    _check_name(name, "session")
    os.environ[SESSION_ENV] = name
    try:
        removed = sweep()
    except OSError as e:  # start-up goes on: a stale group costs nothing but a directory
        log.warning("could not sweep stale CPU-cap groups: %s", e.strerror or e)
    else:
        if removed:
            log.info("removed %d stale CPU-cap groups of crashed runs", len(removed))
    return name


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{what} name {name!r} must be letters, digits, '_', '-', '.' (it names a cgroup)")


def _groups(det: Detection, node: str, session: str) -> tuple[Path, Path | None]:
    """The node's group in the cpu hierarchy and (v1, separate mount) in the cpuacct one, both below
    coderay's parent group: the names are checked, so ".." or "a/b" cannot climb out of it."""
    _check_name(session, "session")
    _check_name(node, "node")
    rel = Path(PARENT) / session / node
    cpu = det.root / rel
    acct = det.acct_root / rel if det.acct_root is not None else None
    return cpu, acct


def _enable_v2_cpu(group: Path) -> None:
    """Turn the cpu controller on for `group`'s children (v2)."""
    ctl = group / "cgroup.subtree_control"
    if "cpu" in ctl.read_text().split():
        return
    try:
        _fs.write(ctl, "+cpu")
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        raise OSError(
            e.errno,
            f"cannot enable the cpu controller in {ctl} (processes live in that group: v2 "
            f"allows controllers only in groups without processes)",
        ) from e


def _make(det: Detection, group: Path) -> None:
    """Make `group` and whatever is missing of the session and parent groups above it; in v2 turn the cpu
    controller on in each group above first (a child has cpu.max only where its parent enables cpu)."""
    for g in (group.parent.parent, group.parent, group):
        if det.kind == V2:
            _enable_v2_cpu(g.parent)
        if not g.is_dir():
            try:
                _fs.mkdir(g)
            except FileExistsError:
                pass  # a concurrent joiner made it


def _set_quota(det: Detection, group: Path, share: float, period_us: int) -> int:
    quota = max(MIN_QUOTA_US, round(share * period_us))
    if det.kind == V1:
        period_file, quota_file = group / "cpu.cfs_period_us", group / "cpu.cfs_quota_us"

        def kept() -> bool:
            return (quota_file.read_text().strip(), period_file.read_text().strip()) == (str(quota), str(period_us))

        for _ in range(5):  # processes of one node may join at once: each checks what the other left
            if kept():
                return quota  # set (by us or a concurrent joiner): no momentary lift of the cap
            # the kernel checks quota/period against the parent on each write: lift the quota first
            _fs.write(quota_file, "-1")
            _fs.write(period_file, str(period_us))
            _fs.write(quota_file, str(quota))
        if kept():
            return quota
        raise OSError(f"{quota_file} does not keep {quota} us per {period_us} us")
    _fs.write(group / "cpu.max", f"{quota} {period_us}")
    return quota


@dataclass(frozen=True)
class JoinResult:
    """What `join` did: `mechanism` is "cgroup-v1", "cgroup-v2" or "none: <reason>"."""

    node: str
    share: float  # CPUs asked for
    mechanism: str
    pid: int
    session: str
    group: str | None = None  # the cgroup directory (None when uncapped)
    quota_us: int | None = None
    period_us: int | None = None
    threads: int = 0  # threads of pid verified inside the group
    threads_total: int = 0

    @property
    def capped(self) -> bool:
        return not self.mechanism.startswith(NONE)

    @property
    def effective_share(self) -> float | None:
        """The share the kernel enforces (quota / period; the quota is rounded to whole µs, >= 1 ms)."""
        return self.quota_us / self.period_us if self.capped and self.quota_us and self.period_us else None

    def as_dict(self) -> dict:
        return asdict(self) | {"capped": self.capped}


def _enter(
    det: Detection, pid: int, cpu_group: Path, acct_group: Path | None, share: float, period_us: int, rel: str
) -> tuple[int, int, int]:
    """Make the node's groups, set the quota, move `pid` in; (quota, threads inside, threads)."""
    _make(det, cpu_group)
    quota = _set_quota(det, cpu_group, share, period_us)
    if acct_group is not None and acct_group != cpu_group:
        _make(det, acct_group)
        _fs.write(acct_group / "cgroup.procs", str(pid))
    # cgroup.procs (not v1 `tasks`, which moves one thread) moves the whole thread group atomically
    for _ in range(3):
        _fs.write(cpu_group / "cgroup.procs", str(pid))
        inside, total = _threads_in(pid, det, rel)
        if inside == total:
            return quota, inside, total
    raise OSError(f"{total - inside} of {total} threads of pid {pid} stayed outside {cpu_group}")


def join(
    node: str, share: float, *, pid: int | None = None, session: str | None = None, period_us: int = DEFAULT_PERIOD_US
) -> JoinResult:
    """Move process `pid` (default: this one), every thread of it, into `node`'s group capped at `share` CPUs.

    Idempotent; the group is shared by every process that joins `node` in the session, so the node's total
    is capped. Processes and threads started later inherit the group. The quota is (re)set on each call:
    the last share asked for a node wins. The first join of a process records where it was, for `leave`.
    Where the OS refuses, warns once and returns mechanism "none: <reason>" (the process runs uncapped).

    period_us: the CFS period. 20 ms by default rather than the kernel's 100 ms: a node capped at 0.25 CPU
    then runs at most 5 ms and waits at most 15 ms per period, so a request of a few ms is stretched roughly
    as on a slower CPU instead of running at full speed and then stalling for 75 ms (both give the same
    average; measured here 0.251 and 0.253 CPU for share 0.25 at 20 and 100 ms)."""
    _check_name(node, "node")
    session = session or session_id()
    _check_name(session, "session")
    if not (share > 0 and math.isfinite(share)):
        raise ValueError(f"share must be a positive number of CPUs, got {share!r}")
    if not 1_000 <= period_us <= 1_000_000:
        raise ValueError(f"period_us must be within 1000..1000000 (the kernel's range), got {period_us}")
    pid = os.getpid() if pid is None else int(pid)
    det = detect()
    if not det.available:
        _warn_once(det.reason)
        return JoinResult(node, share, det.mechanism, pid, session)
    cpu_group, acct_group = _groups(det, node, session)
    try:
        _remember_home(det, pid)
        for attempt in range(3):
            try:
                quota, inside, total = _enter(
                    det, pid, cpu_group, acct_group, share, period_us, f"/{PARENT}/{session}/{node}"
                )
                break
            except FileNotFoundError:  # a concurrent clean-up removed an empty group of ours: make it again
                if attempt == 2:
                    raise
                time.sleep(0.01 * (attempt + 1))
    except OSError as e:
        reason = f"{det.kind} refused at {cpu_group}: {e.strerror or e}"
        _warn_once(reason)
        return JoinResult(node, share, f"{NONE}: {reason}", pid, session)
    log.debug(
        "pid %d (%d threads) joined node %s: %.3f CPU (%d/%d us, %s)",
        pid,
        total,
        node,
        quota / period_us,
        quota,
        period_us,
        det.kind,
    )
    return JoinResult(node, share, det.kind, pid, session, str(cpu_group), quota, period_us, inside, total)


def leave(pid: int | None = None) -> bool:
    """Move `pid` (default: this process) back to where it was before its first `join`: in v1 each thread to
    its own group, in v2 the process to its group (threads born since follow the main thread).

    Not to the hierarchy's root: a process that came from a service's or a container's group must not escape
    that group's limits by leaving a node. Returns whether it is back (an exited process counts as back); a
    process this one never joined has no record and stays where it is (warned)."""
    det = detect()
    if not det.available:
        return False
    pid = os.getpid() if pid is None else int(pid)
    with _homes_lock:
        home = _homes.pop((det.root, pid), None)
    now = _start_ticks(pid)
    if now is None:
        return True
    if home is None or home.start != now:
        log.warning("pid %d was not joined from this process: where it came from is unknown, it stays", pid)
        return False
    back = True
    for controller, root, base in _hierarchies(det):
        where = home.groups.get(controller)
        if not where:
            log.warning("pid %d: no record of its %s group, it stays", pid, controller or "cgroup v2")
            back = False
            continue
        try:
            _send(det, pid, root, base, where)
        except ProcessLookupError:
            return True
        except OSError as e:
            log.warning("could not move pid %d back to its group under %s: %s", pid, root, e.strerror or e)
            back = False
    return back


def group_pids(node: str, *, session: str | None = None) -> list[int]:
    """The processes now in `node`'s group (empty when uncapped or the group does not exist)."""
    det = detect()
    if not det.available:
        return []
    return _pids(_groups(det, node, session or session_id())[0])


def session_pids(session: str | None = None) -> list[int]:
    """The processes now in any group of `session` (default: this run's), in every hierarchy: the run's capped
    work, whatever else knows it by."""
    det = detect()
    if not det.available:
        return []
    name = session or session_id()
    _check_name(name, "session")
    return sorted(
        {pid for _, root, _ in _hierarchies(det) for group in _subgroups(root / PARENT / name) for pid in _pids(group)}
    )


def threads_in_group(node: str, pid: int | None = None, *, session: str | None = None) -> tuple[int, int]:
    """(threads of `pid` now inside `node`'s group, all threads of `pid`): checks that no thread escaped."""
    det = detect()
    if not det.available:
        return 0, 0
    session = session or session_id()
    _check_name(session, "session")
    _check_name(node, "node")
    return _threads_in(os.getpid() if pid is None else int(pid), det, f"/{PARENT}/{session}/{node}")


def _ids(path: Path) -> list[int]:
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def _pids(group: Path) -> list[int]:
    return _ids(group / "cgroup.procs")


# --------------------------------------------------------------------------- usage


@dataclass(frozen=True)
class Usage:
    """CPU a node's group got since it was made: seconds used, CFS periods, throttled periods and time."""

    node: str
    mechanism: str
    cpu_s: float | None = None  # None where unknown (uncapped, or v1 without cpuacct)
    nr_periods: int | None = None
    nr_throttled: int | None = None
    throttled_s: float | None = None
    share: float | None = None  # quota / period now in force

    def as_dict(self) -> dict:
        return asdict(self)


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def usage(node: str, *, session: str | None = None) -> Usage:
    """CPU seconds used by `node`'s group (all its processes, exited ones included) and throttling counts."""
    det = detect()
    if not det.available:
        return Usage(node, det.mechanism)
    cpu_group, acct_group = _groups(det, node, session or session_id())
    if not cpu_group.is_dir():
        return Usage(node, det.kind)
    stat = _stat(cpu_group / "cpu.stat")
    if det.kind == V1:
        cpu_s = None
        if acct_group is not None:
            try:
                cpu_s = int((acct_group / "cpuacct.usage").read_text()) / 1e9
            except (OSError, ValueError):
                pass
        try:
            quota = int((cpu_group / "cpu.cfs_quota_us").read_text())
            period = int((cpu_group / "cpu.cfs_period_us").read_text())
            share = quota / period if quota > 0 else None
        except (OSError, ValueError):
            share = None
        throttled = stat.get("throttled_time")
        return Usage(
            node,
            V1,
            cpu_s,
            stat.get("nr_periods"),
            stat.get("nr_throttled"),
            throttled / 1e9 if throttled is not None else None,
            share,
        )
    try:
        quota_s, period_s = (cpu_group / "cpu.max").read_text().split()
        share = None if quota_s == "max" else int(quota_s) / int(period_s)
    except (OSError, ValueError):
        share = None
    used, throttled = stat.get("usage_usec"), stat.get("throttled_usec")
    return Usage(
        node,
        V2,
        used / 1e6 if used is not None else None,
        stat.get("nr_periods"),
        stat.get("nr_throttled"),
        throttled / 1e6 if throttled is not None else None,
        share,
    )


# --------------------------------------------------------------------------- clean-up


def _subgroups(group: Path) -> list[Path]:
    """`group` and every group below it, deepest first (the order rmdir needs); [] when it does not exist."""
    try:
        children = [p for p in group.iterdir() if p.is_dir()]
    except OSError:
        return []
    return [g for child in children for g in _subgroups(child)] + [group]


def _session_names(det: Detection) -> list[str]:
    """The sessions that have groups in any of det's hierarchies."""
    names: set[str] = set()
    for _, root, _ in _hierarchies(det):
        try:
            names |= {p.name for p in (root / PARENT).iterdir() if p.is_dir() and _NAME.match(p.name)}
        except OSError:
            pass  # no parent group (yet)
    return sorted(names)


def _session_tasks(det: Detection, name: str) -> set[int]:
    """Every task (v1: thread; v2: process or thread) in any group of session `name`, in every hierarchy."""
    files = ("tasks",) if det.kind == V1 else ("cgroup.procs", "cgroup.threads")
    return {
        i
        for _, root, _ in _hierarchies(det)
        for g in _subgroups(root / PARENT / name)
        for f in files
        for i in _ids(g / f)
    }


def _caller_group(det: Detection, controller: str, root: Path, base: str) -> Path:
    """Where `cleanup(evict=True)` sends a process it has no record of: the caller's own group (or the caller's
    recorded home, if it joined a node), as the processes a driver started came from the driver's group; the
    mount's root only where that group is itself coderay's."""
    me = os.getpid()
    with _homes_lock:
        home = _homes.get((det.root, me))
    where = (home.groups.get(controller, {}).get(me) if home else None) or _proc_group(me, None, controller)
    target = _existing(root, base, where) if where else root
    return root if target.is_relative_to(root / PARENT) else target


def _remove_session(det: Detection, name: str, *, evict: bool, wait_s: float = 0.4) -> list[str]:
    """rmdir session `name`'s groups that hold no process, deepest first; `evict` moves processes out first
    (to where they came from, see `leave`, else to the caller's group); `wait_s`: see `_rmdir`."""
    removed = []
    for controller, root, base in _hierarchies(det):
        for group in _subgroups(root / PARENT / name):
            if evict:
                for pid in _pids(group):
                    with _homes_lock:
                        known = (det.cpu_root, pid) in _homes
                    if known and leave(pid):
                        continue
                    try:
                        _fs.write(_caller_group(det, controller, root, base) / "cgroup.procs", str(pid))
                    except OSError:
                        pass  # exited meanwhile
            if _rmdir(group, wait_s=wait_s):
                removed.append(str(group))
    return removed


def cleanup(
    session: str | None = None, *, all_sessions: bool = False, evict: bool = False, wait_s: float = 0.4
) -> list[str]:
    """Remove the session's groups whose processes have exited, then the session group and, once empty,
    coderay's parent group.

    `all_sessions`: also every other session whose owner is not known to run (crashed runs' and hand-named
    ones; a live run's groups are left alone). `evict`: move live processes out first (back to where they
    came from, uncapped) so every group goes. `wait_s`: how long a group whose processes have all exited may
    stay busy (a killed process's zombie holds its group until its parent, or init, reaps it). Returns removed
    paths; groups still holding processes are kept (and logged)."""
    det = detect()
    if not det.available:
        return []
    own = session or session_id()
    _check_name(own, "session")
    names = {own}
    if all_sessions:
        names |= {n for n in _session_names(det) if not _owner_alive(n)}
    removed = [path for name in sorted(names) for path in _remove_session(det, name, evict=evict, wait_s=wait_s)]
    for _, root, _ in _hierarchies(det):
        if _rmdir(root / PARENT):
            removed.append(str(root / PARENT))
    return removed


def sweep(*, unowned: bool = False) -> list[str]:
    """Remove crashed runs' groups and return the paths removed: a session is stale when the process that
    started it (named in the session, see `new_session`) no longer runs and no group of it holds a task.

    Kept: any session with a task in a group (its processes would lose their caps, and the kernel refuses
    anyway), every session whose owner runs (its next join needs the group, its figures the counters), and
    this process's own session. A hand-given name names no owner: `unowned` removes such sessions too once
    they hold no task. The parent group stays: it is where the next session goes."""
    det = detect()
    if not det.available:
        return []
    removed = []
    for name in _session_names(det):
        alive = _owner_alive(name)
        if name == session_id() or alive or (alive is None and not unowned):
            continue
        tasks = _session_tasks(det, name)
        if tasks:
            log.info("kept CPU-cap session %s: its owner is gone but %d tasks remain in its groups", name, len(tasks))
            continue
        removed += _remove_session(det, name, evict=False)
    return removed


def _rmdir(group: Path, *, wait_s: float = 0.4) -> bool:
    """rmdir `group`; one that holds no child group and no process but zombies, yet is busy, is tried again for
    `wait_s` (a process that just exited leaves its group a moment later, a zombie once it is reaped)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _fs.rmdir(group)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            if (
                e.errno == errno.EBUSY
                and time.monotonic() < deadline
                and all(_start_ticks(pid) is None for pid in _pids(group))  # none, or zombies
                and not any(p.is_dir() for p in group.iterdir())
            ):
                time.sleep(0.02)
                continue
            if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                log.debug("kept %s: still in use (%s)", group, e.strerror)
            elif group.name != PARENT:  # a delegated parent is not ours to remove
                log.warning("could not remove %s: %s", group, e.strerror or e)
            return False


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class SharePlan:
    """`shares`: CPUs of quota per node; `scale`: measured rate / scale = rate on the configured nodes."""

    shares: dict[str, float]
    scale: float
    machine_cpus: float
    reserve: float
    limited_by: str  # "real time", "machine budget" or "fastest core"
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.shares.values())

    def as_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def plan_shares(nodes, machine_cpus: float, reserve: float = 0.5, *, min_share: float = 0.01) -> SharePlan:
    """Each node's CPU share on this machine: cpus * speed * scale, one scale for all (module docstring).

    nodes: (name, cpus, speed) tuples or objects with those attributes (config NodeSpec). Raises ValueError
    when the machine has no room beside the reserve, or a share would fall under `min_share` CPUs."""
    rows = [
        (n.name, float(n.cpus), float(n.speed)) if hasattr(n, "name") else (str(n[0]), float(n[1]), float(n[2]))
        for n in nodes
    ]
    if not rows:
        raise ValueError("plan_shares needs at least one node")
    names = [r[0] for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate node names in {names}")
    for name, cpus, speed in rows:
        if not (cpus > 0 and speed > 0):
            raise ValueError(f"node {name!r}: cpus and speed must be > 0 (got cpus={cpus}, speed={speed})")
    if reserve < 0:
        raise ValueError(f"reserve must be >= 0, got {reserve}")
    budget = machine_cpus - reserve
    if budget <= 0:
        raise ValueError(
            f"no CPU left for the emulated nodes: machine_cpus {machine_cpus} - reserve {reserve}"
            f" <= 0; lower the reserve or use a larger machine"
        )
    demand = sum(cpus * speed for _, cpus, speed in rows)
    limits = {"real time": 1.0, "machine budget": budget / demand, "fastest core": 1.0 / max(r[2] for r in rows)}
    limited_by = min(limits, key=lambda k: (limits[k], k != "real time"))
    scale = limits[limited_by]
    shares = {name: cpus * speed * scale for name, cpus, speed in rows}
    small = {n: s for n, s in shares.items() if s < min_share}
    if small:
        raise ValueError(
            f"shares {', '.join(f'{n}={s:.4f}' for n, s in small.items())} CPU fall under "
            f"min_share {min_share} (scale {scale:.3f}, limited by {limited_by}): too many or too "
            f"fast nodes for {budget:g} CPU; drop nodes or lower the reserve"
        )
    notes = [
        f"{n}: {cpus:g} cpu x speed {speed:g} x scale {scale:.3f} = {shares[n]:.3f} CPU" for n, cpus, speed in rows
    ]
    return SharePlan(shares, scale, float(machine_cpus), float(reserve), limited_by, notes)


def machine_cpus() -> float:
    """CPUs this process may use: its affinity mask, lowered by a quota on its own cgroup (v1 or v2)."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    det = detect()
    if det.kind == V1:
        group = _own_group(det)
        if group is not None:
            try:
                quota = int((group / "cpu.cfs_quota_us").read_text())
                period = int((group / "cpu.cfs_period_us").read_text())
                if quota > 0:
                    cpus = min(cpus, quota / period)
            except (OSError, ValueError):
                pass
    elif det.kind == V2:
        group = _own_group(det)
        if group is not None:
            try:
                q, p = (group / "cpu.max").read_text().split()
                if q != "max":
                    cpus = min(cpus, int(q) / int(p))
            except (OSError, ValueError):
                pass
    return cpus


def _own_group(det: Detection) -> Path | None:
    """This process's cpu group, where it is not the mount's top (which has no quota files)."""
    where = _proc_group("self", None, _controller(det))
    group = _group_dir(det.root, det.cpu_base, where) if where else None
    return group if group is not None and group != det.cpu_root else None
