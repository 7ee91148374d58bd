"""`coderay up` as a user runs it: a separate process that loads the cached training and search, starts its
own local Ray cluster, serves over HTTP until it is told to stop, and then shuts everything down."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)


def _up(config, env: dict) -> subprocess.Popen:
    """`coderay up CONFIG` in its own process, its output one text stream."""
    cmd = [sys.executable, "-m", "coderay.cli", "up", str(config)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_up_serves_until_sigterm_then_exits_cleanly(trained_cfg, searched_table, tiny_config_path):
    """As a user runs it (no RAY_AUTH_MODE set): the local cluster runs with token authentication, its token in
    the workdir; `coderay status` finds it, a driver without it is refused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = _up(tiny_config_path, env)
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


def test_a_first_up_serves_before_exploring_then_serves_the_whole_table(trained_cfg, tiny_config_path):
    """A first `up` (trained services, no search yet) serves each service local-only while it searches, its first
    table as soon as stage 2's top-k are trained; the explored candidate trains while it serves, and the whole
    table replaces the first in place: every request sent meanwhile is answered, the block groups keep their
    processes, and the explored path serves afterwards."""
    from coderay.config import load_config
    from coderay.search import PARTIAL, load_table, search_dir

    text = tiny_config_path.read_text().replace(
        "  link_epochs: 1\n",
        "  link_epochs: 1\n  explore: {count: 1, epochs: 2, variants: [{capacity: bottleneck, distill: 0.5}]}\n",
    )
    path = tiny_config_path.with_name("tiny-explore.yaml")
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.root == trained_cfg.root and load_table(cfg) is None  # its services trained, its search not run
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = _up(path, env)
    lines: list[str] = []
    answers: list[int] = []
    stop = threading.Event()

    def keep_asking(url: str) -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(f"{url}/v1/services/digits/infer", json={"inputs": [[[0.5] * 28] * 28] * 4})
                answers.append(r.status_code)

    def read_until(prefix: str, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line:\n" + "".join(lines[-40:]))

    asker = None
    try:
        early = read_until("  serving at ", 240)  # while the search runs: every service its own model
        r = httpx.post(f"{early.split()[2]}/v1/services/digits/infer", json={"inputs": [[[0.5] * 28] * 28]}, timeout=60)
        assert r.status_code == 200 and r.json()["path"] == "digits:local", r.text
        read_until("serving until", 240)
        out = "".join(lines)
        assert "to train while serving: 1 explored candidate(s), and the baselines" in out, out[-3000:]
        url = re.search(r"is serving \d+ service\(s\) at (http://\S+)", out).group(1)
        first = httpx.get(f"{url}/v1/services/digits/route", timeout=30).json()["path"]
        groups = _block_groups(url)
        asker = threading.Thread(target=keep_asking, args=(url,), daemon=True)
        asker.start()
        done = read_until("search finished while serving", 240)
        time.sleep(2)
        stop.set()
        asker.join(timeout=90)
        assert answers and set(answers) == {200}, answers

        table = load_table(cfg)
        assert table is not None and not (search_dir(cfg, exhaustive=False) / PARTIAL).exists()
        explored = next(r for r in table.rows if r.get("explored"))
        assert explored.trained and table.best("digits").path_id in done
        assert first != explored.path_id
        after = _block_groups(url)  # the new links reached the running groups: none was replaced
        assert {g: pid for g, (pid, _) in after.items()} == {g: pid for g, (pid, _) in groups.items()}, (groups, after)
        assert any(explored.path_id in paths for _, paths in after.values()), after
        assert not any(explored.path_id in paths for _, paths in groups.values()), groups
        put = httpx.put(f"{url}/v1/services/digits/route", json={"path": explored.path_id}, timeout=30)
        assert put.status_code == 200, put.text
        r = httpx.post(f"{url}/v1/services/digits/infer", json={"inputs": [[[0.5] * 28] * 28]}, timeout=60)
        assert r.status_code == 200 and r.json()["path"] == explored.path_id, r.text

        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest[-2000:]
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _block_groups(url: str) -> dict[str, tuple[int, list[str]]]:
    """{block-group deployment: (its replica's pid, the paths whose links it holds)}."""
    replicas = httpx.get(f"{url}/v1/debug/replicas", timeout=60).json()["replicas"]
    return {r["deployment"]: (r["pid"], r["paths"]) for r in replicas}
