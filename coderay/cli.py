"""`coderay`: the command line. Library code logs; this module prints."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

from coderay.cluster import INTERRUPTED
from coderay.config import DEFAULT_CONFIG, load_config
from coderay.emulation import HEAD, core_plan
from coderay.errors import CoderayError

__all__ = ["main"]

T = TypeVar("T")

WATCH_S = 0.2  # how often the stop watcher looks at the local cluster while the main thread does not answer
_heard = threading.Event()  # the main thread ran its stop handler (`_interrupt`)
_cleaning = threading.Event()  # ... and its code took the stop: the clean-up runs (`_stopping`)
_serving = threading.Event()  # `up`/`serve` serves: a stop from now on ends with status 0
_said = threading.Event()  # "stopping" was said (once: the main thread and the stop watcher may both get there)
_saying = threading.Lock()  # ... and not twice at once
_watching = threading.Event()  # the stop watcher runs (one per process)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input: expected CxHxW such as 1x28x28, got {text!r}") from None
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"--input: every dimension must be ≥ 1, got {text!r}")
    return c, h, w


def cmd_blocks(args: argparse.Namespace) -> int:
    from coderay.blocks import format_block_table, profile_blocks, split_model
    from coderay.models import get_model, list_models, list_torchvision_models

    if args.list:
        print("registered (hand-staged): " + " ".join(list_models()))
        print("torchvision (traced with torch.fx): " + " ".join(list_torchvision_models()))
        print("your own: package.module:function (returns an nn.Module; called with num_classes when it takes it)")
        return 0
    if args.arch is None:
        print("coderay blocks: give an architecture name, or --list to see them", file=sys.stderr)
        return 2
    try:
        model = get_model(args.arch, num_classes=args.classes, input_shape=args.input).eval()
        if args.cuts:
            names = model.stage_names
            print(
                f"{args.arch}: {len(names) - 1} valid cut points at input {'x'.join(map(str, args.input))} "
                "(cut after the named node; MACs of the stage ending there)"
            )
            for name in names[:-1]:
                shape = "x".join(map(str, model.stage_shapes[name]))
                print(f"  {name:<40} {shape:<16} {model.stage_macs[name]:>14,}")
            return 0
        blocks = split_model(model, blocks=args.blocks)
    except (ValueError, TypeError) as err:
        print(f"coderay blocks: {err}", file=sys.stderr)
        return 2
    infos = profile_blocks(blocks, args.input, batch_sizes=tuple(args.batch_sizes))
    if args.json:
        print(
            json.dumps({"arch": args.arch, "input": list(args.input), "blocks": [i.to_dict() for i in infos]}, indent=2)
        )
    else:
        print(f"{args.arch}: {len(blocks)} blocks, input {'x'.join(map(str, args.input))}")
        print(format_block_table(infos))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Every service trains on its own node (a Ray task there, writing to that node's store); this process
    gets metrics only."""
    from coderay.cluster import connect
    from coderay.provider import train_on_nodes

    cfg = load_config(args.config, **_workdir(args))
    if args.address:
        cfg = cfg.on_real_cluster()
    cluster = connect(cfg, args.address)
    try:
        print(f"training {len(cfg.services)} service(s), each on its own node", flush=True)
        results = train_on_nodes(
            cfg,
            force=args.force,
            on_epoch=_print_epoch,
            on_done=lambda n, m: print(
                f"  {n}: done on {m['node']} ({m['node_ip']}), test acc {m['test_acc']:.4f}", flush=True
            ),
        )
    finally:
        _disconnect(cluster)
    print(f"{'service':<12} {'node':<12} {'task':<18} {'val acc':>8} {'test acc':>9} {'seconds':>8}  cached  store")
    for name, m in results.items():
        print(
            f"{name:<12} {m['node']:<12} {m['task']:<18} {m['val_acc']:>8.4f} {m['test_acc']:>9.4f} "
            f"{m['train_seconds']:>8.1f}  {'yes' if m['from_cache'] else 'no ':<6}  {m['store']}"
        )
    return 0


def _print_epoch(e: dict) -> None:
    print(
        f"  {e['service']}: epoch {e['epoch']}/{e['epochs']}, loss {e['loss']:.4f}, val acc {e['val_acc']:.4f}",
        file=sys.stderr,
        flush=True,
    )


