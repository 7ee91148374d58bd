"""Build, deploy and describe the coderay Serve application.

One application, `coderay`, at route prefix `/`:
- `blocks-<svc>`: every service's frozen blocks on its node (a `BlockGroup`, pinned, batched);
- `links-<svc>`: the trained links whose paths run on `<svc>`'s node (a `LinkSet`; only where a path has links);
- `Ingress`: FastAPI over HTTP, with the routing map as its `user_config`.
Every candidate path's blocks stay deployed (they are the services' block groups), so switching a path is a
flip of the ingress's routing map: `PUT /v1/services/{svc}/route`, or a config deploy that changes the
Ingress's `user_config` (in-place `reconfigure`, no replica restart).
"""
from __future__ import annotations

import logging
import signal
import socket
import time
from pathlib import Path

import yaml
from ray import serve
from ray.serve import Application

from coderay.config import CoderayConfig, load_config
from coderay.table import RewardTable

from deployments.blocks import BlockGroup
from deployments.ingress import Ingress
from deployments.links import LinkSet
from deployments.placement import block_options, check_placement, cpu_shares, ingress_options, link_options
from deployments.routing import initial_routes, link_files

__all__ = ["APP_NAME", "INGRESS", "build_app", "app_builder", "deploy", "base_url", "write_serve_config",
           "serve_command", "free_port", "cached_table"]

log = logging.getLogger(__name__)
APP_NAME = "coderay"
INGRESS = "Ingress"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _absolute(cfg: CoderayConfig) -> CoderayConfig:
    """The config with its workdir made absolute: replicas resolve it on other nodes, from other directories."""
    return cfg if Path(cfg.workdir).is_absolute() else cfg.model_copy(update={"workdir": str(cfg.root)})


def build_app(cfg: CoderayConfig, table: RewardTable) -> Application:
    """The Serve application for `cfg` serving the paths of `table` (initial routes: each service's best path)."""
    cfg = _absolute(cfg)
    rows = table.rows
    files = link_files(rows)
    missing = [f for owned in files.values() for f in owned.values() if not Path(f).is_file()]
    if missing:
        raise ValueError(f"links files of the reward table are missing: {missing[:3]}; rerun `coderay search`")
    shares = cpu_shares(cfg)
    # max_ongoing_requests ≥ the batch (in samples, so in calls too); no request outlives request_timeout_s, so
    # a replica being replaced (or stuck on a lost node) need not be waited for longer than that.
    opts = {"num_replicas": 1,
            "max_ongoing_requests": max(64, 2 * cfg.serving.max_batch_size, *(2 * s.batch_size for s in cfg.services)),
            "graceful_shutdown_timeout_s": min(20.0, max(2.0, cfg.serving.request_timeout_s))}
    blocks = {s.name: BlockGroup.options(name=f"blocks-{s.name}", ray_actor_options=block_options(cfg, s.name),
                                         **opts).bind(cfg, s.name, shares[s.name])
              for s in cfg.services}
    links = {owner: LinkSet.options(name=f"links-{owner}", ray_actor_options=link_options(cfg, owner),
                                    **opts).bind(cfg, owner, owned)
             for owner, owned in sorted(files.items())}
    # One ingress replica: PUT /route changes the replica it reaches; a config deploy reaches every replica.
    return Ingress.options(name=INGRESS, num_replicas=1, max_ongoing_requests=1024,
                           ray_actor_options=ingress_options(),
                           user_config={"routes": initial_routes(cfg, rows)}).bind(cfg, rows, blocks, links)


def cached_table(cfg: CoderayConfig) -> RewardTable | None:
    """The in-process search's reward table if it is on disk (never runs a search)."""
    from coderay.search import search_dir

    directory = search_dir(cfg, exhaustive=cfg.search.exhaustive)
    return RewardTable.load(directory) if (directory / "table.json").exists() else None


