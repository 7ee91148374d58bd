"""Build, deploy and describe the coderay Serve application.

One application, `coderay`, at route prefix `/`:
- `blocks-<svc>`: every service's frozen blocks on its node (a `BlockGroup`, pinned, batched), with the trained
  links that run on that node (its `user_config`), so each stage of a path (its hops on one node) is one call;
- `Ingress`: FastAPI over HTTP, with the routing map as its `user_config`.
Every candidate path's blocks stay deployed (they are the services' block groups), so switching a path is a
flip of the ingress's routing map: `PUT /v1/services/{svc}/route`, or a config deploy that changes the
Ingress's `user_config` (in-place `reconfigure`, no replica restart).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray import serve
from ray.serve import Application, Deployment

from coderay.auth import load_keyring
from coderay.cluster import LocalCluster, connect, exit_if_gcs_lost
from coderay.config import CoderayConfig, load_config
from coderay.controller import APP_NAME
from coderay.errors import NotSearchedError
from coderay.routing import initial_routes, link_files
from coderay.search import load_table
from coderay.table import RewardTable
from deployments.blocks import BlockGroup
from deployments.ingress import Ingress
from deployments.placement import block_options, check_placement, cpu_shares, ingress_options, serve_logging

__all__ = [
    "APP_NAME",
    "INGRESS",
    "build_app",
    "app_builder",
    "deploy",
    "base_url",
    "serve_config_doc",
    "write_serve_config",
    "Served",
    "start_serving",
    "direct_url",
    "served_table",
    "free_port",
    "start_front",
]

log = logging.getLogger(__name__)
INGRESS = "Ingress"
REPO_ROOT = Path(__file__).resolve().parent.parent


def build_app(cfg: CoderayConfig, table: RewardTable) -> Application:
    """The Serve application for `cfg` serving the paths of `table` (initial routes: each service's best path)."""
    cfg = cfg.portable()
    rows = table.rows
    files = link_files(rows)  # store-relative names: each block group reads its own node's store
    shares = cpu_shares(cfg)
    # max_ongoing_requests ≥ the batch (in samples, so in calls too); no request outlives request_timeout_s, so
    # a replica being replaced (or stuck on a lost node) need not be waited for longer than that.
    # at least two batches of one-sample calls in flight per replica, so a batch can fill while one runs
    opts = {
        "num_replicas": 1,
        "max_ongoing_requests": 2 * max(min(s.batch_size, cfg.serving.max_batch_size) for s in cfg.services),
        "graceful_shutdown_timeout_s": min(20.0, max(2.0, cfg.serving.request_timeout_s)),
        "logging_config": serve_logging(cfg),
    }
    # mypy keeps a decorated class's type: @serve.deployment made BlockGroup and Ingress Deployments
    # the links in user_config: a table with other links reconfigures the running groups instead of replacing them
    blocks = {
        s.name: _versioned(
            BlockGroup.options(  # type: ignore[attr-defined]
                name=f"blocks-{s.name}",
                ray_actor_options=block_options(cfg, s.name),
                user_config={"links": files.get(s.name, {})},
                **opts,
            ),
            cfg.model_dump(mode="json"),
            s.name,
            shares[s.name],
        ).bind(cfg, s.name, shares[s.name])
        for s in cfg.services
    }
    # One ingress replica by default: PUT /route changes the replica it reaches; a config deploy reaches every
    # replica, and so do the controller's routes (each replica polls it: coderay.controller).
    # No routes in its user_config: routes given there are pins (an operator's), and none is set yet.
    keys = load_keyring(cfg).as_args()
    ingress = Ingress.options(  # type: ignore[attr-defined]
        name=INGRESS,
        num_replicas=cfg.serving.ingress_replicas,
        max_ongoing_requests=cfg.serving.max_ongoing_requests,
        ray_actor_options=ingress_options(),
        logging_config=serve_logging(cfg),
        user_config={"routes": {}},
    )
    return _versioned(ingress, cfg.model_dump(mode="json"), [r.to_dict() for r in rows], keys).bind(
        cfg, rows, blocks, keys
    )


def _versioned(deployment: Deployment, *built_from: object) -> Deployment:
    """`deployment` with a version that stays the same while coderay's code and what it is `built_from` (its
    init args) do: a deploy that changes only its user_config (other links, other routes) then reconfigures
    its running replicas in place. `serve.run` would give every deployment a new random version each time and
    replace every replica. Serve reserves `version` for itself (`_internal`); tests/test_cli_up.py checks that
    the block groups keep their processes across a table switch."""
    digest = hashlib.sha256(_code_digest().encode())
    digest.update(json.dumps(built_from, sort_keys=True, default=str).encode())
    return deployment.options(version=digest.hexdigest()[:16], _internal=True)


@functools.cache
def _code_digest() -> str:
    """The coderay code this process runs (what the replicas would import): a new version on another code."""
    digest = hashlib.sha256()
    for package in ("coderay", "deployments"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def served_table(cfg: CoderayConfig) -> RewardTable:
    """The search's reward table from disk; serving never searches (nor trains)."""
    table = load_table(cfg)
    if table is None:
        raise NotSearchedError(
            f"no reward table for config {cfg.name!r} under {cfg.root / 'search'}: run "
            "`coderay search CONFIG` (or `coderay up`) first"
        )
    return table


def app_builder(args: dict) -> Application:
    """`import_path` target of the Serve config: args `{config: <path>, workdir: <path, optional>,
    real_cluster: <bool, optional: nothing emulated>}`.

    Checks the cluster's nodes first (a missing node fails the deploy with its name instead of leaving it
    pending), then loads the search's reward table (a config never searched fails with the command to run)."""
    if not isinstance(args, dict) or "config" not in args:
        raise ValueError(f"app args must be {{'config': <path to the coderay YAML>}}, got {args!r}")
    overrides = {"workdir": str(args["workdir"])} if args.get("workdir") else {}
    cfg = load_config(args["config"], **overrides)
    if args.get("real_cluster"):
        cfg = cfg.on_real_cluster()
    check_placement(cfg)
    return build_app(cfg, served_table(cfg))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_front(cfg: CoderayConfig, port: int | None) -> int:
    """Start Serve's HTTP front (on the head node: Ray's HAProxy ingress where `serving.haproxy` put it in the
    cluster's environment, else Serve's proxy) at `port` (None: the config's; 0: a free one). When Serve already
    runs, its port stays and is returned."""
    from ray.serve.context import _get_global_client

    port = cfg.serving.port if port is None else port
    if port == 0:
        port = free_port(cfg.serving.host if cfg.serving.host != "0.0.0.0" else "127.0.0.1")
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": cfg.serving.host, "port": port},
        logging_config=serve_logging(cfg),
    )
    client = _get_global_client()
    assert client is not None  # Serve runs (serve.start above); Ray raises where it does not
    actual = client.http_config.port
    if actual != port:
        log.warning("Serve already runs with HTTP on port %d; %d is ignored", actual, port)
    return actual


def base_url(cfg: CoderayConfig, port: int) -> str:
    host = cfg.serving.host if cfg.serving.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{port}"


def deploy(cfg: CoderayConfig, table: RewardTable, *, port: int | None = None, blocking: bool = False) -> str:
    """Deploy (or update) the application on the connected Ray cluster; return its base URL.

    Fails fast with ValueError when a service's node is missing or too small (before anything is deployed).
    `blocking`: serve until Ctrl-C, then return."""
    check_placement(cfg)
    app = build_app(cfg, table)
    start = time.perf_counter()
    actual = start_front(cfg, port)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
    url = base_url(cfg, actual)
    log.info("coderay served at %s (deployed in %.1f s)", url, time.perf_counter() - start)
    return url


def serve_config_doc(
    cfg: CoderayConfig,
    config_path: str | Path,
    *,
    port: int | None = None,
    workdir: str | Path | None = None,
    working_dir: str | Path | None = None,
    table: RewardTable | None = None,
) -> dict:
    """The Serve config (`serve deploy`'s schema, KubeRay's `serveConfigV2`) that describes this application.

    `workdir` (the builder's) and `working_dir` (where coderay is importable) are paths as the cluster's nodes see
    them, by default this machine's; a URI `working_dir` is kept as is. The Ingress's `user_config.routes` come
    from `table` (default: the search's table under that workdir, when one is there): edit a route and deploy the
    config again to switch it in place (reconfigure, no restart)."""
    if workdir is not None:
        cfg = cfg.model_copy(update={"workdir": str(workdir)})
    cfg = cfg.portable()
    port = cfg.serving.port if port is None else port
    code = str(working_dir or REPO_ROOT)
    table = table if table is not None else load_table(cfg)
    app: dict = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": "deployments.app:app_builder",
        "args": {"config": str(Path(config_path).resolve()), "workdir": cfg.workdir}
        | ({} if cfg.emulation.local else {"real_cluster": True}),
        "runtime_env": {"working_dir": code if "://" in code else f"local://{Path(code).absolute()}"},
    }
    if table is not None:
        app["deployments"] = [{"name": INGRESS, "user_config": {"routes": initial_routes(cfg, table.rows)}}]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.serving.host, "port": port or 8000},
        "applications": [app],
    }


