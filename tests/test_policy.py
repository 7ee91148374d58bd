"""The controller's drift-plus-penalty policy on synthetic measurements (no Ray, no torch)."""

import dataclasses
import json
import random
import subprocess
import sys

import pytest

from coderay.config import ControllerSpec, NetworkSpec, RewardSpec
from coderay.policy import VERIFY_INTERVALS, Decision, Measurements, NodeLoad, Policy
from coderay.rows import Row, score
from coderay.throughput import PathCosts

NET = NetworkSpec(bandwidth_mbps=1000, rtt_ms=1)
REWARD = RewardSpec(alpha=8, beta=1)
SPEC = ControllerSpec(interval_s=1.0, V=50, min_dwell_s=3.0, share_step=0.1)  # hysteresis, smoothing: defaults
SERVICES = {"digits": "edge-a", "mnist": "edge-b"}
# digits: 10 ms a sample locally; through mnist's blocks its node does 2 ms; mnist: 4 ms its own, 3 ms a guest
COSTS = PathCosts(
    local_full=0.01,
    local_part=0.002,
    host_full=0.004,
    host_part=0.003,
    batch=16,
    guest_quota=8,
    bytes_out=1568,
    bytes_back=2048,
)
COOP = "digits:mnist:0:1:3:4"
COOP2 = "digits:mnist:0:1:2:4"


def local_row() -> Row:
    return score(
        Row(
            path_id="digits:local",
            local="digits",
            kind="local",
            local_node="edge-a",
            acc_local_val=0.99,
            val_acc=0.99,
            trained=True,
            costs=PathCosts(local_full=0.01, local_part=0.01),
        ),
        REWARD,
        NET,
    )


def coop_row(path_id: str = COOP, val_acc: float = 0.975, host_part: float = 0.003) -> Row:
    spec = path_id.split(":")
    return score(
        Row(
            path_id=path_id,
            local="digits",
            kind="coop",
            host="mnist",
            lout=0,
            hin=1,
            hout=int(spec[4]),
            lin=4,
            local_node="edge-a",
            host_node="edge-b",
            acc_local_val=0.99,
            val_acc=val_acc,
            trained=True,
            links_file=f"/links/{path_id}.pt",
            costs=dataclasses.replace(COSTS, host_part=host_part),
        ),
        REWARD,
        NET,
    )


def policy(rows, spec=SPEC, initial=None) -> Policy:
    return Policy(spec, REWARD, NET, rows, SERVICES, initial)


def meas(t, *, digits=100.0, mnist=10.0, alive=True, dt=1.0, failing=()):
    """One interval: `digits` and `mnist` clients' samples/s; mnist's node runs its own at the profiled cost (digits'
    node reports its samples but no compute time: what it costs depends on the path each sample took, which these
    tests leave to the model)."""
    own = mnist * dt
    return Measurements(
        t=t,
        dt=dt,
        arrivals={"digits": digits, "mnist": mnist},
        nodes={
            "edge-a": NodeLoad(own_samples=digits * dt),
            "edge-b": NodeLoad(alive=alive, own_samples=own, compute_s=own * COSTS.host_full),
        },
        failing=frozenset(failing),
    )


def run(p, ts, **kw):
    return [p.step(meas(t, **kw)) for t in ts]


def digits_of(decisions):
    return next(d for d in decisions if d.service == "digits")


