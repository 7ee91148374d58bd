"""`coderay up` as a user runs it: a separate process that loads the cached training and search, starts its
own local Ray cluster, serves over HTTP until it is told to stop, and then shuts everything down."""
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
    env = os.environ | {"PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "coderay.cli", "up", str(tiny_config_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, url = [], None
    try:
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
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