def app_builder(args: dict) -> Application:
    """`import_path` target of the Serve config: args `{config: <path>, workdir: <path, optional>}`.

    Checks the cluster's nodes first (a missing node fails the deploy with its name instead of leaving it
    pending), then loads the cached reward table (runs the search only when there is none)."""
    from coderay.search import run_search

    if not isinstance(args, dict) or "config" not in args:
        raise ValueError(f"app args must be {{'config': <path to the coderay YAML>}}, got {args!r}")
    overrides = {"workdir": str(args["workdir"])} if args.get("workdir") else {}
    cfg = load_config(args["config"], **overrides)
    check_placement(cfg)
    return build_app(cfg, run_search(cfg, progress=False))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _start_serve(cfg: CoderayConfig, port: int | None) -> int:
    """Start Serve's HTTP proxy (on the head node) at `port` (None: the config's; 0: a free one). When Serve already
    runs, its port stays and is returned."""
    from ray.serve.context import _get_global_client

    port = cfg.serving.port if port is None else port
    if port == 0:
        port = free_port(cfg.serving.host if cfg.serving.host != "0.0.0.0" else "127.0.0.1")
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.serving.host, "port": port})
    actual = _get_global_client().http_config.port
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
    actual = _start_serve(cfg, port)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
    url = base_url(cfg, actual)
    log.info("coderay served at %s (deployed in %.1f s)", url, time.perf_counter() - start)
    return url


def write_serve_config(cfg: CoderayConfig, config_path: str | Path, out_path: str | Path, *,
                       port: int | None = None) -> Path:
    """A Serve config YAML for `serve deploy` (or Serve's REST API) describing this application.

    Its Ingress `user_config.routes` is the routing map: edit a route and deploy the file again to switch it
    in place (reconfigure, no restart). The builder loads `config_path` with `workdir` made absolute."""
    cfg = _absolute(cfg)
    port = cfg.serving.port if port is None else port
    table = cached_table(cfg)
    app: dict = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": "deployments.app:app_builder",
        "args": {"config": str(Path(config_path).resolve()), "workdir": cfg.workdir},
        "runtime_env": {"working_dir": f"local://{REPO_ROOT}"},
    }
    if table is not None:
        app["deployments"] = [{"name": INGRESS, "user_config": {"routes": initial_routes(cfg, table.rows)}}]
    doc = {"proxy_location": "HeadOnly",
           "http_options": {"host": cfg.serving.host, "port": port or 8000},
           "applications": [app]}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Serve config for coderay config {cfg.name!r}, written by coderay.\n"
              "# Deploy: `serve deploy <this file>` (needs the Ray dashboard). Switch a path in place: edit\n"
              "# deployments[Ingress].user_config.routes and deploy again. coderay must be importable on every\n"
              f"# node: working_dir is {REPO_ROOT} there (a local:// URI: the directory must exist on each node).\n")
    out.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return out


def serve_command(cfg: CoderayConfig, *, config_path: str | Path, address: str | None = None,
                  port: int | None = None, block: bool = True) -> int:
    """`coderay serve`: connect (or start a local cluster), load the search table, deploy, print the endpoint,
    write the Serve config under the workdir, and serve until Ctrl-C when `block`."""
    from coderay.cluster import connect
    from coderay.search import run_search

    local = connect(cfg, address)
    try:
        table = run_search(cfg)
        url = deploy(cfg, table, port=port)
        actual = int(url.rsplit(":", 1)[1])
        out = write_serve_config(cfg, config_path, cfg.root / "serve-config.yaml", port=actual)
    except BaseException:
        if local is not None:
            local.shutdown()
        raise
    svc = cfg.services[0]
    shape = ",".join(map(str, (1, *_input_shape(cfg, svc.name))))
    print(f"coderay is serving {len(cfg.services)} service(s) at {url}")
    print(f"  API docs:   {url}/docs")
    print(f"  services:   curl {url}/v1/services")
    print(f"  infer:      head -c {4 * _numel(shape)} /dev/zero | curl -s -X POST {url}/v1/services/{svc.name}/infer "
          f"-H 'Content-Type: application/octet-stream' -H 'X-Shape: {shape}' --data-binary @-")
    print(f"  switch:     curl -X PUT {url}/v1/services/{svc.name}/route -H 'Content-Type: application/json' "
          f"-d '{{\"path\": \"{svc.name}:local\"}}'")
    print(f"  Serve config: {out}")
    if not block:
        return 0
    print("serving until Ctrl-C (or SIGTERM)")
    signal.signal(signal.SIGTERM, _interrupt)     # `kill`, a service manager: shut down as on Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)      # also when started in the background, where SIGINT is ignored
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        serve.shutdown()
        if local is not None:
            local.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _input_shape(cfg: CoderayConfig, service: str) -> tuple[int, ...]:
    from coderay.data import get_task

    spec = cfg.service(service)
    return get_task(spec.task, data_root=cfg.data_root, seed=cfg.seed).input_shape


def _numel(shape: str) -> int:
    n = 1
    for v in shape.split(","):
        n *= int(v)
    return n
