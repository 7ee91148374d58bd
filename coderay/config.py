"""One YAML file drives every workflow: nodes, services, search, reward, serving.

Validated at the edge by pydantic; a bad file fails with a `ConfigError` naming the file, the field and
what was expected, never with a traceback from deep inside training or Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import to_jsonable_python

from coderay.errors import ConfigError, UnknownServiceError

__all__ = [
    "ConfigError",
    "NodeSpec",
    "NetworkSpec",
    "TrainSpec",
    "ServiceSpec",
    "SearchSpec",
    "RewardSpec",
    "ServingSpec",
    "EmulationSpec",
    "ControllerSpec",
    "LinkVariant",
    "ExploreSpec",
    "CoderayConfig",
    "load_config",
    "DEFAULT_CONFIG",
]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
_NAME = r"^[a-z][a-z0-9_-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSpec(_Strict):
    name: str = Field(pattern=_NAME)  # also the node's Ray custom resource
    cpus: float = Field(1.0, gt=0)  # CPUs this node offers to Ray
    speed: float = Field(1.0, gt=0)  # relative compute speed (emulated: see EmulationSpec)
    object_store_mb: int = Field(128, ge=64)  # per-node object store when coderay starts a local cluster


class NetworkLink(_Strict):
    between: tuple[str, str]  # two node names
    bandwidth_mbps: float = Field(gt=0)
    rtt_ms: float = Field(ge=0)


WireEncoding = Literal["float32", "float16", "bfloat16"]


class NetworkSpec(_Strict):
    bandwidth_mbps: float = Field(100.0, gt=0)  # default for node pairs not listed in `links`
    rtt_ms: float = Field(2.0, ge=0)
    links: list[NetworkLink] = []
    encoding: WireEncoding = "float32"  # activations crossing nodes travel as this (the search measures
    # every path's accuracy with it, the model counts its bytes)

    def between(self, a: str, b: str) -> tuple[float, float]:
        """(bandwidth in Mbit/s, RTT in ms) between two nodes; a node talks to itself for free."""
        if a == b:
            return float("inf"), 0.0
        for link in self.links:
            if set(link.between) == {a, b}:
                return link.bandwidth_mbps, link.rtt_ms
        return self.bandwidth_mbps, self.rtt_ms


class TrainSpec(_Strict):
    epochs: int = Field(8, ge=0)  # 0: the provider brings its trained `weights` (read on its node)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0)


class ServiceSpec(_Strict):
    name: str = Field(pattern=_NAME)
    arch: str  # a name from coderay.models.list_models()
    arch_kwargs: dict[str, Any] = {}  # extra builder arguments, e.g. {"widths": [16, 32, 64, 64]}
    task: str  # a name from coderay.data.list_tasks()
    node: str  # the node (SP server) this service runs on
    blocks: int | None = Field(None, ge=1)  # split into N blocks (default cuts) ...
    cuts: list[str] | None = None  # ... or at these named stages
    weights: str | None = None  # torchvision/coderay state_dict on disk to start from
    guest_quota: int = Field(0, ge=0)  # s: samples of each host batch reserved for guests
    guests: dict[str, int] | None = None  # the guests this host admits, each with the slots of a batch it
    # may take (≤ guest_quota); None: every guest, sharing guest_quota
    batch_size: int = Field(32, ge=1)  # B: the batch this service's blocks run at
    train: TrainSpec = TrainSpec()

    @model_validator(mode="after")
    def _check(self) -> ServiceSpec:
        if self.blocks is not None and self.cuts is not None:
            raise ValueError("give either 'blocks' or 'cuts', not both")
        if self.guest_quota > self.batch_size:
            raise ValueError(f"guest_quota ({self.guest_quota}) must not exceed batch_size ({self.batch_size})")
        if self.train.epochs == 0 and self.weights is None:
            raise ValueError("train.epochs: 0 trains nothing, so the service needs its trained `weights`")
        for guest, slots in (self.guests or {}).items():
            if not 0 <= slots <= self.guest_quota:
                raise ValueError(f"guests.{guest}: {slots} slots; expected 0..guest_quota ({self.guest_quota})")
        return self

    def grant(self, guest: str) -> int:
        """The slots s of each of this host's batches that `guest`'s samples may take (0: not admitted)."""
        if guest == self.name:
            return 0
        return self.guest_quota if self.guests is None else self.guests.get(guest, 0)


class LinkVariant(_Strict):
    """How the links that bring a sample back (link_out, skip) are built and trained; stage 2 trains every
    variant of `search.link_variants` and keeps the one of best validation accuracy (its cost is timed)."""

    capacity: Literal["1x1", "3x3", "bottleneck"] = "1x1"  # 1x1: norm + 1×1 conv; 3x3: + a depthwise 3×3 and 1×1
    # residual; bottleneck: + a 1×1 → 3×3 → 1×1 residual (C/4 wide)
    distill: float = Field(0.0, ge=0)  # weight of a feature-matching loss toward the local model's own
    # activation where the sample re-enters it

    @property
    def name(self) -> str:
        return self.capacity + (f"+distill{self.distill:g}" if self.distill else "")


class ExploreSpec(_Strict):
    """Stage 2 beyond the top-k: candidates whose least-squares prediction undersells what a trained link reaches
    (bench/results/depth.md: `digits:mnist:0:1:3:4` predicted 0.915, trained 0.985). Per local service, the `count`
    candidates outside the top-k of highest modelled throughput whose prediction is within `reach` of
    local-only's validation accuracy are trained as well, with their own variants and epochs."""

    count: int = Field(0, ge=0)
    reach: float = Field(0.10, ge=0, le=1)
    epochs: int | None = Field(None, ge=1)  # default: search.link_epochs
    variants: list[LinkVariant] | None = Field(None, min_length=1)  # default: search.link_variants


