"""Real CPU capacity for emulated edge nodes: one Linux CPU quota per node, shared by all its processes.

Ray's CPU counts are logical (they limit scheduling, not use), so on one machine every emulated node would
otherwise run at the machine's full speed. Here each node gets a cgroup with a CFS bandwidth quota; every
process doing that node's work (a Serve replica, a Tune trial, a profiling run) calls `join(node, share)`
once, which moves the whole process - all its threads - into the node's group. The node's *total* is capped:
two replicas of one node share its quota.

Groups live at ``<cpu controller>/coderay/<session>/<node>``: cgroup v1 (``cpu.cfs_quota_us`` and
``cpu.cfs_period_us``; CPU seconds from the ``cpuacct`` hierarchy, co-mounted or not) or cgroup v2
(``cpu.max`` = "quota period", ``cpu.stat``; the cpu controller is enabled down the tree through
``cgroup.subtree_control``). `detect()` says which one this OS allows and, if neither, why not. The session
comes from ``CODERAY_CAPACITY_SESSION`` (set it in the driver before Ray starts so every worker inherits it;
`new_session()` does that) and keeps concurrent runs on one machine apart. `cleanup()` removes groups whose
processes have exited (and can evict the ones that have not); call it when the run ends.

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
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "V1", "V2", "NONE", "DEFAULT_PERIOD_US", "Detection", "JoinResult", "Usage", "SharePlan",
    "detect", "join", "leave", "usage", "cleanup", "group_pids", "threads_in_group", "session_id", "new_session",
    "plan_shares", "machine_cpus",
]

log = logging.getLogger(__name__)

V1, V2, NONE = "cgroup-v1", "cgroup-v2", "none"
PARENT = "coderay"                     # every coderay group lives under <controller root>/coderay/
DEFAULT_PERIOD_US = 20_000             # CFS period (kernel: 1 ms .. 1 s); see join()
MIN_QUOTA_US = 1_000                   # the kernel's smallest quota
SESSION_ENV = "CODERAY_CAPACITY_SESSION"
ROOT_ENV = "CODERAY_CGROUP_ROOT"       # point detection at another root (a test's tmp dir, a delegated tree)
SWITCH_ENV = "CODERAY_CAPACITY"        # "off" disables caps (reported as none: disabled ...)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_warned: set[str] = set()
_detected: dict[tuple[str | None, str | None], Detection] = {}


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    """What this OS allows: `kind` is "cgroup-v1", "cgroup-v2" or "none"; `reason` says why (not)."""
    kind: str
    reason: str
    cpu_root: Path | None = None       # the cpu controller's mount (v1) or the unified mount (v2)
    acct_root: Path | None = None      # v1: the cpuacct hierarchy (may equal cpu_root); v2: cpu_root

    @property
    def available(self) -> bool:
        return self.kind != NONE

    @property
    def mechanism(self) -> str:
        """The label results and tables carry: "cgroup-v1", "cgroup-v2" or "none: <reason>"."""
        return self.kind if self.available else f"{NONE}: {self.reason}"


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(fstype, mount point, super options) of every cgroup mount of this process."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(fields) < 5 or len(post_fields) < 3 or post_fields[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        out.append((post_fields[0], point, set(post_fields[2].split(","))))
    return out


def _probe_writable(path: Path) -> str | None:
    """None if this process can create the coderay parent group under `path`, else why not.

    A parent this probe had to create is removed again: detection leaves no group behind."""
    parent = path / PARENT
    try:
        created = not parent.exists()
        parent.mkdir(exist_ok=True)
    except OSError as e:
        return f"cannot create {parent} ({e.strerror or e})"
    ok = os.access(parent / "cgroup.procs", os.W_OK) if (parent / "cgroup.procs").exists() \
        else os.access(parent, os.W_OK)
    if created:
        try:
            parent.rmdir()
        except OSError:
            pass  # another process joined meanwhile: its group, its clean-up
    return None if ok else f"{parent} is not writable by uid {os.geteuid()}"


def _enable_v2_cpu(group: Path) -> str | None:
    """Turn the cpu controller on for `group`'s children (v2); None on success, else why not."""
    ctl = group / "cgroup.subtree_control"
    try:
        if "cpu" in ctl.read_text().split():
            return None
        ctl.write_text("+cpu")
        return None
    except OSError as e:
        hint = " (processes live in that group: v2 allows controllers only in groups without processes)" \
            if e.errno == errno.EBUSY else ""
        return f"cannot enable the cpu controller in {ctl} ({e.strerror or e}){hint}"