def test_idle_choice_cooperates_and_every_decision_has_its_figures():
    p = policy([local_row(), coop_row()])
    d = digits_of(p.step(meas(0.0)))
    assert d.path == COOP and 0 < d.share <= 1 and d.switched and d.reason.startswith("switch")
    f = d.figures
    assert {"arrivals", "Q_l", "Q_h", "own_util", "slowdown", "chosen", "best", "current", "excluded"} <= set(f)
    assert f["chosen"]["path"] == COOP and f["chosen"]["reward"] > 0
    # JSON-ready and back
    assert Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_a_flooded_host_loses_its_guests_and_gets_them_back_after_the_flood():
    p = policy([local_row(), coop_row()])
    run(p, [0, 1, 2, 3])
    assert p.current["digits"][0] == COOP
    share0 = p.current["digits"][1]
    # mnist's own clients send 300 samples/s: at 4 ms each that is more than its node has (u = 1.2)
    flood = [digits_of(p.step(meas(t, mnist=300.0))) for t in range(4, 30)]
    drop = next(d for d in flood if d.switched)
    print(f"\nflood from t=4: share {share0} -> {drop.share} at t={drop.t} ({drop.reason})")
    assert drop.t - 4 <= SPEC.min_dwell_s + 3 and drop.share < share0
    assert p.current["digits"][1] < share0 / 2 or p.current["digits"][0] == "digits:local"
    assert flood[-1].figures["own_util"]["edge-b"] > 1.0 and flood[-1].share < share0 / 2
    # after the flood: cooperation resumes
    after = [digits_of(p.step(meas(t, mnist=10.0))) for t in range(30, 60)]
    back = next(d for d in after if d.switched and d.path == COOP and d.share >= share0 / 2)
    print(f"flood over at t=30: back to {back.path} at {back.share} at t={back.t}")
    assert back.t - 30 <= 20


def test_a_host_whose_own_clients_wait_sheds_its_guests_though_its_cpu_is_not_full():
    """What the demo's HTTP flood showed: guests holding their slots of every batch keep the host's own share of
    its CPU at ~60%, under the 90% that admits guests, while its own clients wait seconds. Their mean latency
    above `host_latency_ms` takes the guests off; once they no longer wait the guests come back."""

    def waiting(t, latency_ms):
        m = meas(t, mnist=150.0)  # 60% of edge-b for its own clients
        nodes = dict(m.nodes) | {"edge-b": dataclasses.replace(m.nodes["edge-b"], own_latency_ms=latency_ms)}
        return dataclasses.replace(m, nodes=nodes)

    p = policy([local_row(), coop_row()])
    [p.step(waiting(t, 40.0)) for t in range(0, 10)]
    assert p.current["digits"][0] == COOP and not p.waiting("edge-b")
    share0 = p.current["digits"][1]
    flood = [digits_of(p.step(waiting(t, 2500.0))) for t in range(10, 40)]
    drop = next(d for d in flood if d.switched)
    print(f"\nown clients wait from t=10: share {share0} -> {drop.share} ({drop.path}) at t={drop.t}")
    assert p.waiting("edge-b") and flood[-1].figures["own_util"]["edge-b"] == 1.0
    assert flood[-1].figures["own_latency_ms"]["edge-b"] > SPEC.host_latency_ms
    assert drop.t - 10 <= SPEC.min_dwell_s + 3 and p.current["digits"][0] == "digits:local"
    after = [digits_of(p.step(waiting(t, 40.0))) for t in range(40, 100)]
    back = next(d for d in after if d.switched and d.path == COOP)
    print(f"they no longer wait from t=40: back to {back.path} at {back.share} at t={back.t}")
    assert not p.waiting("edge-b") and back.t - 40 <= 30


def test_guest_work_stays_within_what_the_host_admits_and_the_queues_stay_bounded():
    """mnist's own clients take 60% of its node: it admits (1 − 0.1 − 0.6) / 3 ms = 100 guest samples/s. digits'
    120 samples/s need cooperation (local-only answers 100), at a share whose guest work fits: both virtual
    queues stay bounded."""
    p = policy([local_row(), coop_row()])
    ds = [digits_of(p.step(meas(t, digits=120.0, mnist=150.0))) for t in range(0, 60)]
    last = ds[-1]
    g, offered = last.figures["chosen"]["guest_rate"], last.share * 120.0
    print(
        f"\nshare {last.share}: offered {offered:.0f} guest samples/s, admitted {g:.0f}; Q_l {last.figures['Q_l']}, "
        f"Q_h {last.figures['Q_h']}"
    )
    assert last.path == COOP and offered <= g * 1.05 and last.figures["chosen"]["service_rate"] >= 120
    assert max(d.figures["Q_h"]["mnist"] for d in ds[30:]) < 200 and max(d.figures["Q_l"] for d in ds[30:]) < 200


