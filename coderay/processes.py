"""Processes of this machine, read from /proc: what a local cluster's clean-up needs to find and stop Ray's
processes when Ray itself can no longer be asked (its GCS went down with the driver)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "pids",
    "argv",
    "environ",
    "stat_fields",
    "command_name",
    "children",
    "parent",
    "gone",
    "options",
    "holds_file_under",
    "stop",
    "port_holder",
    "STOP_WAIT_S",
]

log = logging.getLogger(__name__)

STOP_WAIT_S = 3.0  # how long a stopped process gets to exit before SIGKILL


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def environ(pid: int) -> list[bytes]:
    """`pid`'s environment as it started ([] where this user may not read it)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first, then the parent's pid); [] once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def command_name(pid: int) -> str:
    """The command's name, as the kernel keeps it (a zombie's too)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    return [child for child in pids() if parent(child) == pid]


def options(argv: list[str]) -> dict[str, str]:
    """The `--name=value` options of a command line."""
    return dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)


def holds_file_under(pid: int, dirs: set[str]) -> bool:
    """Whether `pid` has a file open below one of `dirs` (a Ray process: its logs, in its session's dir)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(tuple(dirs)):
                return True
    return False


def parent(pid: int) -> int:
    """`pid`'s parent (0 once it is gone)."""
    fields = stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 else 0


def gone(pid: int) -> bool:
    """Exited (a zombie counts: it holds no port, no CPU, no cgroup task)."""
    fields = stat_fields(pid)
    return not fields or fields[0] in ("Z", "X")


def stop(pids: Iterable[int], sig: int = signal.SIGTERM, *, wait_s: float = STOP_WAIT_S) -> None:
    """Send `sig` to every process in `pids` and wait until each has exited; SIGKILL for one still there after
    `wait_s`."""
    pending = set(pids)
    for pid in pending:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
    deadline = time.monotonic() + wait_s
    while pending := {pid for pid in pending if not gone(pid)}:
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                log.warning("processes %s did not exit on SIGKILL (blocked in the kernel?)", sorted(pending))
                return
            stop(pending, signal.SIGKILL, wait_s=wait_s)
            return
        time.sleep(0.02)


def port_holder(port: int) -> tuple[int, str] | None:
    """(pid, command line) of a process listening on TCP `port` on any address, from /proc; None where no
    process this user can see does (another user's, another network namespace's)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rpartition(":")[2], 16) == port:  # 0A: listening
                sockets.add(f"socket:[{f[9]}]")
    for pid in pids() if sockets else []:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                    return pid, " ".join(argv(pid))
    return None