def _detect_at(root: Path) -> Detection:
    """Detection for an explicit root: a v1 cpu hierarchy or a v2 mount (or anything else: refused)."""
    if not root.is_dir():
        return Detection(NONE, f"cgroup root {root} does not exist")
    if (root / "cpu.cfs_quota_us").exists():
        why = _probe_writable(root)
        if why:
            return Detection(NONE, f"cgroup v1 cpu controller at {root}: {why}")
        acct = root if (root / "cpuacct.usage").exists() else None
        return Detection(V1, f"cgroup v1 cpu controller at {root}", root, acct)
    if (root / "cgroup.controllers").exists():
        try:
            controllers = (root / "cgroup.controllers").read_text().split()
        except OSError as e:
            return Detection(NONE, f"cannot read {root / 'cgroup.controllers'} ({e.strerror or e})")
        if "cpu" not in controllers:
            return Detection(NONE, f"cgroup v2 at {root} has no cpu controller (bound to v1, or not delegated)")
        why = _enable_v2_cpu(root) or _probe_writable(root)
        if why:
            return Detection(NONE, f"cgroup v2 at {root}: {why}")
        return Detection(V2, f"cgroup v2 cpu.max at {root}", root, root)
    return Detection(NONE, f"{root} is not a cgroup cpu controller (no cpu.cfs_quota_us, no cgroup.controllers)")


def _detect() -> Detection:
    if os.environ.get(SWITCH_ENV, "").lower() in ("0", "off", "no", "false", "none"):
        return Detection(NONE, f"disabled by {SWITCH_ENV}={os.environ[SWITCH_ENV]}")
    if os.environ.get(ROOT_ENV):
        return _detect_at(Path(os.environ[ROOT_ENV]))
    if not sys.platform.startswith("linux"):
        return Detection(NONE, f"not Linux ({sys.platform}): no cgroups")
    mounts = _mounts()
    v1_cpu = [point for kind, point, opts in mounts if kind == "cgroup" and "cpu" in opts]
    v1_acct = [point for kind, point, opts in mounts if kind == "cgroup" and "cpuacct" in opts]
    v2 = [point for kind, point, _ in mounts if kind == "cgroup2"]
    reasons = []
    if v1_cpu:
        det = _detect_at(Path(v1_cpu[0]))
        if det.available:
            acct = det.acct_root or (Path(v1_acct[0]) if v1_acct else None)
            if acct is not None and acct != det.cpu_root and _probe_writable(acct):
                acct = None
            return Detection(V1, det.reason + (f", usage from {acct}" if acct else ", no cpuacct: usage unknown"),
                             det.cpu_root, acct)
        reasons.append(det.reason)
    for point in v2:
        det = _detect_at(Path(point))
        if det.available:
            return det
        reasons.append(det.reason)
    if not reasons:
        reasons.append("no cgroup cpu controller mounted")
    return Detection(NONE, "; ".join(reasons))


def detect(*, refresh: bool = False) -> Detection:
    """Which capping mechanism this process can use ("cgroup-v1", "cgroup-v2", "none") and why (not).

    Cached per (`CODERAY_CGROUP_ROOT`, `CODERAY_CAPACITY`); `refresh` probes again. Probing leaves no group."""
    key = (os.environ.get(ROOT_ENV) or None, os.environ.get(SWITCH_ENV) or None)
    if refresh or key not in _detected:
        _detected[key] = _detect()
        log.debug("capacity: %s (%s)", _detected[key].kind, _detected[key].reason)
    return _detected[key]


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("CPU caps unavailable, emulated nodes run UNCAPPED (figures are not capacity-emulated): %s",
                    reason)


# --------------------------------------------------------------------------- sessions and groups