def _disconnect(cluster, *, exit_code: int | None = None) -> None:
    """Shut the local cluster down, or leave the one given by --address. exit_code: where the cluster turns out
    lost meanwhile (a stop sent to the whole process group took it down), the process ends with it at once."""
    import ray

    from coderay.cluster import exit_if_gcs_lost

    if cluster is not None:
        cluster.shutdown(exit_code=exit_code)
    else:
        with exit_if_gcs_lost(exit_code):
            ray.shutdown()


@contextlib.contextmanager
def _disconnected_on_error(cluster):
    """The block's failure shuts the cluster down; Ctrl-C or SIGTERM says "stopping" first, and a cluster lost
    with this process then ends it with INTERRUPTED (`main` says the rest)."""
    try:
        yield
    except KeyboardInterrupt:
        _stopping()
        _disconnect(cluster, exit_code=INTERRUPTED)
        raise
    except BaseException:
        _disconnect(cluster)
        raise


def _meanwhile(work: Callable[[], T]) -> Future[T]:
    """Run `work` in a thread while the main one waits on Ray (nodes training or loading): seconds of a start's
    critical path spent where a core is idle. Its result, or its failure, comes from the future."""
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(work())
        except BaseException as e:  # noqa: BLE001 — handed to whoever takes the result
            done.set_exception(e)

    threading.Thread(target=run, name="coderay-meanwhile", daemon=True).start()  # daemon: a stop never waits on it
    return done


def _start_front(cfg, port: int | None) -> int:
    """Serve's controller and HTTP front started (`deployments.app.start_front`); its modules (torch, Serve, the
    search's) imported on the way."""
    from deployments.app import start_front

    return start_front(cfg, port)


def _check_port(cfg, args: argparse.Namespace) -> None:
    """The HTTP port of a local cluster, checked before anything starts (a remote head's is not ours to see)."""
    if args.address is None:
        from coderay.cluster import check_port

        check_port(cfg, args.port)


def print_search(table) -> None:
    """The reward table of every local service, its best path and where the files are."""
    from coderay.routing import model_share

    for local in table.locals:
        summary = table.meta["summary"][local]
        print(
            f"\n== {local}: {summary['candidates']} candidates, {summary['trained']} trained "
            f"({summary['trained_fraction']:.0%}) =="
        )
        print(table.format(local, limit=None if table.meta.get("mode") == "exhaustive" else 15))
        best, base = table.best(local), table.row(f"{local}:local")
        print(f"best path: {best.path_id}  ({best.kind})")
        how = table.meta.get("profiles", "profiles of unknown origin")
        network = table.meta.get("network_source", "emulated (the config's)")
        print(
            f"  path accuracy {best.test_acc:.4f} (test), average accuracy A^av {best.acc_avg_test:.4f} vs "
            f"local-only {base.test_acc:.4f}; throughput {best.th_total:.0f}/s = {best.th_ratio:.2f}x "
            f"local-only (modelled: blocks {how}; network {network})"
        )
        if best.kind == "coop":
            print(
                f"  served at a share of {model_share(best):.2f} of requests (the rest local-only), activations "
                f"as {best.encoding}, link_out on the {best.link_out_on} node, links {best.link_variant}"
            )
    out = table.meta.get("dir")
    if out:
        print(f"\nreward table: {out}/table.json, {out}/table.csv; Pareto plot: {out}/pareto.png")


def cmd_search(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, **_workdir(args))
    exhaustive = args.exhaustive or None
    if args.in_process:
        from coderay.search import run_search

        table = run_search(cfg, exhaustive=exhaustive, use_cache=not args.force)
    else:
        from tuning.search import run_tune_search

        table = run_tune_search(cfg, address=args.address, exhaustive=exhaustive, resume=not args.force)
    if args.json:
        print(json.dumps({"meta": table.meta, "rows": [r.to_dict() for r in table.rows]}, indent=2, default=str))
    else:
        print_search(table)
    return 0


