"""A provider-style cluster (`ray start --block` per node, token auth, one loopback address per node) behaves
as a real deployment must: drivers with the token see every node and run on it with that node's store,
drivers without it are refused, and stopping it leaves nothing behind. Drivers run as subprocesses, so the
pytest process never holds a Ray connection. The last test stops the module's cluster."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from raystart import HEAD_IP, RayStartCluster, alive, cluster_fixture, free_ports, worker_ip

REPO = Path(__file__).resolve().parent.parent
EDGES = {"edge-small": 1, "edge-mid": 1, "edge-big": 1}  # the three nodes of configs/demo.yaml
# A short drain on SIGTERM: the last test stops nodes that still host actors, which Ray's 30 s would wait out.
raystart = cluster_fixture(EDGES, drain_timeout_s=3)

WHERE = """
import json, os, sys, ray
names = json.loads(sys.argv[2])
ray.init(address=sys.argv[1], log_to_driver=False)
nodes = {n["NodeID"]: {"ip": n["NodeManagerAddress"], "alive": n["Alive"], "resources": n["Resources"]}
         for n in ray.nodes()}

@ray.remote(num_cpus=0)
def where():
    return {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
            "store": os.environ.get("CODERAY_STORE")}

ran = ray.get([where.options(resources={n: 0.01}).remote() for n in names], timeout=120)
print(json.dumps({"nodes": nodes, "ran": dict(zip(names, ran))}))
"""

HOLD = """
import json, os, sys, ray
ray.init(address=sys.argv[1], namespace="raystart", log_to_driver=False)

@ray.remote(num_cpus=0)
class Holder:
    def pid(self):
        return os.getpid()

names = json.loads(sys.argv[2])
holders = [Holder.options(name=n, lifetime="detached", resources={n: 0.01}).remote() for n in names]
print(json.dumps(dict(zip(names, ray.get([h.pid.remote() for h in holders], timeout=120)))))
"""

CONNECT = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("CONNECTED", len(ray.nodes()))
"""


def run_driver(script: str, env: dict[str, str], *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout_s
    )


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_driver_with_token_runs_on_every_node_with_its_store(raystart: RayStartCluster):
    names = ["head", *EDGES]
    out = last_json(run_driver(WHERE, raystart.driver_env(), raystart.address, json.dumps(names)))
    offered = {n["ip"]: n["resources"] for n in out["nodes"].values() if n["alive"]}
    assert set(offered) == {HEAD_IP, worker_ip(0), worker_ip(1), worker_ip(2)}
    assert offered[HEAD_IP].get("head") == 1
    for i, name in enumerate(EDGES):
        assert offered[worker_ip(i)].get(name) == 1, (name, offered)
        assert offered[worker_ip(i)]["CPU"] == EDGES[name]
    for name in names:
        ran, ip = out["ran"][name], raystart.ips()[name]
        assert ran["ip"] == ip, (name, ran)
        assert out["nodes"][ran["node_id"]]["ip"] == ip, (name, ran)
        assert ran["store"] == str(raystart.stores[name]), (name, ran)
    assert len(set(raystart.stores.values())) == len(names)


@pytest.mark.parametrize("auth", ["no token", "wrong token"])
def test_driver_without_the_token_is_refused(raystart: RayStartCluster, auth: str, tmp_path):
    env = {k: v for k, v in raystart.driver_env().items() if not k.startswith("RAY_AUTH")}
    env |= {
        "HOME": str(tmp_path),  # no ~/.ray/auth_token of this machine's user to fall back on
        "RAY_gcs_server_port_wait_time_s": "3",
    }  # the driver gives up after 3 connection attempts, not 20
    if auth == "no token":
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    t0 = time.monotonic()
    proc = run_driver(CONNECT, env, raystart.address, timeout_s=60)
    assert proc.returncode != 0 and "CONNECTED" not in proc.stdout, proc.stdout
    assert "AuthenticationError" in proc.stderr and "Authentication token is missing or incorrect" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert time.monotonic() - t0 < 60


def test_coderay_without_the_token_says_what_to_set(raystart: RayStartCluster, tmp_path):
    env = {k: v for k, v in raystart.driver_env().items() if not k.startswith("RAY_AUTH")}
    env |= {"HOME": str(tmp_path), "RAY_gcs_server_port_wait_time_s": "3"}
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("coderay")),
            "train",
            str(REPO / "configs" / "own-servers.yaml"),
            "--address",
            raystart.address,
            "--workdir",
            str(tmp_path / "w"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"error: the Ray cluster at {raystart.address} refused this driver")
        and "RAY_AUTH_TOKEN_PATH" in last
        and "ray get-auth-token --generate" in last
    ), last
    assert "Traceback" not in run.stderr


def test_dashboard_needs_the_token(raystart: RayStartCluster):
    import urllib.error
    import urllib.request

    assert len(raystart.alive_nodes()) == 1 + len(EDGES)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{raystart.dashboard_url}/api/v0/nodes", timeout=10)
    assert err.value.code == 401