def session_id() -> str:
    """This run's session: `CODERAY_CAPACITY_SESSION`, or "default" when unset."""
    return os.environ.get(SESSION_ENV) or "default"


def new_session(name: str | None = None) -> str:
    """Start a session for this process and every process it starts later (Ray inherits the environment):
    sets `CODERAY_CAPACITY_SESSION` and returns it. Call in the driver before Ray starts."""
    name = name or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    _check_name(name, "session")
    os.environ[SESSION_ENV] = name
    return name


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{what} name {name!r} must be letters, digits, '_', '-', '.' (it names a cgroup)")


def _groups(det: Detection, node: str, session: str) -> tuple[Path, Path | None]:
    """The node's group in the cpu hierarchy and (v1, separate mount) in the cpuacct one."""
    rel = Path(PARENT) / session / node
    cpu = det.cpu_root / rel
    acct = det.acct_root / rel if det.acct_root is not None else None
    return cpu, acct


def _make(det: Detection, group: Path) -> None:
    """mkdir -p the group; in v2 enable the cpu controller in every new ancestor."""
    for attempt in range(5):  # a concurrent cleanup() may rmdir an empty parent between our mkdirs
        try:
            session_dir = group.parent
            session_dir.mkdir(parents=True, exist_ok=True)
            if det.kind == V2 and group.is_relative_to(det.cpu_root):
                for g in (det.cpu_root, det.cpu_root / PARENT, session_dir):
                    why = _enable_v2_cpu(g)
                    if why:
                        raise PermissionError(why)
            group.mkdir(exist_ok=True)
            return
        except FileNotFoundError:
            time.sleep(0.01 * (attempt + 1))
    group.mkdir(exist_ok=True)


def _set_quota(det: Detection, group: Path, share: float, period_us: int) -> int:
    quota = max(MIN_QUOTA_US, round(share * period_us))
    if det.kind == V1:
        period_file, quota_file = group / "cpu.cfs_period_us", group / "cpu.cfs_quota_us"
        def kept() -> bool:
            return (quota_file.read_text().strip(), period_file.read_text().strip()) == (str(quota), str(period_us))

        for _ in range(5):   # processes of one node may join at once: each checks what the other left
            if kept():
                return quota  # set (by us or a concurrent joiner): no momentary lift of the cap
            # the kernel checks quota/period against the parent on each write: lift the quota first
            quota_file.write_text("-1")
            period_file.write_text(str(period_us))
            quota_file.write_text(str(quota))
        if kept():
            return quota
        raise OSError(f"{quota_file} does not keep {quota} us per {period_us} us")
    (group / "cpu.max").write_text(f"{quota} {period_us}")
    return quota


def _proc_group(pid: int | str, tid: int | str | None, det: Detection) -> str | None:
    """The path of `pid`'s (thread `tid`'s) group in det's cpu hierarchy, from /proc."""
    path = Path(f"/proc/{pid}/task/{tid}/cgroup") if tid is not None else Path(f"/proc/{pid}/cgroup")
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if det.kind == V2 and controllers == "":
            return where
        if det.kind == V1 and "cpu" in controllers.split(","):
            return where
    return None