def serve_until_stopped(cfg, args: argparse.Namespace, *, cluster=None, table=None, finish=None, served=None) -> int:
    """Deploy `table` (None: the search's on disk) on `cluster` (None: the one --address names), or in place of
    what `served` serves, print how to reach it, and serve until Ctrl-C or SIGTERM (unless --no-block);
    `finish()`, where given, completes the search while serving and its table is deployed in place. A stop at
    any point of it shuts down what runs."""
    import time

    from deployments.app import start_serving

    controller = False if getattr(args, "no_controller", False) else None
    try:
        if served is None:
            served = start_serving(
                cfg,
                config_path=Path(args.config).resolve(),
                address=args.address,
                port=args.port,
                controller=controller,
                cluster=cluster,
                table=table,
            )
        else:
            served.controller = cfg.controller.enabled if controller is None else controller
            served.redeploy(table)
        _print_served(cfg, args, served)
        if args.no_block:
            if finish is not None:
                print("search: its explored candidates stay untrained (--no-block); the next `coderay up` trains them")
            return 0
        signal.signal(signal.SIGTERM, _interrupt)  # ours again, whatever Serve's start-up installed
        _serving.set()
        print("serving until Ctrl-C (or SIGTERM)", flush=True)
        if finish is not None:
            _finish_while_serving(served, finish)
            signal.signal(signal.SIGTERM, _interrupt)  # ours again after the redeploy's Serve calls
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _stopping()
        stopped = 0 if _serving.is_set() else INTERRUPTED  # a stop while serving is the end asked for
        _shut_down(served, cluster, exit_code=stopped)
        if stopped:
            raise
        return 0
    except BaseException:
        _shut_down(served, cluster)
        raise


def _finish_while_serving(served, finish) -> None:
    """The search's deferred part (explored candidates, baselines) while its first table serves; the whole table
    then replaces it in place. A failure leaves the first table serving."""
    import time

    start = time.perf_counter()
    print("search: training the explored candidates and scoring the baselines while serving", flush=True)
    try:
        table = finish()
        print_search(table)
        served.redeploy(table)
    except Exception as e:  # noqa: BLE001 — what serves keeps serving
        print(f"search: finishing it failed ({type(e).__name__}: {e}); the first table keeps serving", flush=True)
        return
    best = ", ".join(f"{local} {table.best(local).path_id}" for local in table.locals)
    print(
        f"search finished while serving [+{time.perf_counter() - start:.0f}s]: serving the whole table ({best})",
        flush=True,
    )


def _shut_down(served, cluster, *, exit_code: int | None = None) -> None:
    """Stop Serve and the cluster, or only the cluster where nothing was served yet (`_disconnect`)."""
    if served is not None:
        served.shutdown(exit_code=exit_code)
    else:
        _disconnect(cluster, exit_code=exit_code)


def _print_served(cfg, args: argparse.Namespace, served) -> None:
    """Where the services answer, and how to try them."""
    from deployments.schemas import BODY_DTYPE

    url, svc = served.url, cfg.services[0]
    shape = (1, *_input_shape(cfg, svc.name, url))
    print(f"coderay is serving {len(cfg.services)} service(s) at {url}")
    print(f"  API docs:   {url}/docs")
    if served.direct_url:
        front = "Ray's HAProxy ingress" if cfg.serving.haproxy else "Serve's proxy"
        print(
            f"  direct:     {served.direct_url}   (the same API from the ingress replica itself, the port {front} "
            "forwards to: Serve's throughput-optimized mode)"
        )
    print(f"  services:   curl {url}/v1/services")
    print(
        f"  infer:      head -c {BODY_DTYPE.itemsize * math.prod(shape)} /dev/zero | "
        f"curl -s -X POST {url}/v1/services/{svc.name}/infer "
        f"-H 'Content-Type: application/octet-stream' -H 'X-Shape: {','.join(map(str, shape))}' --data-binary @-"
    )
    print(
        f"  pin a path: curl -X PUT {url}/v1/services/{svc.name}/route -H 'Content-Type: application/json' "
        f'-d \'{{"path": "{svc.name}:local"}}\'   (release: curl -X DELETE {url}/v1/services/{svc.name}/route)'
    )
    print(f"  Serve config: {served.serve_config}")
    plan = core_plan(cfg) if args.address is None else {}
    if plan:
        nodes = sorted({c for n, cores in plan.items() if n != HEAD for c in cores})
        print(
            f"  cores:      Ray's own processes, the proxy and the ingress on {_cores(plan[HEAD])}, the nodes' work "
            f"on {_cores(nodes)} (emulation.pin_cores)"
        )
    local = served.cluster  # None on a cluster given by --address: its token is the operator's
    token = local.token if local is not None else None  # None also where the local cluster runs without one
    if local is not None and local.cluster is not None and token is not None:
        print(
            f"  Ray:        {local.cluster.address}, token authentication, token in {token} (coderay "
            f"status finds it; other drivers: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token})"
        )
    if cfg.controller.enabled and not getattr(args, "no_controller", False):
        print(
            f"  controller: coderay status{'' if args.address is None else ' --address ' + args.address}   "
            f"(or curl {url}/v1/controller)"
        )