def test_a_service_the_table_has_no_rows_for_keeps_no_backlog():
    """mnist is not a searched service here (no mnist rows): it has no modelled rate, so its own clients must
    not pile up a virtual backlog that never drains (it did: Q_l grew by its arrivals every interval)."""
    p = policy([local_row(), coop_row()])
    run(p, range(1, 30), digits=120.0, mnist=500.0)
    assert p.q_local.get("mnist", 0.0) == 0.0
    # digits has rows, and a backlog: its host is flooded (no guest slots), so it runs local-only, which answers
    # 1 / 10 ms = 100 of its 120 samples/s; the 20 a second it cannot answer pile up, every interval of 1 s
    assert p.current["digits"] == ("digits:local", 0.0)
    assert p.q_local["digits"] == pytest.approx(29 * (120.0 - 1 / 0.01))


def test_no_flapping_between_two_near_equal_paths():
    p = policy([local_row(), coop_row(COOP, 0.975), coop_row(COOP2, 0.9749, host_part=0.00301)])
    rng = random.Random(0)
    switches = []
    for t in range(200):  # measurements with ±20% noise on every figure
        m = meas(t, digits=100 * rng.uniform(0.8, 1.2), mnist=10 * rng.uniform(0.8, 1.2))
        m = dataclasses.replace(
            m,
            nodes={
                n: dataclasses.replace(v, compute_s=v.compute_s * rng.uniform(0.8, 1.2)) for n, v in m.nodes.items()
            },
        )
        switches += [d for d in p.step(m) if d.switched and d.service == "digits"]
    print(f"\n{len(switches)} switch(es) in 200 noisy intervals: {[(d.t, d.path, d.share) for d in switches]}")
    assert len(switches) <= 2


def test_dwell_time_holds_a_fresh_choice():
    spec = SPEC.model_copy(update={"min_dwell_s": 10.0, "hysteresis": 0.0})
    p = policy([local_row(), coop_row()], spec)
    p.step(meas(0.0))
    d = digits_of(p.step(meas(1.0, mnist=2000.0)))  # a flood: the best choice changes at once
    assert not d.switched and "min_dwell_s" in d.reason


def test_a_host_whose_node_is_gone_gets_share_zero_at_once():
    p = policy([local_row(), coop_row()], SPEC.model_copy(update={"min_dwell_s": 1000.0}))
    p.step(meas(0.0))
    assert p.current["digits"][0] == COOP
    d = digits_of(p.step(meas(1.0, alive=False)))
    assert d.switched and (d.path, d.share) == ("digits:local", 0.0)
    assert d.reason.startswith("forced") and "edge-b gone" in d.reason
    assert d.figures["excluded"] == {COOP: "host node edge-b gone or unreachable"}
    # while it stays gone: still local
    assert all(digits_of(ds).path == "digits:local" for ds in run(p, [2, 3, 4], alive=False))
    # a path the ingress reports failing is also left at once
    q = policy([local_row(), coop_row()], SPEC.model_copy(update={"min_dwell_s": 1000.0}))
    q.step(meas(0.0))
    assert digits_of(q.step(meas(1.0, failing=[COOP]))).path == "digits:local"


def test_measured_costs_rescore_the_rows():
    p = policy([local_row(), coop_row()])
    slow_host = Measurements(
        t=0,
        dt=1,
        arrivals={"digits": 0, "mnist": 200},
        nodes={"edge-b": NodeLoad(own_samples=200, compute_s=200 * COSTS.host_full * 3)},
    )
    before = {r.path_id: r for r in p.live_rows()}
    p.step(slow_host)
    after = {r.path_id: r for r in p.live_rows()}
    assert p.slowdown["edge-b"] == pytest.approx(3.0)
    assert after[COOP].th_host < before[COOP].th_host and after[COOP].reward < before[COOP].reward
    assert after[COOP]["slowdown_host"] == pytest.approx(3.0)
    for t in range(1, 20):  # idle afterwards: the profile stands again
        p.step(Measurements(t=t, dt=1, arrivals={}, nodes={"edge-b": NodeLoad(own_samples=5, compute_s=0.02)}))
    assert p.slowdown["edge-b"] == pytest.approx(1.0, abs=0.01)
    # light load teaches nothing (small batches would pass for a slow node)
    q = policy([local_row(), coop_row()])
    q.step(Measurements(t=0, dt=1, arrivals={}, nodes={"edge-b": NodeLoad(own_samples=20, compute_s=0.2)}))
    assert "edge-b" not in q.slowdown


