"""A real multi-node Ray cluster on loopback, started the way a provider starts one.

Each node is a `ray start --block` subprocess in a process group of its own, on its own loopback address
(head 127.0.0.2, workers 127.0.0.3, .4, ...), with token authentication on and the node's name as a custom
resource. Unlike `ray.cluster_utils.Cluster` this runs the same command lines as a real deployment, so the
tests see what a provider would: the auth handshake, per-node environments (`CODERAY_STORE`), the drain on
SIGTERM. Several Ray clusters may share this machine: every fixed default port is either chosen free here
or set to 0, each node keeps its own temp dir, and `stop()` signals only the processes this cluster started
(never `ray stop`, which stops every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

__all__ = ["RayStartCluster", "cluster_fixture", "HEAD_IP", "worker_ip", "alive"]

HEAD_IP = "127.0.0.2"
MARKER = "CODERAY_RAYSTART"  # in every node's environment, so every process of the cluster carries it
RAY = str(Path(sys.executable).with_name("ray"))
# Inherited settings that would point a node or driver at another cluster, token or address.
_FOREIGN = (
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
    "RAY_ADDRESS",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
)


def worker_ip(index: int) -> str:
    """Loopback address of the index-th worker node (0-based): 127.0.0.3, 127.0.0.4, ..."""
    return f"127.0.0.{3 + index}"


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on every interface (the GCS binds the wildcard address, not only the node's
    IP), all held open while picking so the kernel cannot hand out one twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a live process from a reused pid); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has exited


def alive(pid: int, start: int) -> bool:
    """Whether the process `pid` that started at `start` still runs."""
    return _start_time(pid) == start


class RayStartCluster:
    """Head + one worker node per named edge server, each from its own `ray start --block`.

    nodes: worker name → `--num-cpus`, in order: the first gets 127.0.0.3. The head carries resource
    {"head": 1} and the dashboard. Each node's `ray start` runs with CODERAY_STORE=<root>/stores/<name>
    (the head's store is named "head"), so every worker process on it inherits its own store.
    drain_timeout_s: Ray's drain on SIGTERM (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S); None keeps Ray's 30 s.
    """

    def __init__(
        self,
        nodes: Mapping[str, int],
        *,
        head_cpus: int = 1,
        object_store_mb: int = 90,
        drain_timeout_s: float | None = None,
        start_timeout_s: float = 120.0,
    ):
        if len(nodes) > 250:
            raise ValueError("at most 250 worker nodes fit on 127.0.0.0/24 after the head")
        self.nodes = dict(nodes)
        self.head_cpus = head_cpus
        self.object_store_mb = object_store_mb
        self.drain_timeout_s = drain_timeout_s
        self.start_timeout_s = start_timeout_s
        self.root: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}
        self.address = ""
        self.dashboard_url = ""
        self.env: dict[str, str] = {}
        self.stores: dict[str, Path] = {}
        self.token = ""
        self.started_in_s = 0.0  # wall time of start() and of the last stop(), for reports
        self.stopped_in_s = 0.0
        self.forced: list[str] = []  # nodes whose `ray start` outlived its SIGTERM and the drain bound

    def ips(self) -> dict[str, str]:
        """Node name → loopback address ("head" included)."""
        return {"head": HEAD_IP} | {name: worker_ip(i) for i, name in enumerate(self.nodes)}

    def start(self) -> RayStartCluster:
        """Start the head, then every worker at once; return once all are alive, or fail with the log tail
        of each node that is not."""
        t0 = time.monotonic()
        # A short root: Ray's Unix sockets live under each node's temp dir and their paths are capped at 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="raystart-"))
        (self.root / "logs").mkdir()
        try:
            self._make_token()
            gcs_port, client_port, dash_port = free_ports(3)
            self.address = f"{HEAD_IP}:{gcs_port}"
            self.dashboard_url = f"http://{HEAD_IP}:{dash_port}"
            self._spawn(
                "head",
                [
                    "--head",
                    f"--port={gcs_port}",
                    f"--ray-client-server-port={client_port}",
                    "--include-dashboard=true",
                    f"--dashboard-host={HEAD_IP}",
                    f"--dashboard-port={dash_port}",
                    f"--num-cpus={self.head_cpus}",
                ],
                {"head": 1},
            )
            self._wait_tcp("head", HEAD_IP, gcs_port)
            for name, cpus in self.nodes.items():
                self._spawn(name, [f"--address={self.address}", f"--num-cpus={cpus}"], {name: 1})
            self._wait_alive()
        except BaseException:
            self.stop(timeout_s=10, cleanup=False)  # a node that never came up has nothing to drain
            raise
        self.started_in_s = time.monotonic() - t0
        return self

    def _make_token(self) -> None:
        """`ray get-auth-token --generate` writes ~/.ray/auth_token; with HOME at our root, that is our file."""
        assert self.root is not None
        env = self._base_env() | {"HOME": str(self.root)}
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
        path = self.root / ".ray" / "auth_token"
        path.chmod(0o600)
        self.token = path.read_text().strip()
        # What a driver (or `serve deploy`, `ray job submit`) adds to its environment to join. The token itself
        # too: an inherited RAY_AUTH_TOKEN would win over the file. The nodes read only the file, as servers would.
        self.env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(path),
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    @staticmethod
    def _base_env() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in _FOREIGN}

    def driver_env(self, **extra: str) -> dict[str, str]:
        """The whole environment of a driver process that joins this cluster with its token."""
        return self._base_env() | self.env | extra

    def _spawn(self, name: str, args: list[str], resources: dict[str, float]) -> None:
        assert self.root is not None
        ip = self.ips()[name]
        store = self.root / "stores" / name
        store.mkdir(parents=True)
        self.stores[name] = store
        cmd = [
            RAY,
            "start",
            "--block",
            f"--node-ip-address={ip}",
            *args,
            f"--resources={json.dumps(resources)}",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            f"--temp-dir={self.root / name}",
            "--node-manager-port=0",
            "--object-manager-port=0",
            "--dashboard-agent-listen-port=0",
            "--dashboard-agent-grpc-port=0",
            "--metrics-export-port=0",
            "--runtime-env-agent-port=0",
            "--disable-usage-stats",
        ]
        env = self._base_env() | {k: v for k, v in self.env.items() if k != "RAY_AUTH_TOKEN"}
        env |= {"CODERAY_STORE": str(store), MARKER: str(self.root)}
        if self.drain_timeout_s is not None:
            env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = str(self.drain_timeout_s)
        self.commands[name] = cmd
        with open(self.root / "logs" / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def log_tail(self, name: str, lines: int = 25) -> str:
        """The last lines of a node's `ray start` output."""
        assert self.root is not None
        try:
            text = (self.root / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _check_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"ray start for node {name!r} exited with {proc.returncode} (logs under "
                    f"{self.root}):\n{self.log_tail(name)}"
                )

    def _wait_tcp(self, name: str, host: str, port: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            self._check_running()
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex((host, port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(
            f"node {name!r}: nothing listens on {host}:{port} after {self.start_timeout_s:.0f} s:\n"
            f"{self.log_tail(name)}"
        )

    def alive_nodes(self) -> dict[str, dict[str, Any]]:
        """Alive nodes by IP, from the dashboard's state API (with the token; raises if it does not answer)."""
        req = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/nodes?limit=1000", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            rows = json.load(resp)["data"]["result"]["result"]
        return {r["node_ip"]: r for r in rows if r["state"] == "ALIVE"}

    def _wait_alive(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        missing = dict(self.ips())
        while time.monotonic() < deadline:
            self._check_running()
            try:
                nodes = self.alive_nodes()
            except (OSError, urllib.error.URLError, KeyError, ValueError):
                nodes = {}
            missing = {
                n: ip for n, ip in self.ips().items() if ip not in nodes or nodes[ip]["resources_total"].get(n) != 1
            }
            if not missing:
                return
            time.sleep(0.5)
        tails = "\n".join(f"--- {n} ({ip}):\n{self.log_tail(n)}" for n, ip in missing.items())
        raise TimeoutError(f"Ray nodes not alive after {self.start_timeout_s:.0f} s: {sorted(missing)}\n{tails}")

    def processes(self) -> dict[int, int]:
        """pid → start time of every live process of this cluster: the `ray start`s, everything in their
        process groups and every process carrying the cluster's marker in its environment (Ray's workers
        run in sessions of their own, so a process group alone misses them)."""
        if self.root is None:
            return {}
        marker = f"{MARKER}={self.root}".encode()
        groups = {p.pid for p in self.procs.values()}
        found: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                ours = os.getpgid(pid) in groups or marker in (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            start = _start_time(pid)
            if ours and start is not None:
                found[pid] = start
        return found

    def listening_ports(self) -> set[int]:
        """TCP ports on which a process of this cluster listens."""
        inodes: set[str] = set()
        for pid in self.processes():
            try:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
            except OSError:
                continue
        ports: set[int] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        return ports

    def stop(self, *, timeout_s: float | None = None, cleanup: bool = True) -> None:
        """SIGTERM each `ray start` as a provider would (workers first, while the GCS still answers their
        drain), wait out Ray's drain, then end whatever of this cluster is left: SIGTERM, and SIGKILL as a
        last resort. Never `ray stop`. cleanup: remove the cluster's temp dir (logs, token, stores)."""
        if not self.procs:
            return
        t0 = time.monotonic()
        if timeout_s is None:
            timeout_s = (30.0 if self.drain_timeout_s is None else self.drain_timeout_s) + 15.0
        workers = {n: p for n, p in self.procs.items() if n != "head"}
        for group in (workers, {n: p for n, p in self.procs.items() if n == "head"}):
            for proc in group.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for name, proc in group.items():
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.forced.append(name)
                    proc.kill()
                    proc.wait(10)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self.processes()
            for pid in left:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + 10
            while left and time.monotonic() < deadline:
                left = {pid: st for pid, st in left.items() if alive(pid, st)}
                time.sleep(0.1)
        left = self.processes()
        if left:
            raise RuntimeError(f"processes of the Ray cluster at {self.address} survived SIGKILL: {sorted(left)}")
        if cleanup and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.procs = {}
        self.stopped_in_s = time.monotonic() - t0

    def __enter__(self) -> RayStartCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cluster_fixture(nodes: Mapping[str, int], *, scope: str = "module", **kwargs: Any) -> Any:
    """A pytest fixture yielding a started RayStartCluster, stopped at the end of its scope."""

    @pytest.fixture(scope=scope)
    def raystart_cluster() -> Iterator[RayStartCluster]:
        with RayStartCluster(nodes, **kwargs) as cluster:
            yield cluster

    return raystart_cluster