def write_serve_config(
    cfg: CoderayConfig,
    config_path: str | Path,
    out_path: str | Path,
    *,
    port: int | None = None,
    table: RewardTable | None = None,
) -> Path:
    """`serve_config_doc` as a YAML file for `serve deploy` (or Serve's REST API), with how to use it.

    The builder loads `config_path` with `workdir` made absolute."""
    doc = serve_config_doc(cfg, config_path, port=port, table=table)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Serve config for coderay config {cfg.name!r}, written by coderay.\n"
        "# Deploy: `serve deploy <this file>` (needs the Ray dashboard). Switch a path in place: edit\n"
        "# deployments[Ingress].user_config.routes and deploy again. coderay must be importable on every\n"
        f"# node: working_dir is {REPO_ROOT} there (a local:// URI: the directory must exist on each node).\n"
    )
    out.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return out


@dataclass
class Served:
    """A running deployment: where it answers, the Serve config written for it, the local cluster (if any), and
    the ingress replica's own HTTP port where Serve runs throughput-optimized (no proxy hop; None otherwise)."""

    url: str
    serve_config: Path
    cluster: LocalCluster | None
    direct_url: str | None = None
    cfg: CoderayConfig | None = None  # what `redeploy` deploys again
    config_path: Path | None = None
    controller: bool = False

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def redeploy(self, table: RewardTable) -> None:
        """Serve `table` in place of the one deployed (a search that finished while serving): the block groups load
        the new links in place (`BlockGroup.reconfigure`, no restart), Serve starts a new ingress on the new rows
        and answers from the old one until it is up; the controller starts over on the new table; the Serve
        config is written again."""
        assert self.cfg is not None and self.config_path is not None  # set by start_serving
        _deploy_table(self.cfg, table, self.config_path, port=self.port, controller=self.controller)
        if self.direct_url is not None:  # the new ingress replica's own port
            self.direct_url = direct_url(self.url)

    def shutdown(self, *, exit_code: int | None = None) -> None:
        """Stop the controller and Serve, then the local cluster. exit_code: where the cluster's GCS is gone
        before or while they stop (a stop sent to the whole process group took it down), this process ends with
        it once the cluster is abandoned, instead of Ray's 60 s wait for the GCS (`LocalCluster.shutdown`)."""
        from coderay.controller import stop_controller

        with self.cluster.guard(exit_code) if self.cluster is not None else exit_if_gcs_lost(exit_code):
            stop_controller()
            serve.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown(exit_code=exit_code)


