"""The reward table's rows: one typed row per candidate path (and per baseline), scored by one function.

A row keeps the inputs of the throughput model (`PathCosts`: per-sample seconds on each node, bytes each
way, B, s) beside the accuracies, so `score` re-derives every output (Th^l, Th^h, A^av, the reward) from
new measurements or a new reward shape without torch. Rows read like mappings (`row["reward"]`,
`row.get("error")`), which is how JSON, CSV and HTTP consumers see them; engine-specific facts (which node
ran a Tune trial, where ASHA stopped it) live in `extra` and read the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

from coderay.config import NetworkSpec, RewardSpec
from coderay.pathspec import PathSpec
from coderay.reward import average_accuracy, reward
from coderay.throughput import PathCosts, path_throughput

__all__ = ["PATH_KINDS", "Row", "BaselineRow", "score", "rescore", "row_from_dict", "csv_columns"]

PATH_KINDS = ("local", "skip", "coop")  # what a service may run; any other kind is a baseline


@dataclass(frozen=True)
class Row(Mapping):
    """One candidate path of one local service: identity, accuracies, the throughput model's inputs, and
    the outputs `score` derives from them."""

    path_id: str
    local: str
    kind: str  # 'local', 'skip', 'coop' (BaselineRow: 'edge-early')
    host: str | None = None
    lout: int | None = 0
    hin: int | None = None
    hout: int | None = None
    lin: int | None = None
    local_node: str = ""  # where the local part runs
    host_node: str = ""  # where the host part runs ('' for local and skip paths)
    link_out_on: str | None = None  # 'host' or 'local': which node runs a cooperative path's link_out
    encoding: str = "float32"  # how activations crossing nodes travel (coderay.paths.WIRE_DTYPES)
    link_variant: str | None = None  # the links' build and training (config LinkVariant.name)
    # accuracy (fractions in [0, 1])
    acc_local_val: float | None = None  # the local-only model's, for A^av and the reward's floor
    acc_local_test: float | None = None
    pred_acc: float | None = None  # stage 1: validation accuracy of the quickly fitted links
    val_acc: float | None = None  # stage 2: after training (ranks paths)
    test_acc: float | None = None  # stage 2: reported, never used to choose
    trained: bool = False
    # the throughput model's inputs
    costs: PathCosts | None = None
    # outputs of `score`
    th_local: float | None = None  # Th^l, samples/s answered on the local-only model
    th_host: float | None = None  # Th^h, samples/s answered through the path
    th_total: float | None = None
    th_ratio: float | None = None  # Th / Th of local-only
    host_own_before: float | None = None
    host_own_after: float | None = None
    latency_ms: float | None = None
    bottleneck: str | None = None
    acc_avg: float | None = None  # A^av on validation data (measured rows)
    acc_avg_test: float | None = None
    pred_reward: float | None = None  # the reward stage 1 predicts
    reward: float | None = None  # the reward measured in stage 2
    # the paper's parameter budget
    link_params: int = 0
    local_skipped_params: int = 0
    host_added_params: int = 0
    mirrored_params: int = 0  # local parameters copied to the host (baselines only)
    # bookkeeping
    train_seconds: float | None = None
    links_file: str | None = None
    error: str | None = None  # why this candidate has no result
    extra: dict = field(default_factory=dict, compare=False)

    _hidden: ClassVar[frozenset] = frozenset({"extra"})

    # ---- read access as a mapping
    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return _column_names(cls)

    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        names = self._names()
        return iter(names + tuple(k for k in self.extra if k not in names))

    def __len__(self) -> int:
        return len(list(iter(self)))

    @property
    def is_path(self) -> bool:
        return self.kind in PATH_KINDS

    @property
    def measured(self) -> bool:
        return self.reward is not None

    @classmethod
    def of(cls, spec: PathSpec, **fields: Any) -> Row:
        """The row of candidate `spec`: its identity from the spec, everything else from `fields`."""
        identity = {k: getattr(spec, k) for k in ("local", "kind", "host", "lout", "hin", "hout", "lin")}
        return cls(path_id=spec.id, **identity, **fields)

    @classmethod
    def failed(cls, spec: PathSpec, error: str) -> Row:
        """A candidate with no result: its identity and why."""
        return cls.of(spec, error=error)

    def with_extra(self, **extra: Any) -> Row:
        return replace(self, extra=self.extra | extra)

    def to_dict(self) -> dict:
        """JSON-ready: costs nested, `extra` merged at the top level."""
        out = {k: getattr(self, k) for k in self._names()}
        out["costs"] = dataclasses.asdict(self.costs) if self.costs is not None else None
        return out | self.extra

    def to_csv(self) -> dict:
        out = {k: v for k, v in self.to_dict().items() if k in csv_columns()}
        for f in fields(PathCosts):
            out[f"cost_{f.name}"] = getattr(self.costs, f.name) if self.costs is not None else None
        return out


@dataclass(frozen=True)
class BaselineRow(Row):
    """A comparison baseline (edge-early, Edgent-style): the local model cut after block `lout`, its blocks
    lout+1..`exit_after` mirrored on the host, answering from an exit head there. Never served."""

    exit_after: int | None = None


_R = TypeVar("_R", bound=Row)  # scoring keeps a row's class (a BaselineRow stays one)


@functools.cache
def _column_names(cls: type[Row]) -> tuple[str, ...]:
    """A row class's readable names (its fields but `extra`), computed once per class."""
    return tuple(f.name for f in fields(cls) if f.name not in cls._hidden)


