"""Where replicas run: each service's replicas pin to its node's custom resource and take a CPU share of it.

A deploy that asks for a node no alive Ray node offers, or for more CPUs than the node has, fails here with a
ValueError naming the node, before `serve.run` (which would otherwise wait forever for the replica to fit).
"""

from __future__ import annotations

import logging
import os

from coderay.cluster import HEAD_RESOURCE, alive_resources, check_nodes, pin
from coderay.config import CoderayConfig
from coderay.emulation import cores_of

__all__ = [
    "direct_http_port",
    "listening_sockets",
    "open_files",
    "cpu_shares",
    "block_options",
    "serve_logging",
    "ingress_options",
    "check_placement",
    "torch_threads",
    "replica_location",
    "capacity_info",
]

log = logging.getLogger(__name__)


def cpu_shares(cfg: CoderayConfig) -> dict[str, float]:
    """CPUs of each service's block-group replica: its node's CPUs split evenly among the services on it.

    Ray accepts fractions below 1 and whole numbers above; a share above 1 is rounded down."""
    per_node: dict[str, list[str]] = {}
    for s in cfg.services:
        per_node.setdefault(s.node, []).append(s.name)
    shares = {}
    for node, names in per_node.items():
        share = cfg.node(node).cpus / len(names)
        shares.update({n: (float(int(share)) if share >= 1 else round(share, 4)) for n in names})
    return shares


def block_options(cfg: CoderayConfig, service: str) -> dict:
    """`ray_actor_options` of a service's block group: its node's resource and its CPU share."""
    return pin(cfg.service(service).node, cpu_shares(cfg)[service])


def listening_sockets() -> dict[str, int]:
    """{'socket:[inode]': port} of every listening TCP socket on this machine, from /proc/net ({} where it cannot
    be read): what a process's /proc/PID/fd links name."""
    out = {}
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    cols = line.split()
                    if cols[3] == "0A":  # 0A: LISTEN
                        out[f"socket:[{cols[9]}]"] = int(cols[1].rsplit(":", 1)[1], 16)
    except OSError:
        return {}
    return out


def open_files(pid: int | str = "self") -> set[str]:
    """What process `pid`'s file descriptors point at (sockets as 'socket:[inode]'); empty where not readable."""
    out: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed since the listing
            continue
    return out


def direct_http_port() -> int | None:
    """The HTTP port this process (an ingress replica in Serve's throughput-optimized mode) listens on itself,
    from /proc (Serve does not expose it to the replica); None where there is none or /proc cannot say."""
    from ray.serve._private import constants

    if not constants.RAY_SERVE_ENABLE_DIRECT_INGRESS:
        return None
    low, high = constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
    mine = open_files()
    return next((port for sock, port in listening_sockets().items() if low <= port <= high and sock in mine), None)


def serve_logging(cfg: CoderayConfig) -> dict:
    """Serve's `logging_config` for the proxy and every deployment: access logs only when asked for."""
    return {"enable_access_log": cfg.serving.access_log}


def ingress_options() -> dict:
    """The ingress reserves no CPU; on a coderay local cluster it sits on the head node, next to the proxy."""
    import ray

    if ray.is_initialized() and any(HEAD_RESOURCE in res for res in alive_resources().values()):
        return pin(HEAD_RESOURCE, 0.0)
    return {"num_cpus": 0.0}


def check_placement(cfg: CoderayConfig) -> None:
    """ValueError, fast, if a service's node is missing or offers fewer CPUs than its replicas ask for."""
    nodes = sorted({s.node for s in cfg.services})
    check_nodes(cfg, nodes)
    offered: dict[str, float] = {}
    for res in alive_resources().values():
        for name in nodes:
            if name in res:
                offered[name] = max(offered.get(name, 0.0), float(res.get("CPU", 0.0)))
    shares = cpu_shares(cfg)
    for name in nodes:
        want = sum(shares[s.name] for s in cfg.services if s.node == name)
        if want > offered.get(name, 0.0) + 1e-9:
            raise ValueError(
                f"node {name!r} offers {offered.get(name, 0.0):g} CPUs but its services' replicas ask "
                f"for {want:g}: give the node more CPUs (`ray start --num-cpus`) or lower "
                f"nodes[{name}].cpus in the config"
            )


def torch_threads(cpus: float) -> int:
    """torch threads for a replica owning `cpus` CPUs (at least 1)."""
    import torch

    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n


def capacity_info(cfg: CoderayConfig, cap) -> dict:
    """Inside a replica: its node's capacity emulation and the CPU seconds the node's group has used."""
    from coderay import capacity

    info = cap.as_dict()
    if cap.capped:
        used = capacity.usage(cap.node)
        info |= {"cpu_s": used.cpu_s, "throttled_periods": used.nr_throttled}
    return info


def replica_location(node: str) -> dict:
    """Inside a replica: the node it runs on, whether that node offers the resource it pinned, and the cores
    it may run on (`emulation.pin_cores`)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    expected = sorted(nid for nid, res in alive_resources().items() if node in res)
    return {
        "node": node,
        "node_id": here,
        "expected_node_ids": expected,
        "on_pinned_node": here in expected,
        "pid": os.getpid(),
        "cores": cores_of(),
    }
