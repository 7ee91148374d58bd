"""Serving over real HTTP on a local multi-node Ray cluster: one cluster and one deploy for the whole module.

The tiny config (conftest) puts `digits` on edge-a and `mnist` on edge-b; the search's best digits path runs
through mnist's blocks. Tests run in file order; the last one removes edge-b (a lost host node).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
import yaml

from coderay.store import node_store

BATCH = 64


@pytest.fixture(scope="module")
def served(trained_cfg, searched_table):
    import ray
    from ray import serve

    from coderay.cluster import LocalCluster
    from deployments.app import deploy, free_port

    serving = trained_cfg.serving.model_copy(
        update={"request_timeout_s": 8.0, "max_request_samples": 128, "max_body_bytes": 2 * 2**20}
    )
    emulation = trained_cfg.emulation.model_copy(update={"cpu_caps": True})  # real CPU caps per node
    cfg = trained_cfg.model_copy(update={"serving": serving, "emulation": emulation})
    if ray.is_initialized():  # LocalCluster's ray.init would otherwise keep a connection some other test left
        ray.shutdown()
    cluster = LocalCluster(cfg)
    try:
        start = time.perf_counter()
        url = deploy(cfg, searched_table, port=free_port())
        print(f"\ndeployed in {time.perf_counter() - start:.1f} s at {url}")
        with httpx.Client(base_url=url, timeout=60) as client:
            yield SimpleNamespace(
                cfg=cfg,
                cluster=cluster,
                url=url,
                client=client,
                table=searched_table,
                best=searched_table.best("digits")["path_id"],
                coop=best_coop(searched_table),
            )
    finally:
        serve.shutdown()
        cluster.shutdown()


def best_coop(table) -> str:
    """The trained cooperative path of highest reward (the table's best may be local-only: profiles vary)."""
    rows = [r for r in table.for_service("digits") if r["kind"] == "coop" and r.get("links_file")]
    assert rows, "the tiny search trained no cooperative path"
    return max(rows, key=lambda r: r["reward"])["path_id"]


def post_binary(client: httpx.Client, svc: str, x: np.ndarray, **params) -> httpx.Response:
    return client.post(
        f"/v1/services/{svc}/infer",
        content=np.ascontiguousarray(x, dtype="<f4").tobytes(),
        params=params,
        headers={"Content-Type": "application/octet-stream", "X-Shape": ",".join(map(str, x.shape))},
    )


def route(client: httpx.Client, path: str, coop_fraction: float | None = None) -> dict:
    body = {"path": path} | ({} if coop_fraction is None else {"coop_fraction": coop_fraction})
    r = client.put(f"/v1/services/{path.split(':')[0]}/route", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def pixels(task) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as raw [0, 1] pixels (the normalisation inverted) and its labels."""
    x = torch.stack([task.test[i][0] for i in range(len(task.test))])
    y = torch.stack([task.test[i][1] for i in range(len(task.test))])
    return task.denormalize(x), y


def test_replicas_run_on_their_pinned_nodes(served):
    info = served.client.get("/v1/debug/replicas").json()
    replicas = {r["deployment"]: r for r in info["replicas"]}
    from coderay.routing import link_files

    assert set(replicas) == {"blocks-digits", "blocks-mnist"}, info  # links run in their node's block group
    for r in replicas.values():
        assert r["on_pinned_node"], r
        assert r["node_id"] == served.cluster.nodes[r["node"]].node_id, r  # asked inside the replica
        assert r["node"] == served.cfg.service(r["service"]).node
    assert replicas["blocks-digits"]["torch_threads"] == 1 and replicas["blocks-digits"]["blocks"] == 5
    assert served.coop in replicas["blocks-mnist"]["paths"]
    assert set(replicas["blocks-digits"]["queue"]) == {"in_flight", "p50_ms", "p99_ms", "calls"}
    assert set(replicas["blocks-mnist"]["paths"]) == set(link_files(served.table.rows)["mnist"])


def test_listing_health_and_docs(served):
    from coderay.routing import model_share

    c = served.client
    assert c.get("/healthz").json()["status"] == "ok"
    services = {s["name"]: s for s in c.get("/v1/services").json()}
    assert services["digits"] | {"stats": None} == services["digits"] | {
        "task": "digits",
        "classes": [str(d) for d in range(10)],
        "input_shape": [1, 28, 28],
        "node": "edge-a",
        "active_path": served.best,
        "coop_fraction": model_share(served.table.row(served.best)),
        "stats": None,
    }
    assert services["mnist"]["active_path"] == "mnist:local" and services["mnist"]["node"] == "edge-b"
    paths = c.get("/v1/services/digits/paths").json()
    assert [r["path_id"] for r in paths["paths"] if r["active"]] == [served.best] == [paths["active_path"]]
    assert {r["path_id"] for r in paths["paths"]} == {r["path_id"] for r in served.table.for_service("digits")}
    assert "swagger" in c.get("/docs").text.lower()
    spec = c.get("/openapi.json").json()
    infer = spec["paths"]["/v1/services/{svc}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    assert {"/v1/services", "/v1/services/{svc}/paths", "/v1/services/{svc}/route", "/healthz"} <= set(spec["paths"])


def listener(port: int) -> str:
    """The command name of the process listening on TCP `port` here, from /proc ('' if none is found)."""
    import os

    from deployments.placement import listening_sockets, open_files

    sockets = {sock for sock, p in listening_sockets().items() if p == port}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if sockets & open_files(pid):
            try:
                return open(f"/proc/{pid}/comm").read().strip()
            except OSError:  # gone since
                continue
    return ""


def test_the_ingress_answers_on_its_own_port_as_through_the_proxy(served):
    """Serve's throughput-optimized mode (`serving.throughput_optimized`, on by default): the ingress replica
    also serves the API on a port of its own; same answers, same errors, no proxy hop. The serving port itself
    is Ray's HAProxy ingress (`serving.haproxy`), which forwards to that port."""
    from deployments.app import direct_url

    url = direct_url(served.url)
    assert url is not None and url != served.url
    assert "haproxy" in listener(int(served.url.rsplit(":", 1)[1]))
    x = np.random.default_rng(0).random((6, 1, 28, 28), dtype=np.float32)
    with httpx.Client(base_url=url, timeout=60) as direct:
        via_proxy, via_port = post_binary(served.client, "mnist", x), post_binary(direct, "mnist", x)
        assert via_proxy.status_code == via_port.status_code == 200, (via_proxy.text, via_port.text)
        assert via_proxy.json()["predictions"] == via_port.json()["predictions"]
        bad = direct.post("/v1/services/nope/infer", json={"inputs": [[0.0]]})
        assert bad.status_code == 404 and "unknown service" in bad.json()["error"]


def test_held_out_predictions_match_the_in_process_path(served, search_ctx):
    from coderay.links import load_links
    from coderay.paths import PathModule
    from coderay.pathspec import PathSpec

    local = search_ctx.services["digits"]
    x01, y = pixels(local.task)
    for path_id in (served.coop, "digits:local"):
        route(served.client, path_id)
        probs, hops, wire = [], set(), set()
        for batch in x01.split(BATCH):
            r = post_binary(served.client, "digits", batch.numpy(), top_k=10)
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["path"], body["fallback"], body["samples"]) == (path_id, False, len(batch))
            hops.add(body["network"]["cross_node_hops"])
            wire.add(body["network"]["wire_bytes"] / len(batch))
            probs += [
                [dict((s["class_index"], s["prob"]) for s in p["top_k"])[k] for k in range(10)]
                for p in body["predictions"]
            ]
        served_probs = torch.tensor(probs)
        spec = PathSpec.parse(path_id)
        if spec.kind == "coop":
            row = served.table.row(path_id)
            _, links = load_links(node_store(search_ctx.cfg, row["host_node"]) / row["links_file"])
            module = PathModule(
                spec,
                local.blocks,
                search_ctx.services[spec.host].blocks,
                links,
                link_out=row.link_out_on,
                encoding=row.encoding,
            ).eval()
            assert hops == {2}  # local node -> host node -> local node
            assert row.encoding == "float16"  # the tiny config's wire: the table measured it so
            assert wire == {row.costs.bytes_out + row.costs.bytes_back}  # the model's bytes, as served
        else:
            module = PathModule(spec, local.blocks).eval()
            assert hops == {0}
        with torch.inference_mode():
            ref = torch.softmax(module(local.task.normalize(x01)), dim=1)
        assert torch.equal(served_probs.argmax(1), ref.argmax(1)), f"{path_id}: predictions differ"
        assert (served_probs - ref).abs().max() < 1e-4
        acc = (served_probs.argmax(1) == y).float().mean().item()
        assert acc == pytest.approx(served.table.row(path_id)["test_acc"], abs=1.5 / len(y))

    # the JSON and PNG encodings reach the same model
    route(served.client, "digits:local")
    four = x01[:4]
    by_bytes = post_binary(served.client, "digits", four.numpy()).json()["predictions"]
    by_json = served.client.post("/v1/services/digits/infer", json={"inputs": four[:, 0].tolist(), "top_k": 2})
    assert by_json.status_code == 200
    assert [p["class_index"] for p in by_json.json()["predictions"]] == [p["class_index"] for p in by_bytes]
    assert len(by_json.json()["predictions"][0]["top_k"]) == 2
    import base64
    import io

    from PIL import Image

    pngs = []
    for img in four:
        buf = io.BytesIO()
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
        pngs.append(base64.b64encode(buf.getvalue()).decode())
    by_png = served.client.post("/v1/services/digits/infer", json={"images": pngs})
    assert by_png.status_code == 200 and by_png.json()["samples"] == 4


def _bad_requests(served) -> list[tuple[str, int, dict]]:
    digits = "/v1/services/digits/infer"
    ok = np.full((2, 1, 28, 28), 0.5, dtype="<f4")
    nan = ok.copy()
    nan[1, 0, 3, 3] = np.nan
    inf = ok.copy()
    inf[0, 0, 0, 0] = np.inf
    binary = {"Content-Type": "application/octet-stream"}
    limit = served.cfg.serving.max_body_bytes
    big = np.zeros((served.cfg.serving.max_request_samples + 1, 1, 28, 28), dtype="<f4")

    def chunks():
        for _ in range(limit // 65536 + 2):
            yield bytes(65536)

    return [
        ("wrong shape", 422, {"url": digits, "json": {"inputs": np.zeros((1, 1, 10, 10)).tolist()}}),
        (
            "wrong channels",
            422,
            {"url": digits, "content": bytes(4 * 3 * 784), "headers": binary | {"X-Shape": "1,3,28,28"}},
        ),
        (
            "wrong dtype header",
            422,
            {
                "url": digits,
                "content": ok.astype("<f8").tobytes(),
                "headers": binary | {"X-Shape": "2,1,28,28", "X-Dtype": "float64"},
            },
        ),
        (
            "float64 bytes as float32",
            422,
            {"url": digits, "content": ok.astype("<f8").tobytes(), "headers": binary | {"X-Shape": "2,1,28,28"}},
        ),
        ("missing X-Shape", 422, {"url": digits, "content": ok.tobytes(), "headers": binary}),
        ("NaN", 422, {"url": digits, "content": nan.tobytes(), "headers": binary | {"X-Shape": "2,1,28,28"}}),
        ("inf", 422, {"url": digits, "content": inf.tobytes(), "headers": binary | {"X-Shape": "2,1,28,28"}}),
        (
            "NaN in JSON",
            422,
            {"url": digits, "content": b'{"inputs": [[[NaN]]]}', "headers": {"Content-Type": "application/json"}},
        ),
        ("normalised, not raw, pixels", 422, {"url": digits, "json": {"inputs": np.full((1, 28, 28), -0.8).tolist()}}),
        ("non-numeric", 422, {"url": digits, "json": {"inputs": [[["a", "b"]]]}}),
        ("booleans", 422, {"url": digits, "json": {"inputs": [[[True]]]}}),
        ("empty batch", 422, {"url": digits, "json": {"inputs": []}}),
        ("empty binary", 422, {"url": digits, "content": b"", "headers": binary | {"X-Shape": "0,1,28,28"}}),
        (
            "batch above the limit",
            413,
            {"url": digits, "content": big.tobytes(), "headers": binary | {"X-Shape": ",".join(map(str, big.shape))}},
        ),
        (
            "body above the size limit",
            413,
            {"url": digits, "content": bytes(limit + 4), "headers": binary | {"X-Shape": f"{(limit + 4) // 4}"}},
        ),
        (
            "chunked body above the size limit",
            413,
            {"url": digits, "content": chunks(), "headers": binary | {"X-Shape": "1,1,28,28"}},
        ),
        ("unknown service", 404, {"url": "/v1/services/nope/infer", "json": {"inputs": ok.tolist()}}),
        (
            "malformed JSON",
            422,
            {"url": digits, "content": b'{"inputs": [[[0.5]', "headers": {"Content-Type": "application/json"}},
        ),
        ("no inputs", 422, {"url": digits, "json": {"top_k": 3}}),
        ("bad base64", 422, {"url": digits, "json": {"images": ["not base64 !!"]}}),
        ("bad PNG", 422, {"url": digits, "json": {"images": ["aGVsbG8gd29ybGQ="]}}),
        (
            "unsupported content type",
            415,
            {"url": digits, "content": b"0.5", "headers": {"Content-Type": "text/plain"}},
        ),
        ("top_k zero", 422, {"url": digits + "?top_k=0", "json": {"inputs": ok.tolist()}}),
        ("top_k above classes", 422, {"url": digits + "?top_k=11", "json": {"inputs": ok.tolist()}}),
        ("top_k not a number", 422, {"url": digits + "?top_k=many", "json": {"inputs": ok.tolist()}}),
    ]


def test_bad_input_gets_a_4xx_naming_it_and_serving_goes_on(served):
    c = served.client
    statuses = {}
    for name, status, kwargs in _bad_requests(served):
        url = kwargs.pop("url")
        r = c.post(url, **kwargs)
        statuses[name] = r.status_code
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        body = r.json()
        assert isinstance(body.get("error"), str) and len(body["error"]) > 8, f"{name}: {body}"
    assert c.get("/nope").status_code == 404 and "error" in c.get("/nope").json()
    good = post_binary(c, "digits", np.full((3, 1, 28, 28), 0.25))
    assert good.status_code == 200 and good.json()["samples"] == 3
    print("\n" + "\n".join(f"  {s}  {n}" for n, s in statuses.items()))


def test_route_switch_is_validated_and_splits_traffic(served):
    c = served.client
    untrained = next(
        r["path_id"] for r in served.table.for_service("digits") if r["kind"] == "coop" and not r.get("links_file")
    )
    for body, status, reason in [
        ({"path": untrained}, 422, "no trained links"),
        ({"path": "digits:nowhere"}, 422, "not a path id"),
        ({"path": "mnist:local"}, 422, "answers service 'mnist'"),
        ({"path": served.coop, "coop_fraction": 2}, 422, "coop_fraction"),
        ({"coop_fraction": 0.5}, 422, "path"),
    ]:
        r = c.put("/v1/services/digits/route", json=body)
        assert r.status_code == status and reason in r.json()["error"], r.text
    assert c.put("/v1/services/nope/route", json={"path": "nope:local"}).status_code == 404
    assert c.get("/v1/services/digits/route").json()["path"] != untrained

    assert route(c, served.coop, 0.5) == {
        "service": "digits",
        "path": served.coop,
        "path_kind": "coop",
        "coop_fraction": 0.5,
    }
    used = [post_binary(c, "digits", np.full((1, 1, 28, 28), 0.5)).json()["path"] for _ in range(6)]
    assert used.count(served.coop) == 3 and used.count("digits:local") == 3
    route(c, served.coop)


def test_put_pins_a_route_until_delete_releases_it(served):
    from coderay.routing import initial_routes

    c = served.client
    auto = initial_routes(served.cfg, served.table.rows)["digits"]
    route(c, "digits:local")
    listed = {s["name"]: s for s in c.get("/v1/services").json()}["digits"]
    assert (listed["active_path"], listed["pinned"]) == ("digits:local", True)
    released = c.delete("/v1/services/digits/route")
    assert released.status_code == 200 and released.json()["path"] == auto["path"]
    assert released.json()["coop_fraction"] == pytest.approx(auto["coop_fraction"])
    assert not {s["name"]: s for s in c.get("/v1/services").json()}["digits"]["pinned"]
    assert c.delete("/v1/services/nope/route").status_code == 404


def test_reconfigure_switches_routes_in_place(served):
    from ray import serve

    from deployments.app import APP_NAME

    ingress = serve.get_app_handle(APP_NAME)
    pid = served.client.get("/v1/debug/replicas").json()["ingress"]["pid"]
    done = ingress.reconfigure.remote({"routes": {"digits": {"path": "digits:local"}}}).result(timeout_s=30)
    assert done["applied"] == {"digits": {"path": "digits:local", "coop_fraction": 0.0}} and not done["rejected"]
    assert served.client.get("/v1/services/digits/route").json()["path"] == "digits:local"
    assert post_binary(served.client, "digits", np.full((1, 1, 28, 28), 0.5)).json()["path"] == "digits:local"
    # an invalid entry never takes the ingress down (Serve would stop a replica whose reconfigure raises):
    # it is rejected with its reason, its service keeps its route, the valid entries apply
    bad = {"digits": {"path": "digits:mnist:0:1:9:9"}, "mnist": {"path": "mnist:local", "coop_fraction": 0.0}}
    done = ingress.reconfigure.remote({"routes": bad}).result(timeout_s=30)
    assert "not in the reward table" in done["rejected"]["digits"] and "mnist" in done["applied"]
    assert done["routes"]["digits"]["path"] == "digits:local"
    assert "digits" in served.client.get("/healthz").json()["config_errors"]
    ingress.reconfigure.remote({"routes": {"digits": {"path": served.coop, "coop_fraction": 1.0}}}).result(timeout_s=30)
    assert ingress.get_routes.remote().result(timeout_s=30)["digits"] == {"path": served.coop, "coop_fraction": 1.0}
    assert served.client.get("/healthz").json()["config_errors"] == {}
    assert served.client.get("/v1/debug/replicas").json()["ingress"]["pid"] == pid  # same replica throughout


def test_host_batches_admit_at_most_s_guest_samples(served):
    c = served.client
    route(c, served.coop)
    quota = served.cfg.service("mnist").guest_quota
    rng = np.random.default_rng(0)

    def guest(_):
        return post_binary(c, "digits", rng.random((3 * quota, 1, 28, 28)))

    def own(_):
        return post_binary(c, "mnist", rng.random((4, 1, 28, 28)))

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(guest if i % 2 else own, i) for i in range(40)]
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:2]
    assert not any(r.json()["fallback"] for r in responses)
    mnist = next(r for r in c.get("/v1/debug/replicas").json()["replicas"] if r["deployment"] == "blocks-mnist")
    stats = mnist["stats"]
    print(f"\nblocks-mnist batching: {stats}")
    assert 0 < stats["max_guest_samples_in_batch"] <= quota
    assert stats["max_batch_samples"] <= served.cfg.service("mnist").batch_size
    assert stats["guest_samples"] >= 20 * 3 * quota and stats["own_samples"] >= 20 * 4
    assert stats["mixed_range_batches"] > 0  # the host's own 1..N beside guests' hin..hout in one batch


