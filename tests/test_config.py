"""Config validation: the demo loads; every bad file names the file and the field."""

import os
import subprocess
import sys

import pytest

from coderay.cli import main
from coderay.config import DEFAULT_CONFIG, ConfigError, load_config


def test_demo_config_is_valid():
    cfg = load_config(DEFAULT_CONFIG)
    assert len(cfg.services) >= 3
    assert len({s.node for s in cfg.services}) >= 2
    assert len({n.speed for n in cfg.nodes}) >= 2  # heterogeneous capacity
    assert cfg.service("digits").task == "digits"


BASE = """
nodes: [{name: a, cpus: 1}]
services: [{name: s, arch: small_cnn, task: digits, node: a}]
"""


@pytest.mark.parametrize(
    "text, field, expected",
    [
        (
            "nodes: [{name: a, cpus: lots}]\nservices: [{name: s, arch: small_cnn, task: digits, node: a}]",
            "nodes[0].cpus",
            "number",
        ),
        (
            "nodes: [{name: a}]\nservices: [{name: s, arch: small_cnn, task: digits, node: b}]",
            "services[0].node",
            "expected one of ['a']",
        ),
        (
            "nodes: [{name: a}]\nservices: [{name: s, arch: vgg99, task: digits, node: a}]",
            "services[0].arch",
            "small_cnn",
        ),
        (
            "nodes: [{name: a}]\nservices: [{name: s, arch: small_cnn, task: cats, node: a}]",
            "services[0].task",
            "mnist5k",
        ),
        (
            "nodes: [{name: a}]\nservices: [{name: s, arch: small_cnn, task: digits, node: a, guest_quota: 40}]",
            "services[0]",
            "must not exceed batch_size",
        ),
        (
            "nodes: [{name: a}]\nservices: [{name: s, arch: small_cnn, task: digits, node: a, colour: red}]",
            "services[0].colour",
            "Extra inputs",
        ),
        (
            "nodes: [{name: a}, {name: a}]\nservices: [{name: s, arch: small_cnn, task: digits, node: a}]",
            "nodes[1].name",
            "duplicate",
        ),
        (
            "nodes: [{name: a}]\nservices: [{name: s, arch: small_cnn, task: digits, node: a}]\nsearch: {top_k: 0}",
            "search.top_k",
            "greater than or equal to 1",
        ),
        (
            "nodes: [{name: a}]\nservices: [{name: s, arch: small_cnn, task: digits, node: a}]\n"
            "reward: {accuracy: cubic}",
            "reward.accuracy",
            "power",
        ),
        ("services: [{name: s, arch: small_cnn, task: digits, node: a}]", "nodes", "Field required"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, text, field, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert field in msg
    assert expected in msg


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("nodes: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE.replace("node: a", "node: z"))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "services[0].node" in err and "Traceback" not in err


def test_fingerprint_is_stable_and_sensitive():
    """The key of every on-disk cache: the same in another process (another hash seed, the config read back
    from JSON), and another as soon as a field that changes what is cached does."""
    cfg = load_config(DEFAULT_CONFIG)
    svc = cfg.services[0]
    here = cfg.fingerprint(svc, cfg.seed)
    code = (
        "import sys; from coderay.config import CoderayConfig; "
        "c = CoderayConfig.model_validate_json(sys.stdin.read()); print(c.fingerprint(c.services[0], c.seed))"
    )
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    there = subprocess.run(
        [sys.executable, "-c", code],
        input=cfg.model_dump_json(),
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONHASHSEED": seed},
        timeout=60,
        check=True,
    ).stdout.strip()
    assert there == here
    for update in (
        {"task": "digits-parity"},
        {"arch_kwargs": {**svc.arch_kwargs, "widths": [4, 8, 16, 16]}},
        {"train": svc.train.model_copy(update={"epochs": svc.train.epochs + 1})},
    ):
        assert cfg.fingerprint(svc.model_copy(update=update), cfg.seed) != here, update
    assert cfg.fingerprint(svc, cfg.seed + 1) != here
