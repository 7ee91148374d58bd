"""One interval's figures from hand-built reports, against hand-computed sums and rates (no Ray, no clock)."""

from __future__ import annotations

import copy

import pytest

from coderay.measurements import aggregate, delta, heard_blocks

SERVICES = {"digits": "edge-a", "fashion": "edge-a", "mnist": "edge-b"}
NODES = ["edge-a", "edge-b"]
ZERO = {"own_samples": 0.0, "guest_samples": 0.0, "compute_s": 0.0}


def block(own: float, guest: float = 0.0, compute: float = 0.0, **extra) -> dict:
    return {"own_samples": own, "guest_samples": guest, "compute_s": compute, **extra}


def served(requests: int, samples: int, latency_s: float, by_path: dict, *, fallbacks: int = 0, **extra) -> dict:
    return {
        "requests": requests,
        "samples": samples,
        "fallbacks": fallbacks,
        "latency_s": latency_s,
        "by_path": by_path,
        **extra,
    }


def run(**kw):
    args = {
        "services": SERVICES,
        "nodes": NODES,
        "dt": 2.0,
        "now": 100.0,
        "blocks": {},
        "prev_blocks": {},
        "ingress": {},
        "prev_ingress": {},
        "fresh_s": 5.0,
    }
    return aggregate(**args | kw)


def test_a_counter_that_went_down_counts_from_zero():
    assert (delta(7, 3), delta(3, 3), delta(2, 9)) == (4, 0, 2)


def test_nothing_reported_is_an_interval_of_zeros():
    got = run()
    assert got.arrivals == {"digits": 0.0, "fashion": 0.0, "mnist": 0.0}
    assert got.nodes == {"edge-a": ZERO, "edge-b": ZERO}  # no cpu_busy, no own_latency_ms
    assert got.served["mnist"] == {"requests": 0, "samples": 0, "fallbacks": 0, "latency_s": 0.0, "by_path": {}}
    assert (got.failing, got.replicas, got.block_baselines, got.ingress_baselines) == (frozenset(), [], {}, {})


def test_no_services_nor_nodes():
    got = run(services={}, nodes=[])
    assert (got.arrivals, got.nodes, got.served, got.replicas) == ({}, {}, {}, [])


def test_block_counters_are_summed_per_node_and_scaled_to_the_interval():
    """dt = 2 s; digits' reports 4 s apart (scale 0.5), fashion's 1 s apart (scale 2), both on edge-a."""
    prev = {"digits": (10.0, block(100, 20, 1.0)), "fashion": (13.0, block(50, 0, 0.5))}
    now = {"digits": (14.0, block(140, 30, 1.8)), "fashion": (14.0, block(53, 1, 0.6))}
    got = run(blocks=now, prev_blocks=prev)
    a = got.nodes["edge-a"]
    assert a["own_samples"] == pytest.approx(0.5 * 40 + 2 * 3)
    assert a["guest_samples"] == pytest.approx(0.5 * 10 + 2 * 1)
    assert a["compute_s"] == pytest.approx(0.5 * 0.8 + 2 * 0.1)
    assert got.nodes["edge-b"] == ZERO  # mnist's group was not heard from
    assert got.block_baselines == now


def test_a_groups_first_report_is_its_baseline_and_counts_nothing():
    first = {"mnist": (14.0, block(500, 90, 7.0))}
    got = run(blocks=first)
    assert got.nodes["edge-b"] == ZERO and got.block_baselines == first


def test_no_report_since_the_last_interval_counts_nothing_and_keeps_the_baseline():
    prev = {"mnist": (14.0, block(500))}
    got = run(blocks={"mnist": (14.0, block(500))}, prev_blocks=prev)
    assert got.nodes["edge-b"] == ZERO and got.block_baselines == prev


def test_a_restarted_group_counts_from_zero():
    got = run(blocks={"mnist": (12.0, block(30))}, prev_blocks={"mnist": (10.0, block(400))})
    assert got.nodes["edge-b"]["own_samples"] == pytest.approx(30.0)  # scale 1: 30, not 30 - 400


def test_cpu_busy_is_the_cgroups_seconds_over_its_share_capped_at_one_and_a_half():
    prev = {"mnist": (10.0, block(0, cpu_s=5.0, cpu_share=0.5))}
    got = run(blocks={"mnist": (12.0, block(0, cpu_s=5.8, cpu_share=0.5))}, prev_blocks=prev)
    assert got.nodes["edge-b"]["cpu_busy"] == pytest.approx(0.8 / 2 / 0.5)
    hot = run(blocks={"mnist": (12.0, block(0, cpu_s=9.0, cpu_share=0.5))}, prev_blocks=prev)
    assert hot.nodes["edge-b"]["cpu_busy"] == 1.5
    uncapped = run(blocks={"mnist": (12.0, block(0))}, prev_blocks={"mnist": (10.0, block(0))})
    assert "cpu_busy" not in uncapped.nodes["edge-b"]


