"""The privacy audit (issue 23): train → search (Tune) → serve on a multi-node cluster, each node with its own store.

After the whole flow, each node's store holds the parameter files of its own service only, plus the links it
runs; the driver's workdir holds none; the driver process never loaded or made a parameter tensor. Every
process that reads a checkpoint looks in its own node's store (`CODERAY_STORE`), so a flow that succeeds with
disjoint stores read no file of another node.
"""

import httpx
import numpy as np
import pytest
import torch

from coderay.store import local_store, pt_files

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def audited(monkeypatch):
    """Counts, in this (the driver's) process, every parameter made and every file `torch.load`ed."""
    seen = {"params": 0, "loads": []}
    make, load = torch.nn.Parameter.__new__, torch.load

    def counted_new(cls, data=None, requires_grad=True):
        seen["params"] += 1
        return make(cls, data, requires_grad)

    def counted_load(f, *args, **kwargs):
        seen["loads"].append(str(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Parameter, "__new__", staticmethod(counted_new))
    monkeypatch.setattr(torch, "load", counted_load)
    return seen


def test_train_search_serve_keeps_each_model_on_its_node(tiny_config_path, tmp_path, audited):
    from coderay.cluster import LocalCluster
    from coderay.config import load_config
    from coderay.errors import NotTrainedError
    from coderay.provider import check_stores, train_on_nodes
    from coderay.routing import link_files
    from deployments.app import free_port, start_serving
    from tuning.search import run_tune_search

    torch.nn.Linear(1, 1)  # the counter counts (a check of the check)
    assert audited["params"] == 2
    audited["params"] = 0
    cfg = load_config(tiny_config_path, workdir=str(tmp_path / "work"))
    cluster = LocalCluster(cfg)
    served = None
    try:
        with pytest.raises(NotTrainedError, match=r"node 'edge-[ab]' has no checkpoint .* run `coderay train CONFIG"):
            check_stores(cfg)  # nothing trained yet: the node and the command are named
        trained = train_on_nodes(cfg)
        assert {m["node"] for m in trained.values()} == {"edge-a", "edge-b"}
        assert all(m["store"] == str(local_store(cfg, m["node"])) for m in trained.values())
        table = run_tune_search(cfg, progress=False, resume=False)
        served = start_serving(cfg, config_path=tiny_config_path, port=free_port(), controller=False, cluster=cluster)
        x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
        r = httpx.post(
            f"{served.url}/v1/services/digits/infer",
            content=x.tobytes(),
            headers={"Content-Type": "application/octet-stream", "X-Shape": "4,1,28,28"},
            timeout=60,
        )
        assert r.status_code == 200 and len(r.json()["predictions"]) == 4, r.text
    finally:
        if served is not None:
            served.shutdown()
        else:
            cluster.shutdown()

    assert audited["params"] == 0 and audited["loads"] == [], audited
    links = link_files(table.rows)
    assert links, "the search trained no links: nothing to audit"
    for spec in cfg.services:
        store = local_store(cfg, spec.node)
        own = {
            p.relative_to(store).as_posix()
            for p in pt_files(store)
            if not p.relative_to(store).as_posix().startswith("checkpoints/")
        }  # links it trained, per epoch
        models = {p for p in own if p.startswith("services/")}
        assert models and all(p.startswith(f"services/{spec.name}-") for p in models), (spec.node, own)
        assert own - models == set(links.get(spec.name, {}).values()), (spec.node, own)
    stores = cfg.root / "stores"
    assert [p for p in pt_files(cfg.root) if stores not in p.parents] == []