def served_under(p, ts, rate_of):
    """Closed-loop clients that saturate digits: each interval they are answered at `rate_of(path, share)` samples/s
    of the choice in force (what serving measures), whatever the model thinks. Returns the decisions."""
    out = []
    for t in ts:
        path, share = p.current["digits"]
        out.append(digits_of(p.step(meas(float(t), digits=rate_of(path, share)))))
    return out


def more_coop_serves_more(path, share):
    return 300.0 * share if path == COOP else 100.0  # the host has room: each guest sample is a gain


def test_a_move_that_serves_less_is_undone_and_held_off_while_measured():
    """The demo's case: the model (its host grant g_H below what the host really admits) prefers less cooperation
    than share 1.0, which serves the most. Each move away is undone once measured, and not tried again until the
    measured rates are forgotten; without the check the controller stays where it serves less."""
    spec = SPEC.model_copy(update={"verify_memory_s": 30.0})
    at_one = {"digits": {"path": COOP, "coop_fraction": 1.0}}
    p = Policy(spec, REWARD, NET, [local_row(), coop_row()], SERVICES, at_one, now=0.0)
    ds = served_under(p, range(80), more_coop_serves_more)
    moves = [d for d in ds if d.switched]
    print("\n" + "\n".join(f"t={d.t:g} {d.path} at {d.share:g}: {d.reason}" for d in moves))
    away, back = moves[0], moves[1]
    assert (away.previous_path, away.previous_share) == (COOP, 1.0) and away.reason.startswith("switch")
    assert back.reason.startswith("revert") and (back.path, back.share) == (COOP, 1.0)
    assert back.t - away.t <= spec.min_dwell_s + VERIFY_INTERVALS + 1
    assert back.figures["measured"]["rates"][f"{COOP}@1"] == pytest.approx(300.0)
    # held at 1.0 while the rates are remembered; then at most one probe at a time, each undone
    assert not [d for d in moves if back.t < d.t < back.t + spec.verify_memory_s]
    assert all(m.reason.startswith("revert") for m in moves[1::2]) and len(moves) <= 6
    served = [more_coop_serves_more(d.path, d.share) for d in ds]
    assert sum(served) / len(served) >= 0.9 * 300

    q = Policy(
        SPEC.model_copy(update={"verify_tolerance": None}),
        REWARD,
        NET,
        [local_row(), coop_row()],
        SERVICES,
        at_one,
        0.0,
    )
    unchecked = served_under(q, range(80), more_coop_serves_more)
    assert not any(d.reason.startswith("revert") for d in unchecked)
    assert more_coop_serves_more(*q.current["digits"]) <= 0.75 * 300  # stuck where it serves less


def test_a_move_that_serves_more_is_kept_and_an_unsaturated_one_too():
    start = {"digits": {"path": "digits:local", "coop_fraction": 0.0}}
    p = Policy(SPEC, REWARD, NET, [local_row(), coop_row()], SERVICES, start, now=0.0)
    ds = served_under(p, range(40), more_coop_serves_more)
    assert ds[-1].path == COOP and not p.trial
    # the move that served more is never undone; only a later one that served less (a split share the model
    # over-rated, undone and remembered)
    reverts = [d for d in ds if d.reason.startswith("revert")]
    assert all(d.path == COOP for d in reverts)
    rate = more_coop_serves_more
    assert all(rate(d.path, d.share) > rate(d.previous_path, d.previous_share) for d in reverts)
    # clients that ask 50 samples/s, which every choice serves: served rates tell nothing, no move is undone
    q = Policy(SPEC, REWARD, NET, [local_row(), coop_row()], SERVICES, start, now=0.0)
    assert not any(d.reason.startswith("revert") for d in served_under(q, range(40), lambda path, share: 50.0))