def test_fresh_replicas_are_summed_per_service_and_stale_ones_left_out():
    """r1 counts its increase, r2 (new) is its own baseline, r3 last synced 10 s ago (fresh_s 5): left out."""
    prev_r1 = {"services": {"digits": served(10, 20, 1.0, {"digits:local": 10}), "mnist": served(4, 4, 0.2, {})}}
    ingress = {
        "r1": {
            "seen": 99.0,
            "stats": {
                "services": {
                    "digits": served(
                        16, 32, 1.3, {"digits:local": 12, "digits:mnist:0:1:3:4": 4}, fallbacks=1, suspended_paths={}
                    ),
                    "mnist": served(6, 10, 0.3, {"mnist:local": 2}, suspended_paths={"mnist:skip:1:3": 12.0}),
                    "ghost": served(50, 50, 5.0, {}),  # not a service of this config: ignored
                }
            },
        },
        "r2": {"seen": 97.0, "stats": {"services": {"digits": served(100, 100, 9.0, {"digits:local": 100})}}},
        "r3": {
            "seen": 90.0,
            "stats": {"services": {"digits": served(7, 7, 0.7, {}, suspended_paths={"digits:skip:0:2": 1.0})}},
        },
    }
    got = run(ingress=ingress, prev_ingress={"r1": prev_r1, "r3": {}})
    assert got.served["digits"] == {
        "requests": 6,
        "samples": 12,
        "fallbacks": 1,
        "latency_s": pytest.approx(0.3),
        "by_path": {"digits:local": 2, "digits:mnist:0:1:3:4": 4},
    }
    assert got.served["mnist"] == {
        "requests": 2,
        "samples": 6,
        "fallbacks": 0,
        "latency_s": pytest.approx(0.1),
        "by_path": {"mnist:local": 2},
    }
    assert got.arrivals == {"digits": 6.0, "mnist": 3.0, "fashion": 0.0}  # samples / dt
    assert got.failing == {"mnist:skip:1:3"}  # r3's suspended path is stale
    assert got.replicas == ["r1", "r2"]
    assert got.ingress_baselines == {"r1": ingress["r1"]["stats"], "r2": ingress["r2"]["stats"]}
    # own latency per node: edge-a serves digits (fashion answered none), edge-b mnist
    assert got.nodes["edge-a"]["own_latency_ms"] == pytest.approx(1e3 * 0.3 / 6)
    assert got.nodes["edge-b"]["own_latency_ms"] == pytest.approx(1e3 * 0.1 / 2)


def test_own_latency_is_averaged_over_the_nodes_services_by_request():
    prev = {"services": {"digits": served(0, 0, 0.0, {}), "fashion": served(0, 0, 0.0, {})}}
    stats = {"services": {"digits": served(1, 1, 0.5, {}), "fashion": served(3, 3, 0.3, {})}}
    got = run(ingress={"r1": {"seen": 100.0, "stats": stats}}, prev_ingress={"r1": prev})
    assert got.nodes["edge-a"]["own_latency_ms"] == pytest.approx(1e3 * 0.8 / 4)  # not the mean of 500 and 100
    assert "own_latency_ms" not in got.nodes["edge-b"]


def test_a_restarted_replica_counts_from_zero():
    prev = {"services": {"digits": served(50, 80, 4.0, {"digits:local": 50})}}
    stats = {"services": {"digits": served(3, 5, 0.2, {"digits:local": 3})}}
    got = run(ingress={"r1": {"seen": 100.0, "stats": stats}}, prev_ingress={"r1": prev})
    assert (got.served["digits"]["requests"], got.served["digits"]["by_path"]) == (3, {"digits:local": 3})


def test_the_inputs_are_left_as_they_were():
    kw = {
        "blocks": {"mnist": (14.0, block(10))},
        "prev_blocks": {"mnist": (12.0, block(4))},
        "ingress": {"r1": {"seen": 100.0, "stats": {"services": {"digits": served(2, 2, 0.1, {"a": 1})}}}},
        "prev_ingress": {"r1": {"services": {"digits": served(1, 1, 0.0, {"a": 1})}}},
    }
    before = copy.deepcopy(kw)
    run(**kw)
    assert kw == before


def test_heard_blocks_keeps_fresh_reports_on_live_nodes_and_names_the_missed():
    services = {"digits": "edge-a", "fashion": "edge-a", "mnist": "edge-b", "cifar": "edge-c", "svhn": "edge-c"}
    alive = {"edge-a": True, "edge-b": False, "edge-c": True}
    capped = {"stats": block(5), "capacity": {"cpu_s": 4.0, "share": 0.5}, "queue": {"in_flight": 2}}
    reports = {
        "digits": (99.0, capped),
        "mnist": (99.5, {"stats": block(1)}),  # its node is dead: neither heard nor missed
        "cifar": (98.0, {"stats": block(2)}),  # 2 s old, stale_s 1.5: missed
        "svhn": (98.6, {"stats": block(3), "capacity": {"cpu_s": None, "share": 0.5}}),
    }
    heard, missed = heard_blocks(reports, services, alive, now=100.0, since=99.0, stale_s=1.5)
    assert heard == {
        "digits": (99.0, block(5, cpu_s=4.0, cpu_share=0.5)),
        "svhn": (98.6, block(3)),  # no CPU seconds: not capped
    }
    assert missed == ["cifar"]  # fashion was never heard from, but only since 1 s ago
    _, missed = heard_blocks(reports, services, alive, now=100.0, since=98.0, stale_s=1.5)
    assert missed == ["fashion", "cifar"]
    assert capped["stats"] == block(5)  # the report itself is not extended