class SearchSpec(_Strict):
    locals: list[str] | None = None  # services to find paths for; default: every service
    lout: list[int] | None = [0]  # allowed local exit blocks (0 = raw input); null = all
    hin: list[int] | None = [1]  # allowed host entry blocks; null = all
    include_skip: bool = True  # also consider skip paths inside the local model
    top_k: int = Field(3, ge=1)  # stage 2 trains this many candidates per local service
    predict_samples: int = Field(512, ge=64)  # samples the stage-1 predictor fits links on (least squares)
    predict_steps: int = Field(15, ge=0)  # ... then this many gradient steps on the links
    link_epochs: int = Field(4, ge=1)
    link_lr: float = Field(2e-3, gt=0)
    link_batch_size: int = Field(64, ge=1)
    link_variants: list[LinkVariant] = Field(default_factory=lambda: [LinkVariant()], min_length=1)
    explore: ExploreSpec = Field(default_factory=ExploreSpec)
    link_out: Literal["auto", "host", "local"] = "auto"  # where a cooperative path's link_out runs; auto: on the
    # node that makes fewer bytes cross (the host block's output
    # or the link's)
    exhaustive: bool = False  # train every candidate (for comparison)
    prune: bool = True  # stage 1 skips a candidate whose reward bound (free links, perfect accuracy) cannot
    # beat local-only's nor the top_k-th prediction so far: it could never be trained, let alone win
    baselines: bool = True  # also score the edge-early baseline (Edgent-style)


AccuracyFunction = Literal["power", "exp", "linear"]  # ξ, implemented in coderay.reward
ThroughputFunction = Literal["power", "log", "linear"]  # ζ, implemented in coderay.reward


class RewardSpec(_Strict):
    accuracy: AccuracyFunction = "power"  # ξ(A^av; α)
    alpha: float = Field(8.0, ge=0)
    throughput: ThroughputFunction = "power"  # ζ(Th / Th_local-only; β)
    beta: float = Field(1.0, ge=0)
    accuracy_floor: float | None = Field(None, ge=0, le=1)  # δ: A^av below A_local − δ earns 0


class AuthSpec(_Strict):
    """API keys for the HTTP API (coderay.auth): off by default (the demo on this machine)."""

    enabled: bool = False
    keys_file: str | None = None  # YAML of operator/provider/client keys (or CODERAY_KEYS_FILE)


class ServingSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0 picks a free port
    max_batch_size: int = Field(32, ge=1)  # most samples one block-group batch runs (caps each service's B)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_request_samples: int = Field(256, ge=1)
    max_body_bytes: int = Field(8 * 2**20, ge=1024)
    max_inflight_bytes: int = Field(64 * 2**20, ge=1024)  # request bodies one ingress replica holds at once (from
    # Content-Length, until answered); one more: 503 + Retry-After
    request_timeout_s: float = Field(30.0, gt=0)  # each request's one deadline, arrival to answer: above the time
    # Serve takes to replace a crashed replica (8-16 s on this 2-core machine), so a request caught by a crash is
    # retried and answered, not lost
    max_ongoing_requests: int = Field(1024, ge=1)  # requests the ingress holds at once; more wait in Serve's proxy
    fallback_cooldown_s: float | None = Field(None, ge=0)  # a failed path is skipped this long; None: max(10, timeout)
    emulate_network: bool = True  # add RTT + bytes/bandwidth per cross-node hop
    ingress_replicas: int = Field(1, ge=1)  # HTTP ingress replicas (each polls the controller for routes)
    merge_requests: bool = True  # concurrent requests on one path share one chain of replica calls
    # (up to the local service's B samples): one call's cost, many answers
    call_overhead_ms: float = Field(12.0, ge=0)  # CPU ms a replica call costs beyond its model (Serve's request
    # handling, (de)serialisation); the throughput model charges it per
    # stage of a chain of B samples. bench/serving_bench.py measures it
    throughput_optimized: bool = True  # Ray Serve's throughput-optimized mode on the local cluster: gRPC
    # between proxy and replicas, user code on the replica's own event
    # loop, a direct HTTP port on each ingress replica (GET /healthz)
    haproxy: bool = True  # with throughput_optimized: Ray's HAProxy ingress answers on `port`
    # (a C proxy forwarding to the ingress replicas' own HTTP ports)
    # instead of Serve's Python proxy, whose hop cost more CPU per
    # request than the ingress itself
    auth: AuthSpec = AuthSpec()  # who may infer, change routes, read the debug and controller views
    access_log: bool = False  # Serve's per-request log lines in the proxy and every replica (each
    # a formatted, flushed line per request and per replica call)


class EmulationSpec(_Strict):
    """Heterogeneous edge servers on one machine. With `cpu_caps`, every process working for a node (its
    replicas, its Tune trials, the profiling behind the throughput model) runs under one real CPU quota of
    cpus × speed × scale CPUs (coderay.capacity.plan_shares); without it (or where the OS refuses, or on a
    real cluster) a node's speed only divides its profiled times in the model."""

    cpu_caps: bool = True  # real CPU quotas per node on a local cluster; off with --address
    reserve_cpus: float = Field(0.5, ge=0)  # this machine's CPUs left to Serve's proxy, the ingress, the driver
    # and a load generator, so that the emulated nodes are the bottleneck
    local: bool = True  # the nodes are emulated on this machine (a real cluster: False, set
    # by --address): node speeds divide nothing, stores are the nodes'
    pin_cores: bool = False  # without CPU caps: Ray's own processes (proxy, ingress, controller,
    # raylets) on the first ceil(reserve_cpus) cores, every node's work
    # on the rest, so that neither preempts the other (local cluster)

    @model_validator(mode="after")
    def _check(self) -> EmulationSpec:
        if self.pin_cores and self.cpu_caps:
            raise ValueError(
                "emulation.pin_cores needs emulation.cpu_caps: false (CPU quotas already divide the "
                "cores between the nodes)"
            )
        return self


class ControllerSpec(_Strict):
    """The controller (coderay.controller, policy in coderay.policy): every `interval_s` it measures serving,
    re-scores the reward table and chooses each service's path and cooperative share by drift-plus-penalty."""

    enabled: bool = True  # `coderay up` / `serve` start it (`--no-controller` overrides)
    interval_s: float = Field(2.0, gt=0)  # seconds between two measurements and decisions
    V: float = Field(50.0, ge=0)  # weight of the reward against the virtual queues' drift: larger
    # favours reward, smaller favours draining backlogs
    hysteresis: float = Field(0.1, ge=0)  # a new (path, share) must improve the objective by this fraction
    # of its magnitude to replace the current one
    min_dwell_s: float = Field(6.0, ge=0)  # ... and the current one must have held this long (a lost host
    # or a failing path switches at once)
    share_step: float = Field(0.1, gt=0, le=1)  # cooperative shares tried: 0, step, 2·step, ..., 1
    smoothing: float = Field(0.3, gt=0, le=1)  # weight of the newest measurement in the moving averages
    host_latency_ms: float = Field(500.0, gt=0)  # a host whose own clients' requests take longer than this on
    # average admits no guests until they no longer do
    verify_tolerance: float | None = Field(0.05, ge=0, lt=1)  # a move under which, once settled, the service is
    # answered this fraction fewer samples/s than under the choice it left is undone (None: no move is checked)
    verify_memory_s: float = Field(120.0, gt=0)  # how long an undone move's measured rates stand in the model