OWN = REPO / "configs" / "own-servers.yaml"


def _run(args: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert run.returncode == 0, f"{args[:3]} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return run, round(time.monotonic() - t, 1)


def _infer(url: str) -> dict:
    import httpx
    import numpy as np

    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    r = httpx.post(
        f"{url}/v1/services/digits/infer",
        content=x.tobytes(),
        timeout=60,
        headers={"Content-Type": "application/octet-stream", "X-Shape": "4,1,28,28"},
    )
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4, r.text
    return r.json()


def test_providers_train_search_and_serve_on_their_own_servers(raystart: RayStartCluster, tmp_path):
    """README's "Running on your own servers", step by step: each provider's model trains, is profiled and
    served on its own node, the search runs on Tune, `serve deploy` takes the Serve config coderay wrote; at
    the end each worker's store holds its own service's parameter files (and the links it runs) only, and
    the driver's workdir none."""
    coderay = str(Path(sys.executable).with_name("coderay"))
    env = raystart.driver_env()
    env.pop("CODERAY_STORE", None)  # the driver is no provider: it has no store
    work, port = tmp_path / "driver-work", free_ports(1)[0]
    common = [str(OWN), "--address", raystart.address, "--workdir", str(work)]
    times = {}
    _, times["train"] = _run([coderay, "train", *common], env, 300)
    search, times["search"] = _run([coderay, "search", *common, "--json"], env, 600)
    table = json.loads(search.stdout)
    assert table["meta"]["engine"] == "tune"
    assert table["meta"]["profiles"] == "timed by each node on its own hardware"
    assert table["meta"]["network_source"] == "measured between the nodes"
    measured = {tuple(sorted(link["between"])) for link in table["meta"]["network"]["links"]}
    assert measured == {("edge-big", "edge-small"), ("edge-mid", "edge-small")}
    served, times["serve"] = _run([coderay, "serve", *common, "--port", str(port), "--no-block"], env, 300)
    url = f"http://127.0.0.1:{port}"
    t = time.monotonic()
    answer = _infer(url)
    times["infer"] = round(time.monotonic() - t, 1)
    assert answer["path"].startswith("digits:")
    status, times["status"] = _run([coderay, "status", "--address", raystart.address, "--json"], env, 120)
    assert set(json.loads(status.stdout)["services"]) == {"digits", "mnist", "rotation"}
    serve_config = work / "serve-config.yaml"
    assert f"Serve config: {serve_config}" in served.stdout
    _, times["serve deploy"] = _run(
        [
            str(Path(sys.executable).with_name("serve")),
            "deploy",
            str(serve_config),
            "--address",
            raystart.dashboard_url,
        ],
        env,
        120,
    )
    deadline = time.monotonic() + 120
    while True:  # the redeployed application answers again
        try:
            _infer(url)
            break
        except (AssertionError, OSError) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer after `serve deploy`: {e}") from None
            time.sleep(1)
    print("loopback cluster, seconds per step:", times, "start", raystart.started_in_s)

    links = {}
    for row in table["rows"]:
        if row.get("links_file") and row["kind"] == "coop":
            links.setdefault(row["host"], set()).add(row["links_file"])
    assert links, "the search trained no links"
    for service, node in (("digits", "edge-small"), ("mnist", "edge-big"), ("rotation", "edge-mid")):
        store = raystart.stores[node]
        files = {
            p.relative_to(store).as_posix()
            for p in store.rglob("*.pt")
            if not p.relative_to(store).as_posix().startswith("checkpoints/")
        }
        models = {f for f in files if f.startswith("services/")}
        assert models and all(f.startswith(f"services/{service}-") for f in models), (node, files)
        assert files - models == links.get(service, set()), (node, files)
    assert list(raystart.stores["head"].rglob("*.pt")) == []
    assert list(work.rglob("*.pt")) == [], "the driver's workdir holds parameter files"


def test_stop_leaves_no_process_and_frees_the_ports(raystart: RayStartCluster):
    holders = last_json(run_driver(HOLD, raystart.driver_env(), raystart.address, json.dumps(list(EDGES))))
    procs = raystart.processes()
    leaders = {p.pid for p in raystart.procs.values()}
    assert leaders <= set(procs)
    # Ray's workers leave the `ray start` process groups: the marker in their environment still finds them
    for name, pid in holders.items():
        assert pid in procs and os.getpgid(pid) not in leaders, (name, pid)
    ports = raystart.listening_ports()
    gcs_port = int(raystart.address.rsplit(":", 1)[1])
    assert {gcs_port, int(raystart.dashboard_url.rsplit(":", 1)[1])} <= ports

    raystart.stop()
    assert not raystart.forced  # every `ray start` drained (3 s here) and exited on its SIGTERM alone

    assert not [pid for pid, start in procs.items() if alive(pid, start)]
    assert not raystart.processes()
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", port))  # raises if any process still listens on it
    print(f"started in {raystart.started_in_s:.1f} s, stopped in {raystart.stopped_in_s:.1f} s")
