"""A fake cgroup kernel on a plain directory, for tests that must run where no cgroup can be written.

`FakeKernel` lays out a tree as the kernel does (a v1 cpu hierarchy with co-mounted cpuacct, or a v2 unified
one), a /proc beside it with the processes a test makes, and stands in for `capacity._fs`: its mkdir fills a
new group with the kernel's files, its writes to ``cgroup.procs`` (a whole process) and ``tasks`` (one thread,
v1) move tasks and update /proc, and its rmdir refuses a group that holds tasks or groups, as the kernel does.
It records every change, so a test can say where coderay wrote, not only what it read.
"""

from __future__ import annotations

import errno
import posixpath
import shutil
from pathlib import Path

from coderay import capacity

V1_FILES = {
    "cgroup.procs": "",
    "tasks": "",
    "cpu.cfs_quota_us": "-1\n",
    "cpu.cfs_period_us": "100000\n",
    "cpu.shares": "1024\n",
    "cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
    "cpuacct.usage": "0\n",
}
V2_FILES = {
    "cgroup.procs": "",
    "cgroup.threads": "",
    "cgroup.subtree_control": "\n",
    "cpu.stat": "usage_usec 0\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
}
V2_CONTROLLERS = "cpuset cpu io memory pids"


class FakeKernel(capacity.Cgroupfs):
    """A cgroup tree under `base`/cpu (v1) or `base`/unified (v2) and a /proc under `base`/proc.

    `view` is the hierarchy path the tree's top shows (a container's mount shows its own group, e.g.
    "/docker/c1"): /proc then names groups with that prefix, as the kernel does."""

    def __init__(self, base: Path, version: int, *, view: str = "/"):
        self.version, self.view = version, view
        self.root = base / ("cpu" if version == 1 else "unified")
        self.proc = base / "proc"
        self.threads: dict[int, tuple[int, Path]] = {}  # tid -> (pid, group directory)
        self.starts: dict[int, int] = {}
        self.made: list[Path] = []
        self.written: list[tuple[Path, str]] = []
        self.removed: list[Path] = []
        self.root.mkdir(parents=True)
        self.proc.mkdir()
        self._fill(self.root)

    # ------------------------------------------------------------------ the tree

    def _fill(self, group: Path) -> None:
        files = dict(V1_FILES if self.version == 1 else V2_FILES)
        if self.version == 2:
            if group == self.root:
                files["cgroup.controllers"] = V2_CONTROLLERS + "\n"
            else:
                files["cgroup.controllers"] = (group.parent / "cgroup.subtree_control").read_text()
                files["cpu.max"] = "max 100000\n"
        for name, text in files.items():
            (group / name).write_text(text)

    def path_of(self, group: Path) -> str:
        """The hierarchy path /proc shows for a group directory."""
        return posixpath.join(self.view, group.relative_to(self.root).as_posix()).rstrip("/") or "/"

    def group(self, where: str) -> Path:
        """The directory of a hierarchy path; missing groups on the way are made (as an administrator would)."""
        rel = posixpath.relpath(where, self.view)
        d = self.root
        for part in [] if rel == "." else rel.split("/"):
            d = d / part
            if not d.is_dir():
                d.mkdir()
                self._fill(d)
        return d

    def mkdir(self, path: Path) -> None:
        assert path.is_relative_to(self.root), f"mkdir outside the tree: {path}"
        path.mkdir()
        self._fill(path)
        self.made.append(path)

    def rmdir(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if any(p.is_dir() for p in path.iterdir()) or any(g == path for _, g in self.threads.values()):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        shutil.rmtree(path)
        self.removed.append(path)

    def write(self, path: Path, text: str) -> None:
        assert path.is_relative_to(self.root), f"write outside the tree: {path}"
        if not path.exists():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))  # cgroupfs makes no files
        self.written.append((path, text))
        if path.name == "cgroup.procs":
            pid = int(text)
            tids = [t for t, (p, _) in self.threads.items() if p == pid]
            if not tids:
                raise ProcessLookupError(errno.ESRCH, "No such process")
            self._move(tids, path.parent)
        elif path.name == "tasks" and self.version == 1:
            if int(text) not in self.threads:
                raise ProcessLookupError(errno.ESRCH, "No such process")
            self._move([int(text)], path.parent)
        elif path.name == "cgroup.subtree_control":
            enabled = set(path.read_text().split()) | {text.strip().lstrip("+")}
            path.write_text(" ".join(sorted(enabled)) + "\n")
        else:
            path.write_text(text)

    # ------------------------------------------------------------------ processes

    def spawn(self, pid: int, where: str | dict[int, str] = "/", *, start: int = 1000) -> int:
        """A process in group `where`, or with its threads {tid: where} in groups of their own (v1)."""
        placed = {pid: where} if isinstance(where, str) else where
        self.starts[pid] = start
        (self.proc / str(pid) / "task").mkdir(parents=True)
        self._stat(pid, "S")
        for tid, w in placed.items():
            (self.proc / str(pid) / "task" / str(tid)).mkdir()
            self.threads[tid] = (pid, self.group(w))
        self._sync()
        return pid

    def add_thread(self, pid: int, tid: int) -> None:
        """A thread born now: in its creator's (the main thread's) group."""
        (self.proc / str(pid) / "task" / str(tid)).mkdir()
        self.threads[tid] = (pid, self.threads[pid][1])
        self._sync()

    def exit(self, pid: int) -> None:
        self.threads = {t: v for t, v in self.threads.items() if v[0] != pid}
        shutil.rmtree(self.proc / str(pid))
        self._sync()

    def zombie(self, pid: int) -> None:
        """Exited, not yet reaped: /proc still lists it, no group holds it."""
        self.threads = {t: v for t, v in self.threads.items() if v[0] != pid}
        self._stat(pid, "Z")
        self._sync()

    def where(self, tid: int) -> str:
        return self.path_of(self.threads[tid][1])

    def mountinfo(self, *, read_only: bool = False) -> None:
        """/proc/self/mountinfo naming this tree as the machine's cgroup mount (`view` as the mount's root)."""
        flags = "ro,nosuid" if read_only else "rw,nosuid"
        kind = "cgroup cgroup rw,cpu,cpuacct" if self.version == 1 else "cgroup2 cgroup2 rw"
        (self.proc / "self").mkdir(exist_ok=True)
        (self.proc / "self" / "mountinfo").write_text(
            f"23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n32 23 0:29 {self.view} {self.root} {flags} - {kind}\n"
        )

    def _stat(self, pid: int, state: str) -> None:
        (self.proc / str(pid) / "stat").write_text(
            f"{pid} (fake worker) {state} " + " ".join(["0"] * 18) + f" {self.starts[pid]} 0 0\n"
        )

    def _move(self, tids: list[int], group: Path) -> None:
        for tid in tids:
            self.threads[tid] = (self.threads[tid][0], group)
        self._sync()

    def _line(self, group: Path) -> str:
        where = self.path_of(group)
        return f"4:cpu,cpuacct:{where}\n1:name=systemd:/\n0::/\n" if self.version == 1 else f"0::{where}\n"

    def _sync(self) -> None:
        """Rewrite the membership files and /proc from `threads`, as the kernel would show them."""
        for d in [self.root, *(p for p in self.root.rglob("*") if p.is_dir())]:
            members = [(t, p) for t, (p, g) in self.threads.items() if g == d]
            (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in sorted({p for _, p in members})))
            (d / ("tasks" if self.version == 1 else "cgroup.threads")).write_text(
                "".join(f"{t}\n" for t, _ in sorted(members))
            )
        for tid, (pid, group) in self.threads.items():
            (self.proc / str(pid) / "task" / str(tid) / "cgroup").write_text(self._line(group))
            if tid == pid:
                (self.proc / str(pid) / "cgroup").write_text(self._line(group))