def _threads_in(pid: int, det: Detection, rel: str) -> tuple[int, int]:
    """(threads of `pid` whose cpu group ends with `rel`, all threads of `pid`)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    inside = total = 0
    for tid in tids:
        where = _proc_group(pid, tid, det)
        if where is None:
            continue  # the thread exited while we looked
        total += 1
        inside += where.rstrip("/").endswith(rel)
    return inside, total


@dataclass(frozen=True)
class JoinResult:
    """What `join` did: `mechanism` is "cgroup-v1", "cgroup-v2" or "none: <reason>"."""
    node: str
    share: float                     # CPUs asked for
    mechanism: str
    pid: int
    session: str
    group: str | None = None         # the cgroup directory (None when uncapped)
    quota_us: int | None = None
    period_us: int | None = None
    threads: int = 0                 # threads of pid verified inside the group
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


def join(node: str, share: float, *, pid: int | None = None, session: str | None = None,
         period_us: int = DEFAULT_PERIOD_US) -> JoinResult:
    """Move process `pid` (default: this one), every thread of it, into `node`'s group capped at `share` CPUs.

    Idempotent; the group is shared by every process that joins `node` in the session, so the node's total
    is capped. Processes and threads started later inherit the group. The quota is (re)set on each call:
    the last share asked for a node wins. Where the OS refuses, warns once and returns mechanism
    "none: <reason>" (the process runs uncapped).

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
        _make(det, cpu_group)
        quota = _set_quota(det, cpu_group, share, period_us)
        if acct_group is not None and acct_group != cpu_group:
            _make(det, acct_group)
            (acct_group / "cgroup.procs").write_text(str(pid))
        # cgroup.procs (not v1 `tasks`, which moves one thread) moves the whole thread group atomically
        rel = f"/{PARENT}/{session}/{node}"
        for _ in range(3):
            (cpu_group / "cgroup.procs").write_text(str(pid))
            inside, total = _threads_in(pid, det, rel)
            if inside == total:
                break
        else:
            raise OSError(f"{total - inside} of {total} threads of pid {pid} stayed outside {cpu_group}")
    except OSError as e:
        reason = f"{det.kind} refused at {cpu_group}: {e.strerror or e}"
        _warn_once(reason)
        return JoinResult(node, share, f"{NONE}: {reason}", pid, session)
    log.debug("pid %d (%d threads) joined node %s: %.3f CPU (%d/%d us, %s)", pid, total, node,
             quota / period_us, quota, period_us, det.kind)
    return JoinResult(node, share, det.kind, pid, session, str(cpu_group), quota, period_us, inside, total)