def _interrupt(signum, frame) -> None:
    """Ctrl-C or SIGTERM: stop as on KeyboardInterrupt; further signals are ignored so the clean-up (cluster,
    Serve, cgroups) runs to its end instead of being cut short with a traceback."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _heard.set()
    raise KeyboardInterrupt


def _unraisable(hook):
    """sys.unraisablehook: a stop that `_interrupt` raised where Python cannot raise it (an at-fork hook of a
    Popen, a finalizer) would be printed as "Exception ignored" and lost, with further signals ignored; it is
    raised again in the main thread a moment later instead, silently. Anything else goes to `hook`."""

    def unraisable(args) -> None:
        if args.exc_type is not KeyboardInterrupt or not _heard.is_set():
            hook(args)
            return
        signal.signal(signal.SIGTERM, _interrupt)
        threading.Timer(0.05, _thread.interrupt_main, args=(signal.SIGTERM,)).start()

    return unraisable


def _say_stopping() -> None:
    with _saying:
        if not _said.is_set():
            print("stopping", flush=True)
            _said.set()


def _stopping() -> None:
    """The main thread takes a stop: its clean-up watches the cluster from here (`exit_if_gcs_lost`)."""
    _cleaning.set()
    _say_stopping()


def _watch_stops() -> None:
    """Hear Ctrl-C and SIGTERM in a thread too (`signal.set_wakeup_fd`): Python runs `_interrupt` in the main
    thread between two bytecodes only, and a stop sent to the whole process group takes the local cluster's GCS
    down with this process, so a main thread waiting in a GCS call (starting a node, say) would hear it only when
    Ray gives up, 30 to 60 s later, and then end with Ray's errors. Once per process."""
    if _watching.is_set():
        return
    _watching.set()
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    threading.Thread(target=_stop_if_stuck, args=(read,), name="coderay-stop-watch", daemon=True).start()


def _stop_if_stuck(read: int) -> None:
    """On a stop signal: "stopping" at once; then, until the main thread takes the stop (it may wait in Ray, or
    be starting the cluster), where the local cluster is gone, abandon it and end the process with the status
    the main thread would give."""
    from coderay.cluster import abandon_local_clusters, local_gcs_lost

    while os.read(read, 1)[0] not in (signal.SIGTERM, signal.SIGINT):
        pass
    _say_stopping()  # at once, whatever the main thread is doing
    while not _cleaning.wait(WATCH_S):
        if local_gcs_lost():
            abandon_local_clusters()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(0 if _serving.is_set() else INTERRUPTED)


def _cores(cores) -> str:
    return ("core " if len(cores) == 1 else "cores ") + ",".join(map(str, cores))


def _input_shape(cfg, service: str, url: str) -> tuple[int, ...]:
    """A service's input shape: as the running service states it (GET /v1/services), else from its task's data
    (where keys guard the API; loading the data takes a second)."""
    import httpx

    from coderay.data import get_task

    try:
        listed = httpx.get(f"{url}/v1/services", timeout=5).json()
        return next(tuple(s["input_shape"]) for s in listed if s["name"] == service)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, StopIteration):
        spec = cfg.service(service)
        return get_task(spec.task, data_root=cfg.data_root, seed=cfg.seed).input_shape


def cmd_serve(args: argparse.Namespace) -> int:
    from coderay.cluster import connect

    cfg = load_config(args.config, **_workdir(args))
    if args.address:
        cfg = cfg.on_real_cluster()
    _check_port(cfg, args)
    _watch_stops()
    return serve_until_stopped(cfg, args, cluster=connect(cfg, args.address))