class CoderayConfig(_Strict):
    name: str = "coderay"
    seed: int = 0
    workdir: str = ".coderay"  # checkpoints, reward tables, links (relative to the CWD)
    data_root: str | None = None  # where torchvision datasets live, if any
    nodes: list[NodeSpec] = Field(min_length=1)
    network: NetworkSpec = NetworkSpec()
    services: list[ServiceSpec] = Field(min_length=1)
    search: SearchSpec = SearchSpec()
    reward: RewardSpec = RewardSpec()
    serving: ServingSpec = ServingSpec()
    emulation: EmulationSpec = EmulationSpec()
    controller: ControllerSpec = ControllerSpec()

    @model_validator(mode="after")
    def _cross_check(self) -> CoderayConfig:
        nodes = [n.name for n in self.nodes]
        _unique(nodes, "nodes", "name")
        _unique([s.name for s in self.services], "services", "name")
        for i, link in enumerate(self.network.links):
            for end in link.between:
                if end not in nodes:
                    raise ValueError(f"network.links[{i}].between: unknown node {end!r}; expected one of {nodes}")
        names = [s.name for s in self.services]
        for name in self.search.locals or []:
            if name not in names:
                raise ValueError(f"search.locals: unknown service {name!r}; expected one of {names}")
        for i, svc in enumerate(self.services):
            if svc.node not in nodes:
                raise ValueError(f"services[{i}].node: unknown node {svc.node!r}; expected one of {nodes}")
            for guest in svc.guests or {}:
                if guest not in names or guest == svc.name:
                    raise ValueError(
                        f"services[{i}].guests: unknown guest {guest!r}; expected one of "
                        f"{[n for n in names if n != svc.name]}"
                    )
        return self

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)

    def service(self, name: str) -> ServiceSpec:
        for s in self.services:
            if s.name == name:
                return s
        raise UnknownServiceError(f"unknown service {name!r}; expected one of {[s.name for s in self.services]}")

    @property
    def root(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    def portable(self) -> CoderayConfig:
        """This config with its paths absolute: Ray workers resolve them elsewhere (other directories, nodes)."""
        update = {"workdir": str(self.root)}
        if self.data_root:
            update["data_root"] = str(Path(self.data_root).expanduser().resolve())
        return self.model_copy(update=update)

    def on_real_cluster(self) -> CoderayConfig:
        """This config for a real cluster: nothing emulated (no CPU caps, no pinned cores, no network delays)."""
        return self.model_copy(
            update={
                "emulation": self.emulation.model_copy(update={"cpu_caps": False, "pin_cores": False, "local": False}),
                "serving": self.serving.model_copy(update={"emulate_network": False}),
            }
        )

    def fingerprint(self, *parts: Any) -> str:
        """A short stable hash of config parts, the key of every on-disk cache."""
        blob = json.dumps(to_jsonable_python(parts), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _unique(values: list[str], where: str, field: str) -> None:
    seen = set()
    for i, v in enumerate(values):
        if v in seen:
            raise ValueError(f"{where}[{i}].{field}: duplicate {v!r}; names must be unique")
        seen.add(v)


def _check_registries(cfg: CoderayConfig) -> None:
    """Names that only the registries know: checked here so the error still names the field."""
    from coderay.data import list_tasks
    from coderay.models import is_known_model, list_models

    tasks = list_tasks()
    for i, svc in enumerate(cfg.services):
        if not is_known_model(svc.arch):
            raise ConfigError(
                f"services[{i}].arch: unknown architecture {svc.arch!r}; expected one of "
                f"{list_models()}, a torchvision classification model name, or "
                "'package.module:function' (see `coderay blocks --list`)"
            )
        if svc.task not in tasks:
            raise ConfigError(f"services[{i}].task: unknown task {svc.task!r}; expected one of {tasks}")


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = f" (got {got!r})" if e["type"] not in ("missing", "value_error") and not isinstance(got, dict) else ""
        lines.append(f"  {loc or '<top level>'}: {msg}{shown}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> CoderayConfig:
    """Read, validate and return a config; `overrides` replace top-level fields (tests, CLI flags)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.update(overrides)
    try:
        cfg = CoderayConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid config\n{_format(e)}") from None
    try:
        _check_registries(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: invalid config\n  {e}") from None
    return cfg
