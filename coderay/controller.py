"""The controller: a named, detached Ray actor that keeps the live reward table and chooses every service's route.

Every `controller.interval_s` it measures serving — each block group's latest report (own and guest samples,
compute seconds, its queue; pushed by the group every `REPORT_S` through `report_blocks`, see below), what every
ingress replica reported (requests, samples, fallbacks, latency p50/p99, per-path counts, paths it skips after a
failure), which nodes Ray reports alive — turns the deltas into one `coderay.policy.Measurements`
(`coderay.measurements.aggregate`), runs the drift-plus-penalty policy, and keeps the outcome: each service's
route (path, cooperative share), the reward table re-scored from measured costs, and a decision log with
reasons. All of it is written to
`<workdir>/controller/state.json` after every interval (durably: a temp file fsynced, renamed over it, the
directory fsynced) and read back in `__init__`, so a restarted actor (`max_restarts=-1`) comes back with its
table, queues and log. The file is checked in one place (`parse_state`) before any of it is used: one that does
not fit this code and reward table is set aside as `state.json.bad-<time>` with a warning, and the controller
starts fresh rather than failing on every restart.

How routes reach every ingress replica: each replica *pulls*. Its background task calls `sync(replica_id,
stats)` every `POLL_S` seconds: one call hands the controller that replica's figures and returns the current
routes, which the replica applies with `Router.set_auto` (pins untouched). Pushing would need the controller to
reach each replica, but a Serve handle routes each call to *one* replica of its choosing, so a broadcast would
be repeated calls until every replica id had answered, never sure of new or restarted replicas; with polling a
replica that starts (or restarts) asks within a second, a replica that is gone simply stops asking, the
controller learns the set of replicas from who calls, and nothing on the request path ever waits on the
controller: if it is down, the poll times out in the background and the replica keeps its last routes (and its
per-request fallback).

Block groups push too, and for the same reason the controller never asks them through Serve: a call to a
replica takes one of its `max_ongoing_requests` slots and runs on its event loop, and a saturated group holds both
with queued batches, so its answer came late and a busy host was declared lost (its guests cut off). Each group
instead reports from a thread of its own (`deployments.blocks.HealthReporter`); a group not heard from for
`REPORT_STALE_S` is missed that interval, and a node all of whose groups were missed `UNREACHABLE_AFTER`
intervals in a row counts as gone (before Ray's own health checks say so). Busy is not missing: only a group
that stops reporting (its process died, its node is gone) is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
import threading
import time
import types
import typing
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coderay.cluster import HEAD_RESOURCE, alive_resources
from coderay.config import CoderayConfig
from coderay.measurements import Report, aggregate, heard_blocks
from coderay.policy import Decision, Measurements, NodeLoad, Policy, servable
from coderay.routing import initial_routes
from coderay.rows import PATH_KINDS, BaselineRow, Row, row_from_dict, score

__all__ = [
    "APP_NAME",
    "NAME",
    "NAMESPACE",
    "POLL_S",
    "REPLICA_GONE_S",
    "REPORT_S",
    "REPORT_STALE_S",
    "STATE_SCHEMA",
    "Controller",
    "SavedState",
    "StateMismatch",
    "actor_options",
    "get_controller",
    "parse_state",
    "read_state",
    "remove_stale_temps",
    "set_aside",
    "stale_replicas",
    "start_controller",
    "state_path",
    "stop_controller",
    "table_key",
    "write_state",
]

log = logging.getLogger(__name__)
NAME = "coderay-controller"
NAMESPACE = "coderay"
APP_NAME = "coderay"  # the Serve application (deployments.app.APP_NAME)
POLL_S = 1.0  # how often each ingress replica syncs with the controller
REPORT_S = 0.5  # how often each block group pushes its figures (deployments.blocks.HealthReporter)
REPORT_STALE_S = 1.5  # a block group not heard from for longer is missed this interval ...
UNREACHABLE_AFTER = 2  # ... and a node all of whose block groups missed this many intervals in a row is
# treated as gone before Ray's health checks declare it dead (~15-30 s)
KEEP_DECISIONS = 400  # decisions kept (and persisted); switches are kept apart, as many
REPLICA_FRESH_S = max(5.0, 3 * POLL_S)  # an ingress replica heard from this recently counts in an interval
REPLICA_GONE_S = max(15.0, 10 * POLL_S)  # ... one silent this long is gone (Serve replaced or lost it): forgotten
STATE_SCHEMA = 3  # the state file's layout; bump it on a change, and older files are set aside
POLICY_TABLES = (
    "q_local",
    "q_host",
    "slowdown",
    "own_rate",
    "own_busy",
    "own_latency",
    "arrivals",
    "since",
    "served",
    "settled",
    "split",
)
BY_SERVICE = ("q_local", "arrivals", "since", "served", "settled", "split")  # ... of those, the ones keyed by service


def state_path(cfg: CoderayConfig) -> Path:
    return cfg.root / "controller" / "state.json"


def table_key(cfg: CoderayConfig, rows: Sequence[Row]) -> str:
    """Identity of the reward table a state file belongs to (paths, links, profiled costs)."""
    return cfg.fingerprint(sorted((r.path_id, r.links_file, r.costs) for r in rows if r.is_path))


# ---------------------------------------------------------------------- the state file


class StateMismatch(ValueError):
    """A state file that parses but does not fit this code or this reward table; the message says where."""


@dataclass(frozen=True)
class SavedState:
    """What a restarted controller takes back from its state file, already checked against the running table."""

    version: int  # the routes' version when it was written
    ticks: int
    restarts: int
    policy: dict[str, dict]  # `Policy.state()`: safe to hand to `Policy.restore`
    rows: list[Row]  # the live (re-scored) rows, one per path of the table
    decisions: list[Decision]
    switches: list[Decision]


def write_state(path: Path, doc: Mapping[str, Any]) -> None:
    """Write `doc` as JSON so that `path` holds either the old or the new complete state, even across a crash
    or power loss: a temp file beside it, flushed and fsynced, renamed over it, then the directory fsynced."""
    data = json.dumps(doc, default=str).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable; best effort where the file system refuses to fsync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        log.debug("controller: fsync of %s: %s", directory, e)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files a killed writer left beside `path`; only the actor, the one writer, calls this."""
    stale = list(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def set_aside(path: Path, reason: str) -> Path | None:
    """Rename a state file that does not fit to `<name>.bad-<time>` (kept for a post-mortem, never read again)
    and say so; None where it cannot be moved."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.bad-{stamp}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.bad-{stamp}-{n}"), n + 1
    try:
        os.replace(path, target)
    except OSError as e:
        log.warning(
            "controller: state file %s does not fit (%s) and could not be set aside (%s); starting fresh",
            path,
            reason,
            e,
        )
        return None
    _fsync_dir(path.parent)
    log.warning(
        "controller: state file %s does not fit (%s); set aside as %s, starting fresh", path, reason, target.name
    )
    return target


def read_state(
    path: Path, *, key: str, services: Collection[str], path_ids: Collection[str], set_aside_bad: bool = True
) -> SavedState | None:
    """The state file's contents, checked; None (start fresh) when there is none or it does not fit. A file
    that does not fit is set aside (`set_aside_bad`; a reader that must not write only warns), so a restarted
    actor starts instead of failing on it again and again."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        saved, reason = None, f"unreadable: {e}"
    else:
        saved, reason = _decode(raw, key=key, services=services, path_ids=path_ids)
    if saved is not None:
        return saved
    if set_aside_bad:
        set_aside(path, reason)
    else:
        log.warning("controller: state file %s does not fit (%s); read as fresh, left in place", path, reason)
    return None


def _decode(raw: bytes, **table: Any) -> tuple[SavedState | None, str]:
    """The checked state in `raw`, or None and why not."""
    try:
        doc = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a truncated or garbled file
        return None, f"not valid JSON: {e}"
    try:
        return parse_state(doc, **table), ""
    except StateMismatch as e:
        return None, str(e)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a misfit the checks missed: no crash loop
        return None, f"does not fit this code: {e!r}"


def parse_state(doc: Any, *, key: str, services: Collection[str], path_ids: Collection[str]) -> SavedState:
    """The one check of a state file's contents (parsed JSON) against this code (`STATE_SCHEMA`, field names and
    types) and this reward table (`key`, its services and path ids): StateMismatch naming the first misfit, so
    that nothing later, inside a tick or a status call, meets a value it cannot use."""
    if not isinstance(doc, Mapping):
        raise StateMismatch(f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != STATE_SCHEMA:
        raise StateMismatch(f"schema {doc.get('schema')!r} (older or other code); this code reads {STATE_SCHEMA}")
    if _get(doc, "table_key", str) != key:
        raise StateMismatch(f"it belongs to another reward table ({doc['table_key']!r}, this one {key!r})")
    return SavedState(
        version=_count(doc, "version"),
        ticks=_count(doc, "ticks"),
        restarts=_count(doc, "restarts"),
        policy=_policy(_get(doc, "policy", Mapping), services, path_ids),
        rows=_rows(_get(doc, "rows", list), path_ids),
        decisions=_decisions(_get(doc, "decisions", list), "decisions"),
        switches=_decisions(_get(doc, "switches", list), "switches"),
    )


def _get(doc: Mapping, name: str, kind: type, where: str = "") -> Any:
    """doc[name], which must be there and be a `kind`."""
    if name not in doc:
        raise StateMismatch(f"{where}{name} missing")
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise StateMismatch(f"{where}{name} is {_show(value)}, not {kind.__name__}")
    return value


def _count(doc: Mapping, name: str) -> int:
    value = _get(doc, name, int)
    if value < 0:
        raise StateMismatch(f"{name} is {value}, below 0")
    return value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _policy(raw: Mapping, services: Collection[str], path_ids: Collection[str]) -> dict[str, dict]:
    """`Policy.state()` as written: finite numbers by name, each service's current (path, share) a path of
    this table (or its local-only path)."""
    out: dict[str, dict] = {}
    for table in POLICY_TABLES:
        values = _get(raw, table, Mapping, "policy.")
        for name, v in values.items():
            if not _finite(v):
                raise StateMismatch(f"policy.{table}[{name!r}] is {_show(v)}, not a finite number")
            if table in BY_SERVICE and name not in services:
                raise StateMismatch(f"policy.{table} names service {name!r}, which is not configured")
        out[table] = dict(values)
    current = _get(raw, "current", Mapping, "policy.")
    for svc, choice in current.items():
        if svc not in services:
            raise StateMismatch(f"policy.current names service {svc!r}, which is not configured")
        if not (
            isinstance(choice, list)
            and len(choice) == 2
            and isinstance(choice[0], str)
            and _finite(choice[1])
            and 0 <= choice[1] <= 1
        ):
            raise StateMismatch(f"policy.current[{svc!r}] is {_show(choice)}, not [path, share in 0..1]")
        if choice[0] not in path_ids and choice[0] != f"{svc}:local":
            raise StateMismatch(f"policy.current[{svc!r}] is path {choice[0]!r}, not in the reward table")
    out["current"] = {svc: list(choice) for svc, choice in current.items()}
    out["trial"] = _by_service(raw, "trial", services, _trial)
    out["measured"] = _by_service(raw, "measured", services, _measured)
    return out


def _by_service(raw: Mapping, table: str, services: Collection[str], fits) -> dict:
    values = _get(raw, table, Mapping, "policy.")
    for svc, v in values.items():
        if svc not in services:
            raise StateMismatch(f"policy.{table} names service {svc!r}, which is not configured")
        if not fits(v):
            raise StateMismatch(f"policy.{table}[{svc!r}] is {_show(v)}, not what Policy.state() writes")
    return dict(values)


def _trial(v: Any) -> bool:
    """{path, share, rate, expected}: a move under check (coderay.policy)."""
    return (
        isinstance(v, Mapping)
        and isinstance(v.get("path"), str)
        and all(_finite(v.get(k)) for k in ("share", "rate", "expected"))
    )


def _measured(v: Any) -> bool:
    """{rates: {"path@share": samples/s}, until}: an undone move's measured rates (coderay.policy)."""
    rates = v.get("rates") if isinstance(v, Mapping) else None
    return isinstance(rates, Mapping) and all(_finite(r) for r in rates.values()) and _finite(v.get("until"))


def _rows(raw: list, path_ids: Collection[str]) -> list[Row]:
    """The live rows, each typed as `Row` declares, together exactly the table's paths."""
    rows = []
    for i, r in enumerate(raw):
        if not isinstance(r, Mapping):
            raise StateMismatch(f"rows[{i}] is {_show(r)}, not an object")
        misfits = _misfits(Row if r.get("kind") in PATH_KINDS else BaselineRow, r)
        if misfits:
            raise StateMismatch(f"rows[{i}]: {'; '.join(misfits)}")
        rows.append(row_from_dict(r))
    if sorted(r.path_id for r in rows) != sorted(path_ids):
        raise StateMismatch(
            f"its rows {sorted(r.path_id for r in rows)} are not the reward table's paths {sorted(path_ids)}"
        )
    return rows


def _decisions(raw: list, name: str) -> list[Decision]:
    out = []
    for i, d in enumerate(raw):
        if not isinstance(d, Mapping):
            raise StateMismatch(f"{name}[{i}] is {_show(d)}, not an object")
        misfits = _misfits(Decision, d)
        if misfits:
            raise StateMismatch(f"{name}[{i}]: {'; '.join(misfits)}")
        out.append(Decision.from_dict(d))
    return out


def _misfits(cls: type, d: Mapping) -> list[str]:
    """What in `d` does not fit the dataclass `cls`: required fields missing, fields of another type."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                out.append(f"{f.name} missing")
        elif not _fits(d[f.name], hints[f.name]):
            out.append(f"{f.name} is {_show(d[f.name])}, not {_type_name(hints[f.name])}")
    return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for a field typed `hint` (the types rows and decisions use)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        names = {f.name for f in dataclasses.fields(hint)}
        return isinstance(value, Mapping) and set(value) <= names and not _misfits(hint, value)
    return isinstance(value, typing.get_origin(hint) or hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def stale_replicas(seen: Mapping[str, float], now: float, after_s: float = REPLICA_GONE_S) -> list[str]:
    """Ingress replicas (id -> when last heard from) silent for longer than `after_s`: gone, since a live one
    syncs every POLL_S."""
    return sorted(rid for rid, t in seen.items() if now - t > after_s)


class Controller:
    """The actor's class (`start_controller` wraps it with `ray.remote`); usable in-process for tests."""

    def __init__(self, cfg: CoderayConfig, rows: Sequence[Row], *, run: bool = True):
        self.cfg = cfg
        self.base_rows = [r for r in rows if r.is_path]
        self.services = {s.name: s.node for s in cfg.services}
        self.lock = threading.RLock()
        self.policy = Policy(
            cfg.controller,
            cfg.reward,
            cfg.network,
            self.base_rows,
            self.services,
            initial_routes(cfg, self.base_rows),
            now=time.time(),
        )
        self.key = table_key(cfg, self.base_rows)
        self.path = state_path(cfg)
        self.decisions: deque[Decision] = deque(maxlen=KEEP_DECISIONS)
        self.switches: deque[Decision] = deque(maxlen=KEEP_DECISIONS)
        self.live_rows: list[Row] = self.policy.live_rows()
        self.version, self.ticks, self.restarts = 1, 0, 0
        self.started_at = time.time()
        self.last_tick: float | None = None
        self.last_measurements: dict = {}
        self.nodes_alive: dict[str, bool] = {}
        self.ingress: dict[str, dict] = {}  # replica id -> {"seen": t, "stats": cumulative figures}
        self._prev_ingress: dict[str, Mapping] = {}  # replica id -> the cumulative figures at the last tick
        self._prev_blocks: dict[str, Report] = {}  # service -> (when, its group's report) last used
        self.hops: dict[str, dict] = {}  # service -> its block group's queue: in flight, p50/p99 ms
        self._reports: dict[str, tuple[float, dict]] = {}  # service -> (time.monotonic() received, its last report)
        self._heard_since = time.monotonic()  # a group not heard from at all is missed from then on
        self._misses: dict[str, int] = {}  # service -> intervals missed in a row
        if run:
            remove_stale_temps(self.path)
        self.reloaded = self._load(set_aside_bad=run)
        if _reconstructed():
            self.restarts += 1
        self._stop = threading.Event()
        if run:  # the actor (run=False: an in-process reader, which must not write the state file)
            self._save()
            threading.Thread(target=self._loop, name="coderay-controller", daemon=True).start()
        log.info(
            "controller: %d services, %d rows, interval %.1f s, state %s (%s)",
            len(self.services),
            len(self.base_rows),
            cfg.controller.interval_s,
            self.path,
            "reloaded" if self.reloaded else "fresh",
        )

    # ------------------------------------------------------------------ persistence

    def _load(self, *, set_aside_bad: bool) -> bool:
        """Take back the state file's table, queues and log if it fits (checked whole by `read_state` before any
        of it is used); False: starting fresh."""
        saved = read_state(
            self.path,
            key=self.key,
            services=self.services,
            path_ids=[r.path_id for r in self.base_rows],
            set_aside_bad=set_aside_bad,
        )
        if saved is None:
            return False
        self.policy.restore(saved.policy)
        self.live_rows = saved.rows
        self.decisions.extend(saved.decisions)
        self.switches.extend(saved.switches)
        self.version = saved.version + 1
        self.restarts = saved.restarts
        self.ticks = saved.ticks
        return True

    def state_doc(self) -> dict:
        """The state file's contents (what `parse_state` reads back)."""
        with self.lock:
            return {
                "schema": STATE_SCHEMA,
                "table_key": self.key,
                "saved_at": time.time(),
                "version": self.version,
                "ticks": self.ticks,
                "restarts": self.restarts,
                "routes": self.policy.routes,
                "policy": self.policy.state(),
                "rows": [r.to_dict() for r in self.live_rows],
                "decisions": [d.to_dict() for d in self.decisions],
                "switches": [d.to_dict() for d in self.switches],
                "measurements": self.last_measurements,
            }

    def _save(self) -> None:
        write_state(self.path, self.state_doc())

    # ------------------------------------------------------------------ what ingress replicas call

    def sync(self, replica_id: str, stats: dict | None = None) -> dict:
        """An ingress replica's poll: its cumulative figures in, the current routes out."""
        with self.lock:
            self.ingress[replica_id] = {"seen": time.time(), "stats": stats or {}}
            return {
                "routes": self.policy.routes,
                "version": self.version,
                "gone": sorted(n for n, alive in self.nodes_alive.items() if not alive),
            }

    def report_blocks(self, service: str, health: dict) -> None:
        """A block group's push (`deployments.blocks.HealthReporter`): its figures as `BlockGroup.health` gives
        them. Kept until the next interval reads it; a service this controller does not serve is ignored."""
        if service in self.services:
            with self.lock:
                self._reports[service] = (time.monotonic(), health)

    def routes(self) -> dict:
        with self.lock:
            return {"routes": self.policy.routes, "version": self.version}

    def ping(self) -> dict:
        return {"pid": os.getpid(), "restarts": self.restarts, "ticks": self.ticks}

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        interval = self.cfg.controller.interval_s
        next_at = time.monotonic() + interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at = time.monotonic() + interval
            try:
                self.tick()
            except Exception:  # noqa: BLE001 — one bad interval must not end the loop
                log.exception("controller: interval failed")

    def stop(self) -> None:
        self._stop.set()

    def prune_replicas(self, now: float) -> list[str]:
        """Forget ingress replicas silent for REPLICA_GONE_S (replaced or lost): the per-replica tables stay
        bounded and status lists live replicas only. Returns the ids forgotten."""
        with self.lock:
            gone = stale_replicas({rid: v["seen"] for rid, v in self.ingress.items()}, now)
            for rid in gone:
                del self.ingress[rid]
            for rid in set(self._prev_ingress) - set(self.ingress):
                del self._prev_ingress[rid]
        if gone:
            log.info("controller: ingress replicas %s silent for over %.0f s: forgotten", gone, REPLICA_GONE_S)
        return gone

    def _alive(self) -> dict[str, bool]:
        offered = {r for resources in alive_resources().values() for r in resources}
        return {n.name: n.name in offered for n in self.cfg.nodes}

    def _block_stats(self, alive: dict[str, bool]) -> dict[str, Report]:
        """The block groups heard from (`coderay.measurements.heard_blocks`); the others count a miss. Reads what
        the groups pushed: it never waits on a group."""
        with self.lock:
            reports = dict(self._reports)
        heard, missed = heard_blocks(
            reports, self.services, alive, now=time.monotonic(), since=self._heard_since, stale_s=REPORT_STALE_S
        )
        for svc in missed:
            self._misses[svc] = self._misses.get(svc, 0) + 1
        for svc in heard:
            self.hops[svc] = reports[svc][1].get("queue") or {}  # calls in flight, recent p50/p99 (for status)
            self._misses[svc] = 0
        return heard

    def tick(self) -> list[Decision]:
        """One interval: measure, decide, persist. Returns the decisions."""
        now = time.time()
        dt = max(1e-3, now - self.last_tick) if self.last_tick is not None else self.cfg.controller.interval_s
        alive = self._alive()
        blocks = self._block_stats(alive)
        for node in alive:  # alive for Ray, but none of its block groups has answered for a while
            mine = [svc for svc, n in self.services.items() if n == node]
            if alive[node] and mine and all(self._misses.get(svc, 0) >= UNREACHABLE_AFTER for svc in mine):
                alive[node] = False
        self.prune_replicas(now)
        with self.lock:
            ingress = {rid: dict(v) for rid, v in self.ingress.items()}
        got = aggregate(
            services=self.services,
            nodes=alive,
            dt=dt,
            now=now,
            blocks=blocks,
            prev_blocks=self._prev_blocks,
            ingress=ingress,
            prev_ingress=self._prev_ingress,
            fresh_s=REPLICA_FRESH_S,
        )
        self._prev_blocks.update(got.block_baselines)
        self._prev_ingress.update(got.ingress_baselines)
        m = Measurements(
            t=now,
            dt=dt,
            arrivals=got.arrivals,
            failing=got.failing,
            paths={svc: dict(v["by_path"]) for svc, v in got.served.items()},
            nodes={n: NodeLoad(alive=alive[n], **got.nodes[n]) for n in alive},
        )
        with self.lock:
            decisions = self.policy.step(m)
            self.decisions.extend(decisions)
            changed = [d for d in decisions if d.switched]
            self.switches.extend(changed)
            if changed:
                self.version += 1
                for d in changed:
                    log.info("controller: %s -> %s at %.2f (%s)", d.service, d.path, d.share, d.reason)
            self.live_rows = self.policy.live_rows()
            self._record_metrics(decisions)
            self.nodes_alive = alive
            self.ticks += 1
            self.last_tick = now
            self.last_measurements = {
                "t": now,
                "dt": round(dt, 3),
                "arrivals": got.arrivals,
                "failing": sorted(got.failing),
                "nodes": {n: {"alive": alive[n], **got.nodes[n]} for n in alive},
                "served": got.served,
                "ingress_replicas": got.replicas,
                "latency_ms": {
                    rid: {
                        svc: {k: s.get(k) for k in ("p50_ms", "p99_ms")}
                        for svc, s in (ingress[rid]["stats"].get("services") or {}).items()
                    }
                    for rid in got.replicas
                },
            }
            self._save()
        return decisions

    def _record_metrics(self, decisions: Sequence[Decision]) -> None:
        """Prometheus gauges through `ray.util.metrics` (exported by the node's metrics agent): per service its
        share, reward, arrivals and backlog; per path its live reward; per host its guest queue."""
        try:
            if not hasattr(self, "_gauges"):
                from ray.util.metrics import Counter, Gauge

                gauges: dict[str, Gauge] = {
                    "share": Gauge(
                        "coderay_controller_coop_share", "cooperative share chosen", tag_keys=("service", "path")
                    ),
                    "reward": Gauge(
                        "coderay_controller_reward",
                        "live reward of a path (re-scored from measured costs)",
                        tag_keys=("service", "path"),
                    ),
                    "arrivals": Gauge(
                        "coderay_controller_arrivals", "samples/s a service's clients sent", tag_keys=("service",)
                    ),
                    "queue": Gauge(
                        "coderay_controller_queue",
                        "virtual queue (samples): Q_l of a service, Q_h of a host",
                        tag_keys=("kind", "name"),
                    ),
                }
                switches = Counter("coderay_controller_switches", "route switches", tag_keys=("service",))
                self._gauges, self._switches = gauges, switches  # all made, or none kept
            m = self._gauges
            for d in decisions:
                m["share"].set(d.share, tags={"service": d.service, "path": d.path})
                m["arrivals"].set(self.policy.arrivals.get(d.service, 0.0), tags={"service": d.service})
                if d.switched:
                    self._switches.inc(1, tags={"service": d.service})
            for r in self.live_rows:
                if servable(r) and r.reward is not None:
                    m["reward"].set(r.reward, tags={"service": r.local, "path": r.path_id})
            for name, q in self.policy.q_local.items():
                m["queue"].set(q, tags={"kind": "local", "name": name})
            for name, q in self.policy.q_host.items():
                m["queue"].set(q, tags={"kind": "host", "name": name})
        except Exception as e:  # noqa: BLE001 — no metrics (outside Ray, exporter down): decisions go on
            log.debug("controller metrics: %s", e)

    # ------------------------------------------------------------------ what `coderay status` shows

    def status(self, *, decisions: int = 12) -> dict:
        with self.lock:
            routes = self.policy.routes
            now = time.time()
            table = []
            for r in sorted(self.live_rows, key=lambda r: (r.local, -(r.reward or 0.0))):
                if not servable(r):
                    continue
                base = next((b for b in self.base_rows if b.path_id == r.path_id), None)
                if base is not None:  # the profiles alone, under the same reward shape
                    base = score(base, self.cfg.reward, self.cfg.network)
                table.append(
                    {
                        "service": r.local,
                        "path": r.path_id,
                        "kind": r.kind,
                        "active": routes.get(r.local, {}).get("path") == r.path_id,
                        "share": routes.get(r.local, {}).get("coop_fraction")
                        if routes.get(r.local, {}).get("path") == r.path_id
                        else None,
                        "reward": _num(r.reward),
                        "reward_profiled": _num(base.reward if base else None),
                        "th_total": _num(r.th_total),
                        "th_host": _num(r.th_host),
                        "acc_val": _num(r.val_acc),
                        "slowdown_local": r.get("slowdown_local"),
                        "slowdown_host": r.get("slowdown_host"),
                    }
                )
            services = {}
            for svc in self.services:
                last = self.policy.last.get(svc) or next(
                    (d for d in reversed(self.decisions) if d.service == svc), None
                )
                services[svc] = routes[svc] | {
                    "arrivals": round(self.policy.arrivals.get(svc, 0.0), 3),
                    "Q_l": round(self.policy.q_local.get(svc, 0.0), 3),
                    "since": self.policy.since.get(svc),
                    "last_decision": last.to_dict() if last else None,
                }
            return {
                "controller": {
                    "name": NAME,
                    "namespace": NAMESPACE,
                    "pid": os.getpid(),
                    "restarts": self.restarts,
                    "reloaded": self.reloaded,
                    "ticks": self.ticks,
                    "version": self.version,
                    "started_at": self.started_at,
                    "last_tick_age_s": None if self.last_tick is None else round(now - self.last_tick, 2),
                    "state_file": str(self.path),
                    "config": self.cfg.controller.model_dump(),
                },
                "routes": routes,
                "services": services,
                "queues": {"local": dict(self.policy.q_local), "host": dict(self.policy.q_host)},
                "slowdown": dict(self.policy.slowdown),
                "nodes_alive": dict(self.nodes_alive),
                "hosts": {
                    n: {
                        "own_util": round(self.policy.own_busy.get(n, 0.0), 4),
                        "own_latency_ms": round(self.policy.own_latency.get(n, 0.0), 1),
                        "waiting": self.policy.waiting(n),
                    }
                    for n in sorted({r.host_node for r in self.base_rows if r.host_node})
                },
                "hops": {svc: dict(q) for svc, q in self.hops.items()},
                "ingress_replicas": {
                    rid: {
                        "age_s": round(now - v["seen"], 2),
                        "pinned": v["stats"].get("pinned"),
                        "routes": v["stats"].get("routes"),
                    }
                    for rid, v in self.ingress.items()
                },
                "table": table,
                "switches": [d.to_dict() for d in list(self.switches)[-decisions:]],
                "decisions": [d.to_dict() for d in list(self.decisions)[-decisions:]],
                "measurements": self.last_measurements,
            }


def _num(v):
    import math

    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _reconstructed() -> bool:
    try:
        import ray

        return bool(ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 — not in an actor
        return False


# ---------------------------------------------------------------------- the actor


def actor_options() -> dict:
    """Named and detached (it outlives the driver that started it), restarted forever (max_restarts=-1; tasks
    retried across restarts), no CPU reserved, on the head node where there is one (not on an edge node that
    may be lost). Threaded: the loop, ingress polls and status calls run concurrently."""

    opts = {
        "name": NAME,
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_task_retries": -1,
        "max_concurrency": 16,
        "num_cpus": 0,
        # its Serve handles are awaited from plain threads: their router needs a loop of its own, which
        # Serve's throughput-optimized mode (serving.throughput_optimized) otherwise leaves to the caller
        "runtime_env": {"env_vars": {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}},
    }
    if any(HEAD_RESOURCE in resources for resources in alive_resources().values()):
        opts["resources"] = {HEAD_RESOURCE: 0.01}
    return opts


def get_controller():
    """The running controller's actor handle; ValueError when there is none."""
    import ray

    return ray.get_actor(NAME, namespace=NAMESPACE)


def stop_controller() -> bool:
    """Kill the controller for good (no restart); False when none ran."""
    import ray

    try:
        actor = get_controller()
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the name is freed asynchronously
        try:
            get_controller()
        except ValueError:
            return True
        time.sleep(0.1)
    return True


def start_controller(cfg: CoderayConfig, rows: Sequence[Row], *, resume: bool = False, timeout_s: float = 60.0):
    """(Re)start the controller for `cfg` and `rows` on the connected cluster; returns its actor handle once it
    answers. A controller already running (an earlier deploy) is replaced. A new deployment starts from the
    table, its queues empty and its log new (the earlier state is kept as state.prev.json) unless `resume`;
    Ray's own restarts of this actor always resume from the state file."""
    import ray

    stop_controller()
    path = state_path(cfg)
    if not resume and path.exists():
        os.replace(path, path.with_name("state.prev.json"))
    actor = ray.remote(Controller).options(**actor_options()).remote(cfg.portable(), list(rows))
    # ray types the handle as `ActorHandle | type[Controller]`, where a method has no `.remote`
    ray.get(actor.ping.remote(), timeout=timeout_s)  # type: ignore[attr-defined]
    log.info("controller %s started (namespace %s)", NAME, NAMESPACE)
    return actor