def cmd_up(args: argparse.Namespace) -> int:
    """The main job: each service trains (or loads) on its own node, the path search (cached), serving on the same
    cluster: a local multi-node one, or `--address` (then the search runs on Tune, each model on its node)."""
    import time

    from coderay.cluster import connect
    from coderay.provider import train_on_nodes

    start = time.perf_counter()
    cfg = load_config(args.config, **_workdir(args))
    if args.address:
        cfg = cfg.on_real_cluster()
    _check_port(cfg, args)
    _watch_stops()
    cluster = connect(cfg, args.address)
    front = _meanwhile(lambda: _start_front(cfg, args.port))  # started once Ray is imported: no module half-imported
    with _disconnected_on_error(cluster):
        print(
            f"[1/3] services of {cfg.name!r}: each trains (or loads its cached checkpoint) on its own node", flush=True
        )
        for name, m in train_on_nodes(cfg, on_epoch=_print_epoch).items():
            print(
                f"  {name}: {cfg.service(name).arch} on {m['task']} at {m['node']}, test acc {m['test_acc']:.4f}"
                f"{' (cached)' if m['from_cache'] else ''}"
            )
        engine = "in-process" if args.address is None else "Ray Tune"
        print(f"[2/3] path search (staged, {engine}){' ' * 4}[{time.perf_counter() - start:.0f}s]", flush=True)
        early = None
        if args.address is None:
            from coderay.search import search_to_serve, searched

            if not searched(cfg) and not args.no_block:  # the services answer while the search runs
                early = _meanwhile(lambda: _serve_local_only(cfg, args, cluster, front))
            table, finish = search_to_serve(cfg)  # explored candidates and baselines: while serving
        else:
            from tuning.search import run_tune_search

            table, finish = run_tune_search(cfg, address=args.address), None
        print_search(table)
        if finish is not None:
            pending = table.meta["pending"]
            print(
                f"  (to train while serving: {len(pending['explore'])} explored candidate(s)"
                f"{', and the baselines' if pending['baselines'] else ''}; the best path may change then)"
            )
        where = "the local Ray cluster" if args.address is None else args.address
        print(f"[3/3] serving on {where}{' ' * 4}[{time.perf_counter() - start:.0f}s]", flush=True)
        args.port = front.result()  # where Serve listens (a free port where 0 was asked); its failure raises here
        served = early.result() if early is not None else None
    return serve_until_stopped(cfg, args, cluster=cluster, table=table, finish=finish, served=served)


def _serve_local_only(cfg, args: argparse.Namespace, cluster, front):
    """Every service deployed with no table yet, each answering with its own model, while the search runs: the
    block groups are up when the search's table comes, which then only gives them their links and starts an
    ingress on its rows (`Served.redeploy`). The controller starts with the table."""
    from coderay.table import RewardTable
    from deployments.app import start_serving

    served = start_serving(
        cfg,
        config_path=Path(args.config).resolve(),
        port=front.result(),
        controller=False,
        cluster=cluster,
        table=RewardTable([], {}),
    )
    print(
        f"  serving at {served.url} meanwhile: each service local-only (its own model) until the search ends",
        flush=True,
    )
    return served


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove CPU-cap groups left by crashed runs (owner gone, no task inside) and stop the Ray HAProxies their
    clusters left (parent gone); live runs' groups and HAProxies stay."""
    from coderay import capacity
    from coderay.cluster import stop_orphaned_haproxies

    removed = capacity.sweep(unowned=args.all) + stop_orphaned_haproxies()
    print(json.dumps(removed) if args.json else "\n".join(removed) or "nothing stale")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The controller's live table: active paths, shares, queues, the last decisions with their reasons."""
    import ray

    from coderay.cluster import TOKEN_FILE, join, use_token
    from coderay.controller import NAMESPACE, get_controller
    from coderay.errors import ClusterAuthError

    token = load_config(args.config, **_workdir(args)).root / TOKEN_FILE
    if token.exists() and not (os.environ.get("RAY_AUTH_TOKEN_PATH") or os.environ.get("RAY_AUTH_TOKEN")):
        use_token(token)  # the token of `coderay up`'s local cluster
    try:
        join(args.address or "auto", namespace=NAMESPACE, logging_level=logging.WARNING)
    except ClusterAuthError:
        raise
    except (ConnectionError, RuntimeError) as e:
        print(f"error: no Ray cluster at {args.address or 'auto'} ({e}); start one with `coderay up`", file=sys.stderr)
        return 2
    try:
        try:
            actor = get_controller()
        except ValueError:
            print(
                "error: no controller runs on this cluster (`coderay up`/`serve` start it unless --no-controller)",
                file=sys.stderr,
            )
            return 2
        st = ray.get(actor.status.remote(decisions=args.decisions), timeout=30)
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    print_status(st)
    return 0