def test_switching_paths_under_concurrent_load_fails_no_request(served):
    c = served.client
    local, best = "digits:local", served.coop
    route(c, local)
    done = threading.Event()
    results: list[tuple[int, str | None, bool | None]] = []
    lock = threading.Lock()
    x = np.random.default_rng(1).random((4, 1, 28, 28))

    def client_loop(min_requests: int) -> int:
        n = 0
        with httpx.Client(base_url=served.url, timeout=60) as own:
            while not done.is_set() or n < min_requests:
                r = post_binary(own, "digits", x)
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                with lock:
                    results.append((r.status_code, body.get("path"), body.get("fallback")))
                n += 1
        return n

    switches = []
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client_loop, 10) for _ in range(8)]
        time.sleep(0.5)
        for i in range(6):
            switches.append(route(c, best if i % 2 == 0 else local)["path"])
            time.sleep(0.4)
        done.set()
        counts = [f.result() for f in futures]
    statuses = [s for s, _, _ in results]
    print(f"\n{len(results)} requests from 8 clients ({counts}), {len(switches)} switches")
    assert statuses.count(200) == len(results), {s for s in statuses if s != 200}
    assert {p for _, p, _ in results} == {local, best}
    assert not any(f for _, _, f in results)


def test_serve_config_file_is_deployable(served, trained_cfg, tiny_config_path, tmp_path):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from coderay.routing import initial_routes
    from deployments.app import app_builder, write_serve_config

    # the config file as searched (the fixture serves it with CPU caps on: another search key)
    out = write_serve_config(trained_cfg, tiny_config_path, tmp_path / "serve-config.yaml", port=8123)
    doc = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    assert app["import_path"] == "deployments.app:app_builder"
    assert app["runtime_env"]["working_dir"].startswith("local:///")
    assert app["deployments"][0]["user_config"]["routes"] == initial_routes(served.cfg, served.table.rows)
    assert doc["http_options"]["port"] == 8123
    assert isinstance(app_builder(app["args"]), Application)