def test_while_a_pin_holds_the_service_elsewhere_nothing_is_learnt_of_the_controllers_choice():
    """A route pinned by hand overrides the controller's: the requests went another way (the ingress's per-path
    counts say so), so what they were served at is not the controller's choice's rate, and no move is checked."""
    spec = SPEC.model_copy(update={"verify_memory_s": 30.0})
    at_one = {"digits": {"path": COOP, "coop_fraction": 1.0}}
    p = Policy(spec, REWARD, NET, [local_row(), coop_row()], SERVICES, at_one, now=0.0)
    for t in range(40):  # pinned local-only: 100 requests a second answered there, whatever the controller says
        m = dataclasses.replace(meas(float(t), digits=100.0), paths={"digits": {"digits:local": 100}})
        d = digits_of(p.step(m))
        assert not d.reason.startswith("revert") and "digits" not in p.served and not p.trial
    assert p.settled["digits"] == 0
    # the pin released: its requests go the controller's way again, measured from the next interval on
    path, share = p.current["digits"]
    counts = (
        {path: 100} if path == "digits:local" else {path: round(100 * share), "digits:local": round(100 * (1 - share))}
    )
    for t in (40.0, 41.0):
        p.step(dataclasses.replace(meas(t), paths={"digits": counts}))
    assert p.settled["digits"] == 2 and "digits" in p.served


def test_a_cooperating_node_is_charged_only_the_local_part_of_its_cooperative_requests():
    """digits at share 1.0: its node runs only the head and tail (c_ht = 2 ms) of every request. Measured at exactly
    that cost it is exactly as fast as profiled (slowdown 1), not five times faster (10 ms charged for each)."""
    at_one = {"digits": {"path": COOP, "coop_fraction": 1.0}}
    p = Policy(SPEC, REWARD, NET, [local_row(), coop_row()], SERVICES, at_one, now=0.0)
    for t in range(5):
        m = Measurements(
            t=float(t),
            dt=1.0,
            arrivals={"digits": 300.0, "mnist": 0.0},
            nodes={"edge-a": NodeLoad(own_samples=300.0, compute_s=300 * COSTS.local_part)},
            paths={"digits": {COOP: 300}},
        )
        p._learn(m)
    assert p.slowdown["edge-a"] == pytest.approx(1.0)
    # half of them local-only (10 ms each), half cooperative (2 ms): 6 ms a sample on average
    q = Policy(SPEC, REWARD, NET, [local_row(), coop_row()], SERVICES, at_one, now=0.0)
    half = {"digits": {COOP: 150, "digits:local": 150}}
    q._learn(
        Measurements(
            0.0, 1.0, {"digits": 300.0}, {"edge-a": NodeLoad(own_samples=300.0, compute_s=300 * 0.006)}, paths=half
        )
    )
    assert q.slowdown["edge-a"] == pytest.approx(1.0)


def test_state_round_trips():
    p = policy([local_row(), coop_row()])
    run(p, range(10), mnist=300.0)
    q = policy([local_row(), coop_row()])
    q.restore(json.loads(json.dumps(p.state())))
    assert q.state() == json.loads(json.dumps(p.state())) and q.routes == p.routes


def test_policy_needs_no_ray_nor_torch():
    code = "import sys, coderay.policy; assert not {'torch', 'ray'} & set(sys.modules), 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_grafana_dashboard_queries_exactly_the_metrics_coderay_exports(monkeypatch):
    """deployments/grafana_dashboard.json: every metric it queries is one coderay registers (Ray adds `ray_`,
    counters end in `_total`, histograms are read through `_bucket`), and every registered metric is shown. The
    registered ones are those the ingress and the controller create, each through a stand-in for Ray's metric
    classes that records its name and kind."""
    import re
    import types
    from pathlib import Path

    from ray import serve

    from coderay.controller import Controller
    from deployments.ingress import Ingress

    kinds: dict[str, str] = {}

    def recorder(kind: str) -> type:
        class Metric:
            def __init__(self, name: str, *args, **kwargs):
                kinds[name] = kind

            def inc(self, *args, **kwargs): ...

            set = observe = inc

        return Metric

    fake = types.SimpleNamespace(**{k: recorder(k) for k in ("Counter", "Gauge", "Histogram")})
    monkeypatch.setattr(serve, "metrics", fake)  # the ingress: `from ray.serve import metrics`
    monkeypatch.setitem(sys.modules, "ray.util.metrics", fake)  # the controller: `from ray.util.metrics ...`
    Ingress.func_or_class._metrics_init(types.SimpleNamespace())
    ingress = set(kinds)
    Controller._record_metrics(
        types.SimpleNamespace(policy=types.SimpleNamespace(arrivals={}, q_local={}, q_host={}), live_rows=[]), []
    )
    assert ingress and set(kinds) - ingress, kinds  # both made theirs
    dash = json.loads((Path(__file__).resolve().parent.parent / "deployments" / "grafana_dashboard.json").read_text())
    queried = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"\bray_(coderay_\w+)", t["expr"])}
    suffix = {"Counter": "_total", "Histogram": "_bucket", "Gauge": ""}
    assert queried == {name + suffix[kind] for name, kind in kinds.items()}