def print_status(st: dict) -> None:
    import time

    c = st["controller"]
    conf = c["config"]
    print(
        f"controller {c['name']} (pid {c['pid']}): {c['ticks']} intervals of {conf['interval_s']:g} s, "
        f"V={conf['V']:g}, hysteresis {conf['hysteresis']:g}, min dwell {conf['min_dwell_s']:g} s; "
        f"restarts {c['restarts']}; last interval {c['last_tick_age_s']} s ago"
    )
    print(f"state: {c['state_file']}")
    alive = st.get("nodes_alive") or {}
    print("nodes: " + ", ".join(f"{n} {'up' if a else 'DOWN'}" for n, a in alive.items()))
    print(f"\n{'service':<10} {'path':<28} {'share':>6} {'arrivals/s':>10} {'Q_l':>8}  reason of the last decision")
    for svc, s in st["services"].items():
        last = s.get("last_decision") or {}
        print(
            f"{svc:<10} {s['path']:<28} {s['coop_fraction']:>6.2f} {s['arrivals']:>10.1f} {s['Q_l']:>8.1f}  "
            f"{last.get('reason', '-')}"
        )
    if st["queues"]["host"]:
        print("host queues Q_h: " + ", ".join(f"{h} {q:.1f}" for h, q in st["queues"]["host"].items()))
    hosts = st.get("hosts") or {}
    if hosts:
        print(
            "host nodes (their own clients' share of the CPU, mean latency): "
            + ", ".join(
                f"{n} {h['own_util']:.2f}, {h['own_latency_ms']:.0f} ms{' WAITING: no guests' if h['waiting'] else ''}"
                for n, h in hosts.items()
            )
        )
    hops = {svc: q for svc, q in (st.get("hops") or {}).items() if q}
    if hops:
        print(
            "block groups (calls in flight; p50 / p99 ms of their last calls): "
            + ", ".join(
                f"{svc} {q.get('in_flight', 0)}; {_fmt(q.get('p50_ms'), 0, 1)} / {_fmt(q.get('p99_ms'), 0, 1)}"
                for svc, q in hops.items()
            )
        )
    print(f"\n{'path':<28} {'kind':<5} {'active':<6} {'reward':>7} {'profiled':>8} {'Th/s':>8} {'slowdown':>12}")
    for r in st["table"]:
        slow = "/".join(f"{v:.2f}" for v in (r.get("slowdown_local"), r.get("slowdown_host")) if v is not None)
        print(
            f"{r['path']:<28} {r['kind']:<5} {('yes ' + format(r['share'], '.2f')) if r['active'] else '':<6} "
            f"{_fmt(r['reward'], 7, 3)} {_fmt(r['reward_profiled'], 8, 3)} {_fmt(r['th_total'], 8, 0)} {slow:>12}"
        )
    print("\nlast switches:")
    for d in st["switches"][-8:] or []:
        when = time.strftime("%H:%M:%S", time.localtime(d["t"]))
        print(
            f"  {when} {d['service']}: {d['previous_path']} @{d['previous_share']:g} -> {d['path']} "
            f"@{d['share']:g}  {d['reason']}"
        )
    if not st["switches"]:
        print("  (none yet)")
    ingress = st.get("ingress_replicas") or {}
    print(
        f"ingress replicas syncing: {len([r for r in ingress.values() if r['age_s'] < 5])} "
        "(" + ", ".join(f"{k} {v['age_s']:.1f}s ago" for k, v in ingress.items()) + ")"
    )


