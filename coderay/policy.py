"""The controller's policy: each service's path and cooperative share, by Lyapunov drift-plus-penalty.

Pure (no Ray, no torch): `Policy.step(measurements)` takes one interval's figures and returns one `Decision` per
service; the controller actor (coderay.controller) measures, persists and pushes. In the spirit of CutEdge:

Virtual queues (samples), updated every interval of `dt` seconds with the choice in force during it:
- Q_l per local service l, its own backlog: Q_l ← max(0, Q_l + (a_l − μ_l)·dt), a_l its clients' samples/s,
  μ_l the samples/s its current (path, share) can answer;
- Q_H per host service H, guest work beyond what its grant and its own load allow:
  Q_H ← max(0, Q_H + (Σ_l φ_l·a_l − g_H)·dt), summed over the services l whose path runs through H at share φ_l,
  g_H = min(Th^h of the re-scored row (the grant: s slots of each batch of B, the network),
            (1 − headroom − u_H) / c_guest),            headroom 0.1: a host never runs flat out for guests
  where u_H is the fraction of the host node's time its own clients take (its CPU quota used — the cgroup's CPU
  seconds per second over its share on capped nodes, its block groups' compute seconds per second elsewhere —
  in proportion of own samples; EWMA), and c_guest the path's per-sample seconds on the host. A host whose own
  clients wait — the mean latency of its own services' requests over an interval (EWMA) above
  `host_latency_ms` — counts as fully taken by them (u_H = 1, so g_H = 0) until they no longer wait: CPU alone
  misses this, as guests holding their s slots of every batch keep the host's own share below its demand.

Each interval, for each service l, every candidate k = (row, φ) — local-only (φ = 0); every servable skip or
cooperative row at φ ∈ {step, 2·step, ..., 1} (a fixed grid: the model share Th^h/Th moves with every
measurement, a candidate that moves would defeat the hysteresis) — gets
    J_k = V·(−F_k) + Q_l·(a_l − μ_k) + Q_H·(φ·a_l)        (Q_H only for a cooperative row through H)
(the terms of Σ Q·(arrivals − service) that do not depend on l's choice, like −Q_H·g_H, are the same for every
candidate and left out). The reward F_k = ξ(A^av)·ζ(Th/Th_local-only) at share φ, on the row re-scored
(`coderay.rows.score`) with measured costs: each node's profiled per-sample seconds times a slowdown
(EWMA of compute seconds ÷ what the profiles predict for the samples it ran, learnt only while the node is
busy, so that small batches at light load do not pass for a slow node; an idle node's slowdown decays back to
1, the profile). At share φ:
    μ_k = Th(φ) = min(1 / ((1−φ)·c_local + φ·c_ht), g_H / φ),  A^av = (1−φ)·A_local + φ·A_path
which at φ = Th^h/Th is exactly the row's Th (coderay.throughput). The smallest J wins, with hysteresis: the
current choice stays unless the best improves J by at least `hysteresis`·|J_current| and the current one has
held `min_dwell_s`; a path whose host node is gone (or that the ingress reports failing) is left at once.

A move the objective makes is checked against what serving measures: once the new choice has settled
(`VERIFY_INTERVALS` intervals after the one the move happened in, and `min_dwell_s`), a move under which the
service is answered `verify_tolerance` fewer samples/s than under the choice it left is undone, and for
`verify_memory_s` both choices' μ is their measured rate (so is a kept move's, when it serves `verify_tolerance`
more: the clients then ask more than either serves; each new pair joins those still remembered). A move that
served more is followed by a probe one `share_step` further the same way along the path (from local-only: up),
checked the same way: the model's μ is a capacity and may rank shares otherwise than serving does (its g_H is
the host's grant, while an idle host's batches take more guests), so the controller climbs on what it measures
until a step serves less (and the host's g_H at least what it was measured to
admit, unless its own clients wait). A move away from a host measured to need its time back (its own clients wait
or take all it admits) or a host gone is not checked: serving less is what it is for. The model's μ is a capacity;
what a chain of merged requests really costs (its batch shrinks when a service's requests are split over two paths,
and each call costs the same) only serving shows. So a checked move to a split share (0 < φ < 1) whose rate tells
(it served `verify_tolerance` more or less than the choice it left: the clients asked more than it served) also
teaches the service's split factor, measured ÷ modelled μ (EWMA), by which every split share's μ is scaled from
then on. On the demo the model gave digits' shares 0.7–0.9 25–35% more than they served, so the controller went
from one unmeasured split share to the next while share 1.0 served the most (bench/results/shares.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from coderay.config import ControllerSpec, NetworkSpec, RewardSpec
from coderay.reward import reward as reward_of
from coderay.rows import Row, rescore

__all__ = ["NodeLoad", "Measurements", "Candidate", "Decision", "Policy", "servable"]

BUSY = 0.3  # a node learns its slowdown only in intervals where it computed at least this fraction
MIN_SAMPLES = 16  # ... and ran at least this many samples
SLOWDOWN_RANGE = (0.2, 50.0)
HEADROOM = 0.1  # a host admits guests only up to (1 − HEADROOM) of its time, its own load first
SPLIT_RANGE = (0.3, 1.5)  # what a split share's measured rate over its modelled μ may teach
VERIFY_INTERVALS = 2  # intervals a choice must be measured under (after the one it began in) before its rate counts


@dataclass(frozen=True)
class NodeLoad:
    """What one node's block groups did during the interval (deltas)."""

    alive: bool = True
    own_samples: float = 0.0  # samples of the node's own services
    guest_samples: float = 0.0  # samples of other services' paths through it
    compute_s: float = 0.0  # seconds spent computing them
    cpu_busy: float | None = None  # fraction of the node's CPU quota used (capped nodes: its cgroup's CPU seconds)
    own_latency_ms: float | None = None  # mean latency of its own services' requests answered (None: none)