def test_split_shares_that_serve_less_than_modelled_are_scaled_down_after_one_check():
    """The demo's case: share 1.0 serves what the model says, a split share (0 < φ < 1) only 55% of its modelled
    μ (two streams in smaller merged chains). One checked move to a split share teaches the factor; from then on
    the model scales every split share by it and holds 1.0, where an uncalibrated model tries one split share
    after another as each one's measured rate is forgotten."""
    spec = SPEC.model_copy(update={"verify_memory_s": 20.0})
    at_one = {"digits": {"path": COOP, "coop_fraction": 1.0}}
    modelled = Policy(spec, REWARD, NET, [local_row(), coop_row()], SERVICES, at_one, now=0.0)
    live = {r.path_id: r for r in modelled.live_rows()}

    def served(path: str, share: float) -> float:
        mu = modelled._evaluate("digits", live.get(path), share).service_rate
        return mu if share in (0.0, 1.0) else 0.55 * mu

    p = Policy(spec, REWARD, NET, [local_row(), coop_row()], SERVICES, at_one, now=0.0)
    ds = served_under(p, range(120), served)
    split_moves = [d for d in ds if d.switched and 0 < d.share < 1]
    print("\n" + "\n".join(f"t={d.t:g} {d.path} at {d.share:g}: {d.reason}" for d in ds if d.switched))
    assert p.split["digits"] == pytest.approx(0.55, abs=0.05)
    assert len(split_moves) == 1 and p.current["digits"] == (COOP, 1.0)
    restored = Policy(spec, REWARD, NET, [local_row(), coop_row()], SERVICES)
    restored.restore(p.state())
    assert restored.split == p.split
    q = Policy(spec, REWARD, NET, [local_row(), coop_row()], SERVICES, at_one, now=0.0)
    q._calibrate = lambda *args: None  # type: ignore[method-assign]  # the model as it was: no split factor
    assert len([d for d in served_under(q, range(120), served) if d.switched and 0 < d.share < 1]) > 2


def test_a_move_that_serves_more_is_followed_by_probes_up_to_the_share_that_serves_most():
    """From local-only the model stops at a share under 1.0 (its g_H is the host's grant), while serving ranks
    1.0 first (an idle host's batches take more guests). Each move that serves more is followed by a probe one
    step further; they climb to 1.0 and stay while the measured rates stand."""
    start = {"digits": {"path": "digits:local", "coop_fraction": 0.0}}
    p = Policy(SPEC, REWARD, NET, [local_row(), coop_row()], SERVICES, start, now=0.0)
    ds = served_under(p, range(60), more_coop_serves_more)
    probes = [d for d in ds if d.reason.startswith("probe")]
    print("\n" + "\n".join(f"t={d.t:g} {d.path} at {d.share:g}: {d.reason}" for d in ds if d.switched))
    assert probes and all(d.share > d.previous_share for d in probes)
    assert p.current["digits"] == (COOP, 1.0)
    assert not [d for d in ds if d.switched and d.t > 40]
    unchecked = SPEC.model_copy(update={"verify_tolerance": None})  # the model's own choice stays under 1.0
    q = Policy(unchecked, REWARD, NET, [local_row(), coop_row()], SERVICES, start, 0.0)
    served_under(q, range(60), more_coop_serves_more)
    assert q.current["digits"][1] < 1.0