def score(row: _R, reward_spec: RewardSpec, network: NetworkSpec) -> _R:
    """The row with every output re-derived from its inputs (costs, accuracies, nodes) for this reward and
    network: the one place a row is scored. A row without costs (a failed candidate) is returned as is."""
    if row.costs is None:
        return row
    th = path_throughput(
        row.costs,
        kind="coop" if row.host else row.kind,
        network=network,
        local_node=row.local_node,
        host_node=row.host_node,
    )

    def avg(acc_local: float | None, acc: float | None) -> float | None:
        if acc is None or acc_local is None:
            return None
        return average_accuracy(acc_local, acc, th.local, th.host)

    def rew(acc_avg: float | None) -> float | None:
        return None if acc_avg is None else reward(reward_spec, acc_avg, th.ratio, acc_local=row.acc_local_val)

    acc_avg = avg(row.acc_local_val, row.val_acc)
    return replace(
        row,
        th_local=th.local,
        th_host=th.host,
        th_total=th.total,
        th_ratio=th.ratio,
        host_own_before=th.host_own_before,
        host_own_after=th.host_own_after,
        latency_ms=th.latency_ms,
        bottleneck=th.bottleneck,
        acc_avg=acc_avg,
        acc_avg_test=avg(row.acc_local_test, row.test_acc),
        pred_reward=rew(avg(row.acc_local_val, row.pred_acc)),
        reward=rew(acc_avg),
    )


def rescore(row: _R, factors: Mapping[str, float], reward_spec: RewardSpec, network: NetworkSpec) -> _R:
    """The row scored with each node's profiled per-sample seconds times its factor (a node not in `factors`:
    1), e.g. the slowdown measured under load. A row without costs is returned as is."""
    c = row.costs
    if c is None:
        return row
    fl, fh = factors.get(row.local_node, 1.0), factors.get(row.host_node, 1.0)
    costs = replace(
        c,
        local_full=c.local_full * fl,
        local_part=c.local_part * fl,
        host_full=c.host_full * fh,
        host_part=c.host_part * fh,
    )
    return score(replace(row, costs=costs), reward_spec, network)


def row_from_dict(d: Mapping) -> Row:
    """Inverse of `Row.to_dict` (also after JSON): the kind picks the class, unknown keys go to `extra`."""
    cls = Row if d.get("kind") in PATH_KINDS else BaselineRow
    names = {f.name for f in fields(cls)} - {"extra"}
    kwargs = {k: v for k, v in d.items() if k in names}
    if kwargs.get("costs") is not None and not isinstance(kwargs["costs"], PathCosts):
        kwargs["costs"] = PathCosts(**kwargs["costs"])
    extra = {k: v for k, v in d.items() if k not in names and k != "extra"} | dict(d.get("extra") or {})
    return cls(**kwargs, extra=extra)


def csv_columns() -> list[str]:
    """The CSV's columns: every scalar field (baselines' too), then the throughput model's inputs."""
    names = [f.name for f in fields(BaselineRow) if f.name not in ("extra", "costs")]
    return names + [f"cost_{f.name}" for f in fields(PathCosts)]