def test_deploy_to_a_missing_node_fails_fast(served):
    from coderay.config import CoderayConfig
    from deployments.app import deploy

    raw = served.cfg.model_dump()
    raw["nodes"].append({"name": "edge-z", "cpus": 1})
    raw["services"][0]["node"] = "edge-z"
    start = time.perf_counter()
    with pytest.raises(ValueError, match="edge-z"):
        deploy(CoderayConfig.model_validate(raw), served.table, port=0)
    raw = served.cfg.model_dump()
    raw["nodes"][0]["cpus"] = 4
    with pytest.raises(ValueError, match="offers 1 CPUs"):
        deploy(CoderayConfig.model_validate(raw), served.table, port=0)
    assert time.perf_counter() - start < 10
    assert served.client.get("/healthz").status_code == 200  # the running app is untouched


def test_capped_replicas_get_their_nodes_share(served, keep_busy):
    """Kept busy (calls straight to its handle, so HTTP is not the limit), the local node's block group uses
    its node's CPU quota: CPU seconds of the node's group over wall time within ±20% of the share."""
    from coderay.emulation import node_capacity

    cap = node_capacity(served.cfg)["edge-a"]
    if not cap.capped:
        pytest.skip(f"no CPU caps on this machine: {cap.mechanism}")

    def digits_cpu() -> tuple[float, dict]:
        info = served.client.get("/v1/debug/replicas").json()
        blocks = next(r for r in info["replicas"] if r["deployment"] == "blocks-digits")
        return blocks["capacity"]["cpu_s"], blocks["capacity"]

    with keep_busy("digits", "edge-a", 256):
        time.sleep(1.5)  # warm: the replica's queue is full
        cpu0, info = digits_cpu()
        t0 = time.perf_counter()
        time.sleep(4.0)
        cpu1, _ = digits_cpu()
        wall = time.perf_counter() - t0
    used = (cpu1 - cpu0) / wall
    print(f"\nedge-a: {used:.3f} CPU used of a {cap.share:.3f} CPU quota ({info['mechanism']})")
    assert info["mechanism"] == cap.mechanism and info["share"] == pytest.approx(cap.share)
    assert used == pytest.approx(cap.share, rel=0.2)


def test_a_lost_host_node_falls_back_to_the_local_path(served):
    """Last: removes edge-b. A request accepted on the cooperative path is still answered, locally."""
    c = served.client
    route(c, served.coop)
    served.cluster.remove("edge-b")
    x = np.full((2, 1, 28, 28), 0.5)
    for _ in range(3):  # a request racing the node's death may still finish on the cooperative path
        start = time.perf_counter()
        r = post_binary(c, "digits", x)
        assert r.status_code == 200, r.text
        if r.json()["fallback"]:
            break
    assert r.json()["path"] == "digits:local"
    assert time.perf_counter() - start < served.cfg.serving.request_timeout_s + 10
    start = time.perf_counter()  # the failed path is now skipped for a while: no second timeout
    again = post_binary(c, "digits", x)
    assert (again.status_code, again.json()["fallback"]) == (200, True)
    assert time.perf_counter() - start < 2
    suspended = {s["name"]: s for s in c.get("/v1/services").json()}["digits"]["stats"]["suspended_paths"]
    assert served.coop in suspended
    lost = post_binary(c, "mnist", x)  # the host's own service has no other path
    assert lost.status_code in (503, 504) and "mnist" in lost.json()["error"]
