"""`coderay up` as a user runs it: a separate process that loads the cached training and search, starts its
own local Ray cluster, serves over HTTP until it is told to stop, and then shuts everything down."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)


def test_up_serves_until_sigterm_then_exits_cleanly(trained_cfg, searched_table, tiny_config_path):
    """As a user runs it (no RAY_AUTH_MODE set): the local cluster runs with token authentication, its token in
    the workdir; `coderay status` finds it, a driver without it is refused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "coderay.cli", "up", str(tiny_config_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, url = [], None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or line.startswith("serving until"):
                break
            lines.append(line)
            if m := re.search(r"is serving \d+ service\(s\) at (http://\S+)", line):
                url = m.group(1)
        assert url, "".join(lines[-30:])
        out = "".join(lines)
        assert "[1/3]" in out and "[3/3]" in out and "best path: digits:" in out

        best = searched_table.best("digits")["path_id"]
        assert httpx.get(f"{url}/v1/services/digits/route", timeout=30).json()["path"] == best
        r = httpx.post(f"{url}/v1/services/digits/infer", json={"inputs": [[[0.5] * 28] * 28]}, timeout=60)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
        bad = httpx.post(f"{url}/v1/services/digits/infer", json={"inputs": [[1, 2]]}, timeout=30)
        assert bad.status_code == 422 and "expected" in bad.json()["error"]
        example = re.search(r"^  infer:\s+(.+)$", out, re.M)  # the command it prints, run as a user pastes it
        assert example, out[-3000:]
        tried = subprocess.run(["bash", "-c", example.group(1)], capture_output=True, text=True, timeout=60)
        assert len(json.loads(tried.stdout)["predictions"]) == 1, tried.stdout[-2000:] + tried.stderr[-2000:]

        token = trained_cfg.root / ".ray" / "auth_token"
        address = re.search(r"Ray: +(\S+), token authentication, token in (\S+) ", out)
        assert address and address.group(2) == str(token) and token.stat().st_mode & 0o077 == 0, out[-3000:]
        address = address.group(1)
        status = subprocess.run(
            [sys.executable, "-m", "coderay.cli", "status", str(tiny_config_path), "--json", "--address", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0 and "digits" in json.loads(status.stdout)["services"], status.stderr[-2000:]
        refused = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='{address}')"],
            timeout=120,
            env=env | {"RAY_AUTH_MODE": "disabled", "RAY_gcs_server_port_wait_time_s": "3"},
            capture_output=True,
            text=True,
        )
        assert refused.returncode != 0 and "Authentication" in refused.stderr, refused.stderr[-2000:]

        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest[-2000:]
        assert "stopping" in rest
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
