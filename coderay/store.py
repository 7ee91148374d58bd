"""A node's own store: where a provider's checkpoint, block profile and the links its node runs live.

Every Ray node has one, the directory named by `CODERAY_STORE` in the environment of that node's `ray start`
(inherited by every worker there); without it, a `coderay-store` folder under Ray's temp dir. Work on a
provider's files runs pinned to its node (`coderay.provider`), so a store is read and written only by its own
node's processes: a provider's parameters never leave its server.

The local cluster of `coderay up` gives each emulated node `<workdir>/stores/<node>` (the same variable, set
for that node's raylet), so the demo takes the same code path as a real cluster. A process with no
`CODERAY_STORE` on a local configuration (the in-process search) finds a node's store by that layout.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from coderay.config import CoderayConfig, ServiceSpec

__all__ = [
    "STORE_ENV",
    "node_store",
    "local_store",
    "service_dir",
    "cached_metrics",
    "relative",
    "resolve",
    "pt_files",
]

STORE_ENV = "CODERAY_STORE"


def local_store(cfg: CoderayConfig, node: str) -> Path:
    """The store of an emulated node of the local cluster, under the workdir."""
    return cfg.root / "stores" / node


def node_store(cfg: CoderayConfig, node: str) -> Path:
    """The store this process uses for `node`'s files: its node's own (`CODERAY_STORE`), else the local
    cluster's layout for a local configuration, else the default under Ray's temp dir."""
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if cfg.emulation.local:
        return local_store(cfg, node)
    ray_tmp = os.environ.get("RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "ray")
    return Path(ray_tmp) / "coderay-store"


def relative(path: Path, cfg: CoderayConfig, node: str) -> str:
    """A store file's name as a table records it: relative to its store, so another machine resolves it."""
    return str(Path(path).resolve().relative_to(node_store(cfg, node)))


def resolve(name: str | Path, cfg: CoderayConfig, node: str) -> Path:
    """A file a table names, in this process's store of `node` (absolute names are kept as they are)."""
    p = Path(name)
    return p if p.is_absolute() else node_store(cfg, node) / p


def pt_files(directory: Path) -> list[Path]:
    """Every parameter file under `directory` (what an audit counts)."""
    return sorted(directory.rglob("*.pt")) if directory.exists() else []


def service_dir(cfg: CoderayConfig, spec: ServiceSpec) -> Path:
    """Where a service's checkpoint lives: in its node's store, keyed by everything that changes its weights."""
    key = cfg.fingerprint(spec.arch, spec.arch_kwargs, spec.task, spec.weights, spec.train, cfg.seed)
    return node_store(cfg, spec.node) / "services" / f"{spec.name}-{key}"


def cached_metrics(cfg: CoderayConfig, spec: ServiceSpec) -> dict | None:
    """The metrics of the service's checkpoint where its store holds one for this exact configuration, else None:
    whether it is trained, known without loading torch or the model (a cached `coderay up` asks every node)."""
    out = service_dir(cfg, spec)
    ckpt, metrics = out / "model.pt", out / "metrics.json"
    if not (ckpt.exists() and metrics.exists()):
        return None
    return json.loads(metrics.read_text()) | {"from_cache": True}