def start_serving(
    cfg: CoderayConfig,
    *,
    config_path: str | Path,
    address: str | None = None,
    port: int | None = None,
    controller: bool | None = None,
    cluster: LocalCluster | None = None,
    table: RewardTable | None = None,
) -> Served:
    """Connect (or start a local cluster, or use `cluster`), check that every node's store holds its service
    and the links it runs, deploy, start the controller (unless `controller` is False, or None and the config's
    `controller.enabled` is off), and write the Serve config under the workdir. The driver reads the reward
    table only (`table`, default: the search's on disk); an untrained service or a missing links file fails
    with the node and the command to run."""
    if address:
        cfg = cfg.on_real_cluster()  # real nodes: no CPU caps, no emulated delays
    table = table if table is not None else served_table(cfg)
    own = cluster is None  # a cluster given is its caller's to shut down, on failure too
    if cluster is None:
        cluster = connect(cfg, address)
    try:
        controller = cfg.controller.enabled if controller is None else controller
        url, out = _deploy_table(cfg, table, config_path, port=port, controller=controller)
    except BaseException:
        if own and cluster is not None:
            cluster.shutdown()
        raise
    direct = direct_url(url) if cfg.serving.throughput_optimized else None
    return Served(url, out, cluster, direct, cfg, Path(config_path), controller)


def _deploy_table(
    cfg: CoderayConfig, table: RewardTable, config_path: str | Path, *, port: int | None, controller: bool
) -> tuple[str, Path]:
    """Deploy `table` (each node's store checked first), start the controller on it, and write its Serve config
    under the workdir: a first deploy and an in-place one alike. Returns the URL and the Serve config's path."""
    from coderay.provider import check_stores

    check_stores(cfg, {svc: files.values() for svc, files in link_files(table.rows).items()})
    url = deploy(cfg, table, port=port)
    if controller:
        from coderay.controller import start_controller

        start_controller(cfg, table.rows)
    actual = int(url.rsplit(":", 1)[1])
    return url, write_serve_config(cfg, config_path, cfg.root / "serve-config.yaml", port=actual, table=table)


def direct_url(url: str, *, wait_s: float = 10.0) -> str | None:
    """The ingress replica's direct HTTP address, as its /healthz reports it (Serve's direct ingress), or None."""
    import httpx

    deadline = time.monotonic() + wait_s
    while True:
        try:
            port = httpx.get(f"{url}/healthz", timeout=5).json().get("direct_http_port")
        except (httpx.HTTPError, ValueError):
            port = None
        if port or time.monotonic() > deadline:
            return f"{url.rsplit(':', 1)[0]}:{port}" if port else None
        time.sleep(0.5)