def _fmt(v, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def _workdir(args: argparse.Namespace) -> dict:
    return {"workdir": str(args.workdir)} if getattr(args, "workdir", None) else {}


def _deploy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, type=Path, help="config YAML (default: the demo)")
    p.add_argument("--address", default=None, help="Ray cluster to deploy to, e.g. auto (default: a local one)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's serving.port)")
    p.add_argument("--no-block", action="store_true", help="return after deploying instead of serving until Ctrl-C")
    p.add_argument("--workdir", type=Path, help="override the config's workdir")
    p.add_argument(
        "--no-controller",
        action="store_true",
        help="serve without the controller (routes change only by PUT /route or a config deploy)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coderay", description="Coordinated DNN services at the edge, on Ray (CoDE).")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser(
        "blocks",
        help="split an architecture into frozen blocks and print each block's "
        "shapes, params, MACs and measured latency",
    )
    b.add_argument(
        "arch",
        nargs="?",
        help="a registered or torchvision architecture name (see --list), or "
        "package.module:function returning an nn.Module",
    )
    b.add_argument("--list", action="store_true", help="list the architecture names and exit")
    b.add_argument("--cuts", action="store_true", help="list the valid cut points (graph node names) and exit")
    b.add_argument("--blocks", type=int, default=None, metavar="N", help="number of blocks (default: one per stage)")
    b.add_argument("--input", type=_shape, default=(1, 28, 28), metavar="CxHxW", help="input shape (default 1x28x28)")
    b.add_argument("--classes", type=int, default=10, help="number of output classes (default 10)")
    b.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1, 8, 32],
        metavar="B",
        help="batch sizes to time (default 1 8 32)",
    )
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    b.set_defaults(func=cmd_blocks)

    t = sub.add_parser("train", help="train every service's model on its task (cached by config)")
    t.add_argument("config", nargs="?", default=DEFAULT_CONFIG, type=Path, help="config YAML (default: the demo)")
    t.add_argument("--workdir", type=Path, help="override the config's workdir")
    t.add_argument("--force", action="store_true", help="retrain even when a cached checkpoint matches")
    t.add_argument(
        "--address",
        default=None,
        help="Ray cluster whose nodes train their own services, e.g. auto (default: a local one)",
    )
    t.set_defaults(func=cmd_train)

    s = sub.add_parser(
        "search",
        help="find the best paths: predict every candidate, train the most promising (on Ray Tune, or --in-process)",
    )
    s.add_argument("config", nargs="?", default=DEFAULT_CONFIG, type=Path, help="config YAML (default: the demo)")
    s.add_argument("--in-process", action="store_true", help="run in this process instead of Ray Tune trials")
    s.add_argument("--exhaustive", action="store_true", help="train every candidate (for comparison)")
    s.add_argument("--address", default=None, help="Ray cluster to run trials on (default: start a local one)")
    s.add_argument("--json", action="store_true", help="print the reward table as JSON")
    s.add_argument("--force", action="store_true", help="ignore cached results (and Tune state) and search anew")
    s.add_argument("--workdir", type=Path, help="override the config's workdir")
    s.set_defaults(func=cmd_search)

    u = sub.add_parser(
        "up",
        help="the main job: train (cached), search (cached) and serve, on a local multi-node Ray cluster by default",
    )
    _deploy_args(u)
    u.set_defaults(func=cmd_up)

    v = sub.add_parser("serve", help="deploy every service's best path on Ray Serve and answer HTTP requests")
    _deploy_args(v)
    v.set_defaults(func=cmd_serve)

    c = sub.add_parser(
        "cleanup",
        help="remove CPU-cap cgroups of crashed runs (never one with live tasks) and stop the Ray HAProxies "
        "their clusters left",
    )
    c.add_argument("--all", action="store_true", help="also hand-named sessions, once they hold no task")
    c.add_argument("--json", action="store_true", help="print the removed paths (and stopped HAProxies) as JSON")
    c.set_defaults(func=cmd_cleanup)

    st = sub.add_parser(
        "status", help="the controller's live table: active paths, shares and its last decisions with reasons"
    )
    st.add_argument(
        "config",
        nargs="?",
        default=DEFAULT_CONFIG,
        type=Path,
        help="config YAML (default: the demo; accepted for symmetry, the cluster's controller answers)",
    )
    st.add_argument("--address", default=None, help="Ray cluster (default: auto, the one running here)")
    st.add_argument("--json", action="store_true", help="print the controller's status as JSON")
    st.add_argument("--decisions", type=int, default=12, help="how many recent decisions to show (default 12)")
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # logs and progress go to stderr, so stdout carries only results (pure JSON with --json)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("torch").setLevel(logging.WARNING)  # its INFO (e.g. cache stats at exit) is not ours
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, a service manager: shut down as on Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background, where SIGINT is ignored
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    try:
        return args.func(args)
    except (CoderayError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _cleaning.set()  # the clean-up is over: nothing left for the stop watcher
        print(f"coderay {args.command}: interrupted, stopped cleanly", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
