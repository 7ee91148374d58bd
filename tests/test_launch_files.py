"""The launch files keep every provider's model on its own server: cluster.yaml and cluster-cloud.yaml are valid
`ray up` files that copy only code, give every node its own store and token auth; k8s/rayservice.yaml is the
generator's output, with a worker group per coderay node and the Serve config coderay writes. No cluster needed."""

import copy
import fnmatch
import json
import os
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml
from ray._private.authentication.authentication_token_setup import _get_default_token_path
from ray.autoscaler._private.util import prepare_config, validate_config

from coderay.config import load_config
from deployments.app import serve_config_doc, write_serve_config
from deployments.manifests import NODE_LABEL, cluster_node_types, pod_config, rayservice, rayservice_manifest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
CLUSTER_FILES = ["cluster.yaml", "cluster-cloud.yaml"]
IN_IMAGE = "/app/configs/demo.yaml"
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def demo():
    return load_config(DEMO)


@pytest.fixture(scope="module")
def manifest():
    return yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())


def _cluster(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _rsync_excluded(path: str, patterns: list[str]) -> bool:
    """Whether `rsync --exclude PATTERN ...` (Ray's rsync_exclude) leaves the file `path` out: a pattern with no
    inner '/' matches any one component of the path by name (with a trailing '/', directories only), and an
    excluded directory takes everything under it."""
    parts = PurePosixPath(path).parts
    for i, part in enumerate(parts):
        is_dir = i < len(parts) - 1
        for pattern in patterns:
            if (is_dir or not pattern.endswith("/")) and fnmatch.fnmatchcase(part, pattern.rstrip("/")):
                return True
    return False


def _start_env(command: str) -> dict[str, str]:
    """The environment a `ray start` command line sets for itself (its leading NAME=value words)."""
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w.endswith("/ray") and words[i + 1] == "start")
    assert all("=" in w for w in words[:start]), f"words before `ray start` that are no assignment: {command}"
    return dict(w.split("=", 1) for w in words[:start])