@dataclass(frozen=True)
class Measurements:
    t: float  # when (seconds, any monotonic-enough clock)
    dt: float  # the interval's length
    arrivals: Mapping[str, float]  # service -> samples/s its clients sent (answered)
    nodes: Mapping[str, NodeLoad] = field(default_factory=dict)  # missing node: alive, no figures
    failing: frozenset[str] = frozenset()  # path ids the ingress skips after a failure
    paths: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # service -> {path id: requests
    # answered on it}; a service missing: not known


@dataclass(frozen=True)
class Candidate:
    path: str
    share: float
    reward: float
    service_rate: float  # μ: samples/s this choice answers
    guest_rate: float  # g_H of its host (0 without a host)
    objective: float
    host: str | None = None

    def to_dict(self) -> dict:
        return {
            k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
            for k, v in dataclasses.asdict(self).items()
        }


@dataclass(frozen=True)
class Decision:
    """One service's choice for the next interval, why, and the figures behind it."""

    t: float
    service: str
    path: str
    share: float
    previous_path: str
    previous_share: float
    switched: bool
    reason: str
    objective: float
    reward: float
    figures: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> Decision:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def servable(row: Row) -> bool:
    """A row a service may run: local-only, or a trained skip/cooperative path with its costs."""
    if not row.is_path:
        return False
    if row.kind == "local":
        return row.costs is not None
    return (
        bool(row.links_file)
        and row.costs is not None
        and row.val_acc is not None
        and (row.kind != "coop" or row.costs.guest_quota > 0)
    )


def _ewma(old: float | None, new: float, w: float) -> float:
    return new if old is None else (1 - w) * old + w * new


