"""API keys over real HTTP (serving.auth): 401 without or with an unknown key, 403 for a key not allowed, the
operator alone changes routes and reads the debug views, a client only the services it is admitted to; no
response ever carries a key."""

import time

import httpx
import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.timeout(300)

OPERATOR, DIGITS, MNIST, ALICE = "op-" + "o" * 24, "digits-" + "d" * 24, "mnist-" + "m" * 24, "alice-" + "a" * 24


@pytest.fixture(scope="module")
def served(trained_cfg, tmp_path_factory):
    import ray
    from ray import serve

    from coderay.cluster import LocalCluster
    from coderay.config import AuthSpec
    from coderay.table import RewardTable
    from deployments.app import deploy, free_port

    keys = tmp_path_factory.mktemp("auth") / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "operator": [OPERATOR],
                "providers": {"digits": [DIGITS], "mnist": [MNIST]},
                "clients": {"alice": {"keys": [ALICE], "services": ["digits"]}},
            }
        )
    )
    serving = trained_cfg.serving.model_copy(update={"auth": AuthSpec(enabled=True, keys_file=str(keys))})
    cfg = trained_cfg.model_copy(update={"serving": serving})
    if ray.is_initialized():
        ray.shutdown()
    cluster = LocalCluster(cfg)
    try:
        url = deploy(cfg, RewardTable([]), port=free_port())
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        serve.shutdown()
        cluster.shutdown()


def _infer(c: httpx.Client, svc: str, key: str | None, how: str = "bearer") -> httpx.Response:
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    headers = {"Content-Type": "application/octet-stream", "X-Shape": "1,1,28,28"}
    if key is not None:
        headers |= {"Authorization": f"Bearer {key}"} if how == "bearer" else {"X-API-Key": key}
    return c.post(f"/v1/services/{svc}/infer", content=x.tobytes(), headers=headers)


def test_infer_needs_a_key_of_the_service(served):
    c = served
    missing, unknown = _infer(c, "digits", None), _infer(c, "digits", "x" * 30)
    assert missing.status_code == 401 and "API key is required" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert unknown.status_code == 401 and unknown.json()["error"] == "unknown API key"
    assert _infer(c, "digits", DIGITS).status_code == 200
    assert _infer(c, "digits", ALICE, how="header").status_code == 200  # a client digits admits
    assert _infer(c, "digits", OPERATOR).status_code == 200
    other = _infer(c, "mnist", DIGITS)
    assert other.status_code == 403 and "may not infer on 'mnist'" in other.json()["error"]
    assert _infer(c, "mnist", ALICE).status_code == 403 and _infer(c, "mnist", MNIST).status_code == 200


def test_only_the_operator_changes_routes_and_reads_debug_views(served):
    c = served
    pin = {"path": "digits:local"}
    for key in (None, DIGITS, ALICE):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        expected = 401 if key is None else 403
        assert c.put("/v1/services/digits/route", json=pin, headers=headers).status_code == expected
        assert c.delete("/v1/services/digits/route", headers=headers).status_code == expected
        assert c.get("/v1/debug/replicas", headers=headers).status_code == expected
        assert c.get("/v1/controller", headers=headers).status_code == expected
    op = {"Authorization": f"Bearer {OPERATOR}"}
    assert c.put("/v1/services/digits/route", json=pin, headers=op).status_code == 200
    assert c.delete("/v1/services/digits/route", headers=op).status_code == 200
    assert c.get("/v1/debug/replicas", headers=op).status_code == 200


def test_reads_need_any_key_and_health_none(served):
    c = served
    assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200
    assert c.get("/v1/services").status_code == 401
    assert c.get("/v1/services", headers={"X-API-Key": ALICE}).status_code == 200
    assert c.get("/v1/services/digits/route", headers={"X-API-Key": MNIST}).status_code == 200


def test_no_response_carries_a_key(served):
    c = served
    seen = []
    for key in (OPERATOR, DIGITS, "wrong-" + "w" * 30):
        headers = {"Authorization": f"Bearer {key}"}
        for r in (
            c.get("/v1/services", headers=headers),
            c.get("/v1/debug/replicas", headers=headers),
            _infer(c, "mnist", key),
            c.get("/healthz"),
        ):
            seen.append(r.text + str(dict(r.headers)))
    time.sleep(0.1)
    assert not any(k in text for text in seen for k in (OPERATOR, DIGITS, MNIST, ALICE, "w" * 30))