def leave(pid: int | None = None) -> None:
    """Move `pid` (default: this process) back to the controller's root group: uncapped again."""
    det = detect()
    if not det.available:
        return
    pid = os.getpid() if pid is None else int(pid)
    for root in {det.cpu_root, det.acct_root} - {None}:
        try:
            (root / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            return
        except OSError as e:
            log.warning("could not move pid %d back to %s: %s", pid, root, e.strerror or e)


def group_pids(node: str, *, session: str | None = None) -> list[int]:
    """The processes now in `node`'s group (empty when uncapped or the group does not exist)."""
    det = detect()
    if not det.available:
        return []
    return _pids(_groups(det, node, session or session_id())[0])


def threads_in_group(node: str, pid: int | None = None, *, session: str | None = None) -> tuple[int, int]:
    """(threads of `pid` now inside `node`'s group, all threads of `pid`): checks that no thread escaped."""
    det = detect()
    if not det.available:
        return 0, 0
    return _threads_in(os.getpid() if pid is None else int(pid), det, f"/{PARENT}/{session or session_id()}/{node}")


def _pids(group: Path) -> list[int]:
    try:
        return [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except OSError:
        return []


# --------------------------------------------------------------------------- usage


@dataclass(frozen=True)
class Usage:
    """CPU a node's group got since it was made: seconds used, CFS periods, throttled periods and time."""
    node: str
    mechanism: str
    cpu_s: float | None = None         # None where unknown (uncapped, or v1 without cpuacct)
    nr_periods: int | None = None
    nr_throttled: int | None = None
    throttled_s: float | None = None
    share: float | None = None         # quota / period now in force

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
        return Usage(node, V1, cpu_s, stat.get("nr_periods"), stat.get("nr_throttled"),
                     throttled / 1e9 if throttled is not None else None, share)
    try:
        quota_s, period_s = (cpu_group / "cpu.max").read_text().split()
        share = None if quota_s == "max" else int(quota_s) / int(period_s)
    except (OSError, ValueError):
        share = None
    used, throttled = stat.get("usage_usec"), stat.get("throttled_usec")
    return Usage(node, V2, used / 1e6 if used is not None else None, stat.get("nr_periods"),
                 stat.get("nr_throttled"), throttled / 1e6 if throttled is not None else None, share)


# --------------------------------------------------------------------------- clean-up


def cleanup(session: str | None = None, *, all_sessions: bool = False, evict: bool = False) -> list[str]:
    """Remove the session's node groups whose processes have exited, then the empty session and parent groups.

    `all_sessions`: every coderay session on the machine (stale ones from crashed runs). `evict`: move live
    processes back to the root group first (uncapping them) so every group goes. Returns removed paths;
    groups still holding processes are kept (and logged)."""
    det = detect()
    if not det.available:
        return []
    session = session or session_id()
    removed: list[str] = []
    for root in [det.cpu_root] + ([det.acct_root] if det.acct_root not in (None, det.cpu_root) else []):
        parent = root / PARENT
        sessions = [p for p in parent.iterdir() if p.is_dir()] if all_sessions and parent.is_dir() \
            else [parent / session]
        for sdir in sessions:
            if not sdir.is_dir():
                continue
            for group in [p for p in sdir.iterdir() if p.is_dir()]:
                if evict:
                    for pid in _pids(group):
                        try:
                            (root / "cgroup.procs").write_text(str(pid))
                        except OSError:
                            pass  # exited meanwhile
                if _rmdir(group):
                    removed.append(str(group))
            if _rmdir(sdir):
                removed.append(str(sdir))
        if _rmdir(parent):
            removed.append(str(parent))
    return removed


def _rmdir(group: Path) -> bool:
    for attempt in range(20):  # a process that just exited leaves its group a moment later
        try:
            group.rmdir()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.EBUSY and attempt < 19 and _pids(group) == [] \
                    and not any(p.is_dir() for p in group.iterdir()):
                time.sleep(0.02)
                continue
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                log.warning("could not remove %s: %s", group, e.strerror or e)
            elif group.name != PARENT:
                log.debug("kept %s: still in use (%s)", group, e.strerror)
            return False
    return False


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class SharePlan:
    """`shares`: CPUs of quota per node; `scale`: measured rate / scale = rate on the configured nodes."""
    shares: dict[str, float]
    scale: float
    machine_cpus: float
    reserve: float
    limited_by: str                    # "real time", "machine budget" or "fastest core"
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
    rows = [(n.name, float(n.cpus), float(n.speed)) if hasattr(n, "name") else (str(n[0]), float(n[1]),
            float(n[2])) for n in nodes]
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
        raise ValueError(f"no CPU left for the emulated nodes: machine_cpus {machine_cpus} - reserve {reserve}"
                         f" <= 0; lower the reserve or use a larger machine")
    demand = sum(cpus * speed for _, cpus, speed in rows)
    limits = {"real time": 1.0, "machine budget": budget / demand, "fastest core": 1.0 / max(r[2] for r in rows)}
    limited_by = min(limits, key=lambda k: (limits[k], k != "real time"))
    scale = limits[limited_by]
    shares = {name: cpus * speed * scale for name, cpus, speed in rows}
    small = {n: s for n, s in shares.items() if s < min_share}
    if small:
        raise ValueError(f"shares {', '.join(f'{n}={s:.4f}' for n, s in small.items())} CPU fall under "
                         f"min_share {min_share} (scale {scale:.3f}, limited by {limited_by}): too many or too "
                         f"fast nodes for {budget:g} CPU; drop nodes or lower the reserve")
    notes = [f"{n}: {cpus:g} cpu x speed {speed:g} x scale {scale:.3f} = {shares[n]:.3f} CPU"
             for n, cpus, speed in rows]
    return SharePlan(shares, scale, float(machine_cpus), float(reserve), limited_by, notes)


def machine_cpus() -> float:
    """CPUs this process may use: its affinity mask, lowered by a quota on its own cgroup (v1 or v2)."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    det = detect()
    if det.kind == V1:
        where = _proc_group("self", None, det)
        if where and where != "/":
            try:
                quota = int((det.cpu_root / where.lstrip("/") / "cpu.cfs_quota_us").read_text())
                period = int((det.cpu_root / where.lstrip("/") / "cpu.cfs_period_us").read_text())
                if quota > 0:
                    cpus = min(cpus, quota / period)
            except (OSError, ValueError):
                pass
    elif det.kind == V2:
        where = _proc_group("self", None, det)
        if where and where != "/":
            try:
                q, p = (det.cpu_root / where.lstrip("/") / "cpu.max").read_text().split()
                if q != "max":
                    cpus = min(cpus, int(q) / int(p))
            except (OSError, ValueError):
                pass
    return cpus
