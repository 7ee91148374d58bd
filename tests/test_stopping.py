"""SIGTERM at any moment of `coderay up` stops it cleanly: one line, no stack dump, and nothing left behind (no
process of its Ray cluster, no CPU-cap group of its session, its HTTP port free)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
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


def _groups() -> set[str]:
    from coderay import capacity

    det = capacity.detect(refresh=True)
    parent = det.cpu_root / capacity.PARENT if det.available else None
    return {p.name for p in parent.iterdir() if p.is_dir()} if parent is not None and parent.exists() else set()


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


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigterm_at_any_phase_stops_cleanly(capped_config, phase):
    from deployments.app import free_port

    marker, port = f"CODERAY_STOP_TEST={uuid.uuid4().hex}", free_port()
    groups_before = _groups()
    env = os.environ | {"PYTHONUNBUFFERED": "1", marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "coderay.cli", "up", str(capped_config), "--port", str(port), "--no-controller"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        when = PHASES[phase]
        if isinstance(when, float):
            time.sleep(when)
        else:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if when in line:
                    break
            assert any(when in ln for ln in lines), "".join(lines[-30:])
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
    while _marked(marker.split("=")[1]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _marked(marker.split("=")[1]) == [], f"processes of the stopped run left behind ({phase})"
    assert _groups() <= groups_before, f"CPU-cap groups left behind: {_groups() - groups_before}"
    assert _free(port), f"port {port} still taken"