class Policy:
    """Drift-plus-penalty over the servable rows of each service; state that survives a restart in `to_dict`."""

    def __init__(
        self,
        spec: ControllerSpec,
        reward_spec: RewardSpec,
        network: NetworkSpec,
        rows: Sequence[Row],
        services: Mapping[str, str],
        initial: Mapping[str, Mapping] | None = None,
        now: float | None = None,
    ):
        """services: {service: its node}; initial: {service: {"path", "coop_fraction"}} in force since `now`
        (None: since ever, so the first decision may switch at once)."""
        self.spec, self.reward_spec, self.network = spec, reward_spec, network
        self.services = dict(services)
        self.rows = {r.path_id: r for r in rows if r.is_path}
        self.q_local: dict[str, float] = dict.fromkeys(self.services, 0.0)
        self.q_host: dict[str, float] = {}
        self.slowdown: dict[str, float] = {}  # node -> measured / profiled per-sample seconds
        self.own_rate: dict[str, float] = {}  # node -> its own services' samples/s (EWMA)
        self.own_busy: dict[str, float] = {}  # node -> fraction of its time its own services take (EWMA)
        self.own_latency: dict[str, float] = {}  # node -> mean latency (ms) of its own clients' requests (EWMA)
        self.arrivals: dict[str, float] = {}  # service -> samples/s (EWMA)
        self.current: dict[str, tuple[str, float]] = {}
        self.since: dict[str, float] = {} if now is None else dict.fromkeys(self.services, now)
        for svc in self.services:
            r = (initial or {}).get(svc) or {"path": f"{svc}:local", "coop_fraction": 0.0}
            self.current[svc] = (r["path"], float(r.get("coop_fraction") or 0.0))
        self.last: dict[str, Decision] = {}
        self.served: dict[str, float] = {}  # service -> samples/s answered under its current choice, settled (EWMA)
        self.settled: dict[str, int] = {}  # service -> intervals measured under its current choice
        self.trial: dict[str, dict] = {}  # service -> the choice its last move left and what it served: {path, share,
        # rate}, until the move is checked
        self.measured: dict[str, dict] = {}  # service -> {"rates": {"path@share": samples/s}, "until": t} after an
        # undone move
        self.split: dict[str, float] = {}  # service -> served / modelled μ of its split shares (0 < φ < 1), EWMA
        self._now = -math.inf

    # ------------------------------------------------------------------ persistence

    def state(self) -> dict:
        return {
            "q_local": self.q_local,
            "q_host": self.q_host,
            "slowdown": self.slowdown,
            "own_rate": self.own_rate,
            "own_busy": self.own_busy,
            "own_latency": self.own_latency,
            "arrivals": self.arrivals,
            "current": {s: list(c) for s, c in self.current.items()},
            "since": self.since,
            "served": self.served,
            "settled": self.settled,
            "trial": self.trial,
            "measured": self.measured,
            "split": self.split,
        }

    def restore(self, state: Mapping) -> None:
        keys = ("q_local", "q_host", "slowdown", "own_rate", "own_busy", "own_latency", "arrivals", "since", "split")
        for key in (*keys, "served", "settled", "trial", "measured"):
            getattr(self, key).update(state.get(key) or {})
        for svc, (path, share) in (state.get("current") or {}).items():
            if svc in self.services and (path in self.rows or path == f"{svc}:local"):
                self.current[svc] = (path, float(share))

    @property
    def routes(self) -> dict[str, dict]:
        return {svc: {"path": p, "coop_fraction": s} for svc, (p, s) in self.current.items()}

    # ------------------------------------------------------------------ measured costs

    def _profile_cost(self, node: str, *, guest: bool) -> float | None:
        """Profiled per-sample seconds on `node`: its own service's full model, or a guest's host part (the
        path in force through it, else the mean over paths through it)."""
        if guest:
            using = [
                self.rows[p]
                for p, _ in self.current.values()
                if p in self.rows and self.rows[p].kind == "coop" and self.rows[p].host_node == node
            ]
            rows = using or [
                r for r in self.rows.values() if r.kind == "coop" and r.host_node == node and r.costs is not None
            ]
            vals = [r.costs.host_part for r in rows if r.costs is not None]
        else:
            vals = [r.costs.local_full for r in self.rows.values() if r.local_node == node and r.costs is not None]
            vals = vals or [
                r.costs.host_full for r in self.rows.values() if r.host_node == node and r.costs is not None
            ]
        return sum(vals) / len(vals) if vals else None

    def _own_cost(self, node: str, m: Measurements) -> float | None:
        """Profiled seconds per own sample on `node` as its services' requests went this interval (else as their
        choices send them): the full model for a request on the local path, only the local part (head, tail, skip
        link) for one on a cooperative or skip path. Charging the full model for all of them made a cooperating
        node look faster than its profile, and every lower share look better than it serves."""
        vals = []
        for svc, n in self.services.items():
            full = next((r.costs.local_full for r in self.rows.values() if r.local == svc and r.costs), None)
            if n != node or full is None:
                continue
            counts: Mapping[str, float] = m.paths.get(svc) or {}
            if not sum(counts.values()):
                path, share = self.current[svc]
                counts = {path: share, f"{svc}:local": 1.0 - share}
            cost = 0.0
            for path, k in counts.items():
                row = self.rows.get(path)
                part = row.costs.local_part if row is not None and row.kind != "local" and row.costs else full
                cost += k * part
            vals.append(cost / sum(counts.values()))
        return sum(vals) / len(vals) if vals else self._profile_cost(node, guest=False)

    def _learn(self, m: Measurements) -> None:
        w = self.spec.smoothing
        self._now = m.t
        for svc, a in m.arrivals.items():
            self.arrivals[svc] = _ewma(self.arrivals.get(svc), max(0.0, float(a)), w)
        for svc in self.services:
            if not self._in_force(svc, m):  # pinned elsewhere: what it served says nothing of this choice
                self.settled[svc] = 0
                self.served.pop(svc, None)
                self.trial.pop(svc, None)
                continue
            n = self.settled.get(svc, 0)
            self.settled[svc] = n + 1
            if n >= 1:  # the interval a choice began in is a transition: requests of the last one still drain
                self.served[svc] = _ewma(self.served.get(svc), max(0.0, float(m.arrivals.get(svc, 0.0))), w)

        for node, load in m.nodes.items():
            if not load.alive:
                continue
            self.own_rate[node] = _ewma(self.own_rate.get(node), load.own_samples / max(m.dt, 1e-9), w)
            ran = load.own_samples + load.guest_samples
            busy = load.cpu_busy if load.cpu_busy is not None else load.compute_s / max(m.dt, 1e-9)
            own_busy = busy * load.own_samples / ran if ran > 0 else 0.0
            self.own_busy[node] = _ewma(self.own_busy.get(node), own_busy, w)
            self.own_latency[node] = _ewma(self.own_latency.get(node), load.own_latency_ms or 0.0, w)
            own_c, guest_c = self._own_cost(node, m), self._profile_cost(node, guest=True)
            expected = load.own_samples * (own_c or 0.0) + load.guest_samples * (guest_c or own_c or 0.0)
            busy = load.compute_s / max(m.dt, 1e-9)
            if expected > 0 and load.own_samples + load.guest_samples >= MIN_SAMPLES and busy >= BUSY:
                lo, hi = SLOWDOWN_RANGE
                self.slowdown[node] = _ewma(self.slowdown.get(node), min(hi, max(lo, load.compute_s / expected)), w)
            elif node in self.slowdown:  # idle: back toward the profile, which stands at light load
                self.slowdown[node] = _ewma(self.slowdown[node], 1.0, w)

    def _in_force(self, svc: str, m: Measurements) -> bool:
        """Whether `svc`'s requests this interval went the way its current choice sends them: the share of them
        on its cooperative or skip path within 0.2 of the choice's (a route pinned by hand overrides the choice)."""
        counts = m.paths.get(svc) or {}
        total = sum(counts.values())
        if not total:
            return True  # nothing known, or nothing answered
        path, share = self.current[svc]
        on_path = 0.0 if path == f"{svc}:local" else counts.get(path, 0) / total
        return abs(on_path - (share if path != f"{svc}:local" else 0.0)) <= 0.2

    def measured_row(self, row: Row) -> Row:
        """The row with each node's measured slowdown applied to its profiled costs, re-scored."""
        if row.costs is None:
            return row
        sl, sh = self.slowdown.get(row.local_node, 1.0), self.slowdown.get(row.host_node, 1.0)
        live = row.with_extra(slowdown_local=round(sl, 4), slowdown_host=round(sh, 4) if row.host_node else None)
        return rescore(live, self.slowdown, self.reward_spec, self.network)

    def live_rows(self) -> list[Row]:
        return [self.measured_row(r) for r in self.rows.values()]

    # ------------------------------------------------------------------ candidates

    def waiting(self, node: str) -> bool:
        """Whether the node's own clients wait longer than `host_latency_ms` (mean over recent intervals)."""
        return self.own_latency.get(node, 0.0) > self.spec.host_latency_ms

    def distressed(self, node: str) -> bool:
        """Whether a host is measured to need its time back: its own clients wait, or they take all it admits."""
        return self.waiting(node) or self.own_busy.get(node, 0.0) >= 1.0 - HEADROOM

    def _own_util(self, node: str) -> float:
        """u_H: the fraction of the node's time its own services took (measured: compute seconds of its block
        groups per second, in proportion of own samples); all of it while its own clients wait."""
        return 1.0 if self.waiting(node) else self.own_busy.get(node, 0.0)

    def guest_rate(self, live: Row) -> float:
        """g_H: guest samples/s the host admits on this (re-scored) path: its grant, less its own load."""
        if live.kind != "coop" or live.costs is None:
            return 0.0
        left = max(0.0, 1.0 - HEADROOM - self._own_util(live.host_node))
        by_load = left / live.costs.host_part if live.costs.host_part > 0 else math.inf
        return max(0.0, min(live.th_host or 0.0, by_load))

    def _evaluate(self, svc: str, live: Row | None, share: float) -> Candidate:
        a = self.arrivals.get(svc, 0.0)
        if live is None or live.kind == "local" or share <= 0:
            base = live if live is not None and live.costs is not None else self._local_row(svc)
            c_local = base.costs.local_full if base is not None and base.costs is not None else None
            mu = self._measured_rate(svc, f"{svc}:local", 0.0) or (1.0 / c_local if c_local else 0.0)
            acc = base.acc_local_val if base is not None else None
            f = reward_of(self.reward_spec, acc, 1.0, acc_local=acc) if acc is not None else 0.0
            j = -self.spec.V * f + self.q_local.get(svc, 0.0) * (a - mu)
            return Candidate(f"{svc}:local", 0.0, f, mu, 0.0, j)
        c = live.costs
        assert c is not None, f"{live.path_id}: a servable path has costs"
        host = live.host if live.kind == "coop" else None  # a cooperative row always names its host
        mu = 1.0 / ((1 - share) * c.local_full + share * c.local_part)
        g = 0.0
        if host is not None:
            g = self.guest_rate(live)
            mu = min(mu, g / share)
            if share < 1:  # two streams, each in smaller merged chains: what serving measured of split shares
                mu *= self.split.get(svc, 1.0)
        measured = self._measured_rate(svc, live.path_id, share)
        if measured is not None:  # served at that rate, so its host admitted share × rate guest samples/s
            mu = measured
            g = max(g, share * measured) if host is not None and not self.waiting(live.host_node) else g
        acc = (1 - share) * (live.acc_local_val or 0.0) + share * (live.val_acc or 0.0)
        f = reward_of(self.reward_spec, acc, mu * c.local_full, acc_local=live.acc_local_val)
        j = -self.spec.V * f + self.q_local.get(svc, 0.0) * (a - mu)
        if host is not None:
            j += self.q_host.get(host, 0.0) * share * a
        return Candidate(live.path_id, round(share, 4), f, mu, g, j, host)

    def _measured_rate(self, svc: str, path: str, share: float) -> float | None:
        """The samples/s `svc` was answered at under (path, share), while remembered (`_remember`)."""
        mem = self.measured.get(svc)
        if mem is None or self._now >= mem["until"]:
            return None
        return mem["rates"].get(_key(path, share))

    def _local_row(self, svc: str) -> Row | None:
        local = self.rows.get(f"{svc}:local")
        if local is not None:
            return self.measured_row(local)
        for r in self.rows.values():  # no local row: a path's local-only figures
            if r.local == svc and r.costs is not None:
                return self.measured_row(r)
        return None

    def _shares(self, live: Row) -> list[float]:
        n = max(1, round(1 / self.spec.share_step))
        grid = {round(min(1.0, i * self.spec.share_step), 4) for i in range(1, n + 1)}
        return sorted(s for s in grid if 0 < s <= 1)

    def candidates(self, svc: str, m: Measurements, live: Mapping[str, Row]) -> tuple[list[Candidate], dict]:
        """Every feasible (path, share) of `svc` and, per excluded path, why."""
        out = [self._evaluate(svc, self._local_row(svc), 0.0)]
        excluded = {}
        for r in self.rows.values():
            if r.local != svc or r.kind == "local" or not servable(r):
                continue
            if r.kind == "coop" and not m.nodes.get(r.host_node, NodeLoad()).alive:
                excluded[r.path_id] = f"host node {r.host_node} gone or unreachable"
                continue
            if r.path_id in m.failing:
                excluded[r.path_id] = "failing at the ingress"
                continue
            out += [self._evaluate(svc, live[r.path_id], s) for s in self._shares(live[r.path_id])]
        return out, excluded

    # ------------------------------------------------------------------ one interval

    def _update_queues(self, m: Measurements, live: Mapping[str, Row]) -> None:
        dt = m.dt
        offered: dict[str, float] = {}
        for svc, (path, share) in self.current.items():
            row = live.get(path)
            cur = self._evaluate(svc, row, share if row is not None else 0.0)
            a = self.arrivals.get(svc, 0.0)
            if cur.service_rate <= 0:  # no row gives this service a rate (not searched): no backlog to track
                self.q_local[svc] = 0.0
                continue
            self.q_local[svc] = max(0.0, self.q_local.get(svc, 0.0) + (a - cur.service_rate) * dt)
            if row is not None and row.kind == "coop" and row.host:
                offered[row.host] = offered.get(row.host, 0.0) + share * a
        for host in {r.host for r in self.rows.values() if r.kind == "coop" and r.host}:
            rows = [live[r.path_id] for r in self.rows.values() if r.kind == "coop" and r.host == host]
            if any(not m.nodes.get(r.host_node, NodeLoad()).alive for r in rows):
                self.q_host[host] = 0.0  # nothing waits at a host that is gone
                continue
            in_use = [live[p] for p, _ in self.current.values() if p in live and live[p].host == host]
            g = max((self.guest_rate(r) for r in (in_use or rows)), default=0.0)
            for svc, (path, share) in self.current.items():  # what the host was measured to admit
                if path in live and live[path].host == host and not self.waiting(live[path].host_node):
                    g = max(g, share * (self._measured_rate(svc, path, share) or 0.0))
            self.q_host[host] = max(0.0, self.q_host.get(host, 0.0) + (offered.get(host, 0.0) - g) * dt)

    def step(self, m: Measurements) -> list[Decision]:
        self._learn(m)
        live = {r.path_id: r for r in self.live_rows()}
        self._update_queues(m, live)
        decisions = []
        for svc in self.services:
            decisions.append(self._decide(svc, m, live))
        return decisions

    def _verify(self, svc: str, m: Measurements, cands: list[Candidate]) -> tuple[str, str, float] | None:
        """Check `svc`'s last move once it has settled: None to keep it; else (why, path, share) of the choice to go
        to: back to the one it left (`revert`), or, when it served more, one share step further the same way along
        the path (`probe`; the model's rate of a share is a capacity, and serving may rank shares otherwise).
        Measured rates of both choices then stand in the model, so the objective ranks them as serving did."""
        trial, tol = self.trial.get(svc), self.spec.verify_tolerance
        held = m.t - self.since.get(svc, -math.inf)
        if trial is None or tol is None or self.settled.get(svc, 0) <= VERIFY_INTERVALS or held < self.spec.min_dwell_s:
            return None
        del self.trial[svc]
        path, share = self.current[svc]
        rate = self.served[svc]
        if abs(rate - trial["rate"]) <= tol * trial["rate"]:
            return None  # it serves what it was expected to, or the clients ask no more than it serves
        self._calibrate(svc, share, rate, trial)  # its rate tells: the clients ask more than one choice serves
        rates = {_key(path, share): rate, _key(trial["path"], trial["share"]): trial["rate"]}
        if rate > trial["rate"]:
            self._remember(svc, rates, m.t)
            further = self._further(svc, trial, cands)
            if further is None:
                return None
            why = (
                f"probe: {path} at {share:g} served {rate:.1f} samples/s, more than {trial['path']} at "
                f"{trial['share']:g} before it ({trial['rate']:.1f}); trying share {further:g}"
            )
            return why, path, further
        if not any(c.path == trial["path"] and abs(c.share - trial["share"]) < 1e-9 for c in cands):
            return None  # what it left is no longer feasible
        self._remember(svc, rates, m.t)
        why = (
            f"revert: {path} at {share:g} served {rate:.1f} samples/s (the model: {trial['expected']:.1f}), less "
            f"than {trial['path']} at {trial['share']:g} before it ({trial['rate']:.1f})"
        )
        return why, trial["path"], trial["share"]

    def _further(self, svc: str, trial: Mapping, cands: Sequence[Candidate]) -> float | None:
        """One share step on from the current choice, away from the one it left (local-only counts as share 0 of
        the path), where that share is feasible and not already measured; None otherwise."""
        path, share = self.current[svc]
        if path == f"{svc}:local" or trial["path"] not in (path, f"{svc}:local"):
            return None
        left = trial["share"] if trial["path"] == path else 0.0
        step = self.spec.share_step if share > left else -self.spec.share_step
        nxt = round(share + step, 4)
        if not 0 < nxt <= 1 or self._measured_rate(svc, path, nxt) is not None:
            return None
        return nxt if any(c.path == path and abs(c.share - nxt) < 1e-9 for c in cands) else None

    def _remember(self, svc: str, rates: Mapping[str, float], t: float) -> None:
        """Add measured rates to what stands in the model for `verify_memory_s` from `t`, with those still
        remembered: a choice measured to serve less is not tried again while any of them stands."""
        mem = self.measured.get(svc)
        kept = mem["rates"] if mem is not None and t < mem["until"] else {}
        self.measured[svc] = {"rates": kept | dict(rates), "until": t + self.spec.verify_memory_s}

    def _calibrate(self, svc: str, share: float, rate: float, trial: Mapping) -> None:
        """Learn how a split share serves against its modelled μ, from a checked move to one whose rate tells
        (`_verify`: it served `verify_tolerance` more or less than the choice it left). The move's μ was scaled
        by the factor in force, which nothing changes until its check."""
        if not 0 < share < 1:  # local-only is share 0
            return
        modelled = trial["expected"] / self.split.get(svc, 1.0)
        if modelled > 0:
            seen = min(SPLIT_RANGE[1], max(SPLIT_RANGE[0], rate / modelled))
            self.split[svc] = _ewma(self.split.get(svc), seen, self.spec.smoothing)

    def _decide(self, svc: str, m: Measurements, live: Mapping[str, Row]) -> Decision:
        cands, excluded = self.candidates(svc, m, live)
        undone = self._verify(svc, m, cands)
        if undone is not None:  # re-ranked with the measured rates
            cands, excluded = self.candidates(svc, m, live)
        best = min(cands, key=lambda c: (c.objective, c.path != f"{svc}:local", -c.share))
        prev_path, prev_share = self.current[svc]
        cur = next((c for c in cands if c.path == prev_path and abs(c.share - prev_share) < 1e-9), None)
        if cur is None and prev_path in live and prev_path not in excluded:  # a share off the grid (initial)
            cur = self._evaluate(svc, live[prev_path], prev_share)
        held = m.t - self.since.get(svc, -math.inf)
        gain = (cur.objective - best.objective) if cur is not None else math.inf
        need = self.spec.hysteresis * max(abs(cur.objective), 1e-9) if cur is not None else 0.0
        if undone is not None:
            reason, path, share = undone
            choice = next(c for c in cands if c.path == path and abs(c.share - share) < 1e-9)
        elif cur is None:
            why = excluded.get(prev_path, "no longer servable")
            choice, reason = best, f"forced: {prev_path} {why}; best feasible {best.path} at {best.share:g}"
        elif best is cur or (best.path, best.share) == (cur.path, cur.share) or gain <= 0:
            choice, reason = cur, "hold: the current choice has the lowest objective"
        elif gain < need:
            choice, reason = (
                cur,
                (
                    f"hold: {best.path} at {best.share:g} improves the objective by {gain:.4g}, under "
                    f"the hysteresis {need:.4g}"
                ),
            )
        elif held < self.spec.min_dwell_s:
            choice, reason = (
                cur,
                (
                    f"hold: {best.path} at {best.share:g} is better by {gain:.4g}, but the current "
                    f"choice has held {held:.1f} s < min_dwell_s {self.spec.min_dwell_s:g}"
                ),
            )
        else:
            choice, reason = (
                best,
                (
                    f"switch: objective {cur.objective:.4g} -> {best.objective:.4g} (reward "
                    f"{cur.reward:.4f} -> {best.reward:.4f})"
                ),
            )
        switched = (choice.path, choice.share) != (prev_path, prev_share)
        if switched:
            self.trial.pop(svc, None)
            settled = self.settled.get(svc, 0) > VERIFY_INTERVALS and svc in self.served
            left = self.rows.get(prev_path)
            shedding = left is not None and left.host_node is not None and self.distressed(left.host_node)
            if reason.startswith(("switch", "probe")) and settled and not shedding:  # checked once settled
                self.trial[svc] = {
                    "path": prev_path,
                    "share": prev_share,
                    "rate": self.served[svc],
                    "expected": choice.service_rate,
                }
            self.served.pop(svc, None)
            self.settled[svc] = 0
            self.current[svc] = (choice.path, choice.share)
            self.since[svc] = m.t
        elif svc not in self.since:
            self.since[svc] = m.t
        hosts = {c.host for c in cands if c.host}
        host_nodes = sorted({r.host_node for r in self.rows.values() if r.local == svc and r.host_node})
        figures = {
            "arrivals": round(self.arrivals.get(svc, 0.0), 3),
            "Q_l": round(self.q_local.get(svc, 0.0), 3),
            "Q_h": {
                h: round(self.q_host.get(h, 0.0), 3) for h in sorted(hosts | set(excluded_hosts(self.rows, excluded)))
            },
            "own_util": {n: round(self._own_util(n), 4) for n in host_nodes},
            "own_latency_ms": {n: round(self.own_latency.get(n, 0.0), 1) for n in host_nodes},
            "slowdown": {n: round(v, 4) for n, v in sorted(self.slowdown.items())},
            "chosen": choice.to_dict(),
            "best": best.to_dict(),
            "current": cur.to_dict() if cur else None,
            "excluded": excluded,
            "candidates": len(cands),
            "served": round(self.served[svc], 3) if svc in self.served else None,
            "trial": self.trial.get(svc),
            "measured": self.measured.get(svc),
            "split": self.split.get(svc),
        }
        d = Decision(
            m.t,
            svc,
            choice.path,
            choice.share,
            prev_path,
            prev_share,
            switched,
            reason,
            choice.objective,
            choice.reward,
            figures,
        )
        self.last[svc] = d
        return d


def excluded_hosts(rows: Mapping[str, Row], excluded: Mapping[str, str]) -> list[str]:
    return [host for p in excluded if p in rows and (host := rows[p].host)]


def _key(path: str, share: float) -> str:
    return f"{path}@{share:g}"