def _ray_starts(config: dict) -> list[str]:
    starts = {
        key: [c for c in config[key] if " start " in c]
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
    }
    assert all(len(cmds) == 1 for cmds in starts.values()), starts
    return [cmds[0] for cmds in starts.values()]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_files_validate_against_rays_schema(name):
    config = _cluster(name)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` validates: defaults filled in
    validate_config(prepared)
    assert prepared["rsync_exclude"] == config["rsync_exclude"]
    assert config["provider"]["type"] == {"cluster.yaml": "local", "cluster-cloud.yaml": "aws"}[name]


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_file_mounts_carry_the_code_and_token_never_a_store(name):
    config = _cluster(name)
    mounts = config["file_mounts"]
    token_source = {os.path.expanduser(v) for v in mounts.values()} - {"."}
    assert set(mounts.values()) - {"."} and token_source == {str(_get_default_token_path())}, mounts
    excludes = config["rsync_exclude"]
    assert all("/" not in p.rstrip("/") and "**" not in p for p in excludes), "the check below reads simple names"
    code = [
        "pyproject.toml",
        "README.md",
        "configs/demo.yaml",
        *(
            p.relative_to(ROOT).as_posix()
            for d in ("coderay", "deployments", "tuning")
            for p in (ROOT / d).glob("*.py")
        ),
    ]
    kept_out = [
        ".coderay/demo/stores/edge-big/mnist/model.pt",
        "coderay-store/digits/profile.json",
        "work/stores/edge-small/links.json",
        "tests/fixtures/a.pt",
        "bench/model.pth",
        ".git/config",
        ".venv/bin/python",
        "coderay/__pycache__/config.cpython-311.pyc",
    ]
    for cfg_file in (ROOT / "configs").glob("*.yaml"):
        workdir = Path(yaml.safe_load(cfg_file.read_text()).get("workdir", ".coderay"))
        if not workdir.is_absolute():  # every config's workdir (table, stores) stays here
            kept_out.append((workdir / "search" / "table.json").as_posix())
    assert [p for p in code if _rsync_excluded(p, excludes)] == []
    assert [p for p in kept_out if not _rsync_excluded(p, excludes)] == []


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_ray_start_has_its_own_store_token_auth_and_serve_env(name):
    config = _cluster(name)
    mounts = config["file_mounts"]
    code_target = next(k for k, v in mounts.items() if v == ".")
    for command in _ray_starts(config):
        env = _start_env(command)
        assert env["RAY_AUTH_MODE"] == "token", command
        assert os.path.expanduser(mounts[env["RAY_AUTH_TOKEN_PATH"]]) == str(_get_default_token_path()), command
        assert env["CODERAY_STORE"] == "~/coderay-store", command
        assert not env["CODERAY_STORE"].startswith(code_target.rstrip("/") + "/"), "the store inside the code copy"
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, command


def test_local_workers_announce_their_node_from_their_own_file():
    worker = _ray_starts(_cluster("cluster.yaml"))[1]
    assert '--resources="$(cat ~/coderay-node.json)"' in worker


def test_cloud_node_types_are_one_server_per_coderay_node(demo):
    config = _cluster("cluster-cloud.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {
        k: {f: v[f] for f in ("min_workers", "max_workers", "resources")}
        for k, v in types.items()
        if k != config["head_node_type"]
    }
    assert workers == cluster_node_types(demo)
    for node in demo.nodes:
        assert [k for k, v in types.items() if node.name in v["resources"]] == [node.name]
        assert workers[node.name]["resources"] == {"CPU": node.cpus, node.name: 1}
    assert head["resources"].get("head") == 1
    assert sum(w["min_workers"] for w in workers.values()) <= config["max_workers"]


def test_manifest_has_one_worker_group_per_coderay_node(demo, manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert list(groups) == [n.name for n in demo.nodes]
    for name, group in groups.items():
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
        # KubeRay hands the value to a shell: once unquoted it must be the node's resource as JSON
        assert json.loads(shlex.split(group["rayStartParams"]["resources"])[0]) == {name: 1}
        assert group["template"]["spec"]["nodeSelector"] == {NODE_LABEL: name}
    assert json.loads(shlex.split(cluster["headGroupSpec"]["rayStartParams"]["resources"])[0]) == {"head": 1}


def test_every_pod_has_token_auth_and_a_store_of_its_own(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    auth = cluster["authOptions"]
    assert auth["mode"] == "token"
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        spec = pod["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}
        assert {k: env[k]["value"] for k in SERVE_ENV} == SERVE_ENV
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        store = env["CODERAY_STORE"]["value"]
        assert volumes[mounts[store]] == {"name": mounts[store], "emptyDir": {}}, "the store is the pod's own volume"


def test_serve_config_v2_is_the_serve_config_coderay_writes(demo, manifest):
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert doc == serve_config_doc(pod_config(demo), IN_IMAGE, working_dir="/app")
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    assert app["args"] == {"config": IN_IMAGE, "workdir": "/app/.coderay/demo", "real_cluster": True}  # no emulation
    assert app["runtime_env"]["working_dir"] == "local:///app"
    assert doc["http_options"]["host"] == "0.0.0.0"  # a Kubernetes Service reaches the head pod's port


def test_serve_config_doc_is_what_write_serve_config_writes(demo, tmp_path):
    cfg = demo.model_copy(update={"workdir": str(tmp_path / "work")})
    out = write_serve_config(cfg, DEMO, tmp_path / "serve-config.yaml", port=8123)
    assert yaml.safe_load(out.read_text()) == serve_config_doc(cfg, DEMO, port=8123)
    moved = serve_config_doc(cfg, IN_IMAGE, workdir="/srv/work", working_dir="s3://bucket/coderay.zip")
    assert moved["applications"][0]["args"] == {"config": IN_IMAGE, "workdir": "/srv/work"}
    assert moved["applications"][0]["runtime_env"] == {"working_dir": "s3://bucket/coderay.zip"}


def test_committed_manifest_is_the_generators_output():
    assert (ROOT / "k8s" / "rayservice.yaml").read_text() == rayservice_manifest(DEMO), (
        "k8s/rayservice.yaml is stale: run `python -m deployments.manifests`"
    )


def test_a_node_name_kubernetes_cannot_take_fails_with_its_name(demo):
    raw = demo.model_dump()
    raw["nodes"][0]["name"] = "edge_small"
    raw["services"][0]["node"] = "edge_small"
    raw["network"]["links"] = []
    with pytest.raises(ValueError, match="edge_small"):
        rayservice(type(demo).model_validate(raw), IN_IMAGE)
