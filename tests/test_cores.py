"""emulation.pin_cores: Ray's own processes on the head's cores, each node's work on the rest (CPU affinity)."""

import os

import pytest

from coderay.config import CoderayConfig
from coderay.emulation import HEAD, core_plan, cores_of, timing_as, work_as

MACHINE = sorted(os.sched_getaffinity(1))


def pinned(cfg: CoderayConfig, **emulation) -> CoderayConfig:
    return cfg.model_copy(
        update={"emulation": cfg.emulation.model_copy(update={"cpu_caps": False, "pin_cores": True, **emulation})}
    )


def test_pin_cores_needs_caps_off(tiny_cfg):
    data = tiny_cfg.model_dump() | {"emulation": {"cpu_caps": True, "pin_cores": True}}
    with pytest.raises(ValueError, match="emulation.pin_cores needs emulation.cpu_caps: false"):
        CoderayConfig.model_validate(data)
    assert pinned(tiny_cfg).on_real_cluster().emulation.pin_cores is False  # a real cluster pins nothing


def test_core_plan_keeps_the_reserve_for_the_head(tiny_cfg, caplog):
    assert core_plan(tiny_cfg) == {}  # off by default
    plan = core_plan(pinned(tiny_cfg, reserve_cpus=0.5))
    if len(MACHINE) < 2:
        assert plan == {} and "nothing is pinned" in caplog.text
        return
    assert plan[HEAD] == (MACHINE[0],)
    assert plan["edge-a"] == plan["edge-b"] == tuple(MACHINE[1:])
    assert core_plan(pinned(tiny_cfg, reserve_cpus=float(len(MACHINE)))) == {}  # no core left for the nodes
    assert "none left after" in caplog.text


def test_timing_as_a_node_runs_on_its_cores_and_comes_back(tiny_cfg):
    cfg = pinned(tiny_cfg)
    if not core_plan(cfg):
        pytest.skip("pinning needs at least 2 cores")
    before = cores_of()
    with timing_as(cfg, "edge-b"):
        inside = cores_of()
    assert inside == list(core_plan(cfg)["edge-b"]) != before
    assert cores_of() == before


@pytest.fixture(scope="module")
def pinned_cluster(trained_cfg):
    import ray

    from coderay.cluster import LocalCluster

    cfg = pinned(trained_cfg)
    if not core_plan(cfg):
        pytest.skip("pinning needs at least 2 cores")
    if ray.is_initialized():
        ray.shutdown()
    mask = cores_of()
    cluster = LocalCluster(cfg)
    try:
        yield cfg, cluster, mask
    finally:
        cluster.shutdown()


def test_local_cluster_pins_ray_to_the_head_and_node_work_to_the_nodes(pinned_cluster):
    import ray

    from coderay.cluster import pin

    cfg, cluster, driver_mask = pinned_cluster
    plan = core_plan(cfg)
    assert cores_of() == driver_mask  # the driver itself is back where it was
    daemons = {
        info.process.pid: kind
        for node in cluster.cluster.list_all_nodes()
        for kind, infos in node.all_processes.items()
        for info in infos
    }
    assert {"raylet", "gcs_server"} <= set(daemons.values())
    assert {pid: cores_of(pid) for pid in daemons} == dict.fromkeys(daemons, list(plan[HEAD]))

    @ray.remote
    class Probe:
        def __init__(self, node: str | None):
            self.before = cores_of()
            if node:
                work_as(cfg, node)

        def cores(self) -> tuple[list[int], list[int]]:
            return self.before, cores_of()

    on_node = Probe.options(**pin("edge-b")).remote("edge-b")
    on_head = Probe.options(num_cpus=0, resources={"head": 0.01}).remote(None)
    node_before, node_after = ray.get(on_node.cores.remote(), timeout=60)
    head_before, head_after = ray.get(on_head.cores.remote(), timeout=60)
    assert node_before == head_before == head_after == list(plan[HEAD])  # workers start on the head's cores
    assert node_after == list(plan["edge-b"])  # a node's worker moves to its own
