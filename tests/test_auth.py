"""API keys (coderay.auth): who may infer, read and operate; keys kept as digests only; clear config errors."""

import pytest
import yaml

from coderay.auth import Denied, KeyRing, load_keyring, provider_env
from coderay.config import AuthSpec, CoderayConfig
from coderay.errors import ConfigError

OPERATOR, DIGITS, MNIST, ALICE = "op-" + "o" * 20, "digits-" + "d" * 20, "mnist-" + "m" * 20, "alice-" + "a" * 20


@pytest.fixture
def cfg(tiny_cfg, tmp_path) -> CoderayConfig:
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "operator": [OPERATOR],
                "providers": {"digits": [DIGITS]},
                "clients": {"alice": {"keys": [ALICE], "services": ["digits"]}},
            }
        )
    )
    serving = tiny_cfg.serving.model_copy(update={"auth": AuthSpec(enabled=True, keys_file=str(keys))})
    return tiny_cfg.model_copy(update={"serving": serving})


def _status(ring: KeyRing, key, action, service=None) -> int:
    try:
        ring.check(key, action, service)
        return 200
    except Denied as e:
        return e.status


def test_who_may_do_what(cfg):
    ring = load_keyring(cfg, environ={provider_env("mnist"): MNIST})
    assert _status(ring, OPERATOR, "operate") == 200 and _status(ring, OPERATOR, "infer", "mnist") == 200
    assert _status(ring, DIGITS, "infer", "digits") == 200 and _status(ring, DIGITS, "infer", "mnist") == 403
    assert _status(ring, MNIST, "infer", "mnist") == 200 and _status(ring, MNIST, "operate") == 403
    assert _status(ring, ALICE, "infer", "digits") == 200 and _status(ring, ALICE, "infer", "mnist") == 403
    assert _status(ring, ALICE, "read") == 200 and _status(ring, ALICE, "operate") == 403
    assert _status(ring, None, "read") == 401 and _status(ring, "", "infer", "digits") == 401
    assert _status(ring, DIGITS + "x", "infer", "digits") == 401  # a key that only starts like one


def test_only_digests_leave_the_loader(cfg):
    ring = load_keyring(cfg, environ={})
    shipped = repr(ring) + repr(ring.as_args())
    assert all(k not in shipped for k in (OPERATOR, DIGITS, ALICE))
    again = KeyRing.from_args(ring.as_args())
    assert _status(again, ALICE, "infer", "digits") == 200 and _status(again, ALICE, "operate") == 403
    with pytest.raises(Denied) as denied:
        ring.check(DIGITS, "operate")
    assert DIGITS not in denied.value.reason


def test_off_lets_everything_through(tiny_cfg):
    ring = load_keyring(tiny_cfg, environ={})
    assert not ring.enabled and ring.check(None, "operate") is None


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"providers": {"digits": [DIGITS]}}, "no operator key"),
        ({"operator": ["short"]}, "at least 16 characters"),
        ({"operator": [OPERATOR], "providers": {"nope": [DIGITS]}}, "providers.nope: no such service"),
        ({"operator": [OPERATOR], "clients": {"bob": {"keys": [ALICE], "services": ["x"]}}}, "clients.bob.services"),
        ({"operator": [OPERATOR], "extra": 1}, "expected a mapping"),
    ],
)
def test_bad_keys_file_names_the_field(cfg, tmp_path, keys, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(keys))
    bad = cfg.model_copy(
        update={
            "serving": cfg.serving.model_copy(
                update={"auth": cfg.serving.auth.model_copy(update={"keys_file": str(path)})}
            )
        }
    )
    with pytest.raises(ConfigError, match=message):
        load_keyring(bad, environ={})


def test_operator_key_from_the_environment(cfg):
    no_file = cfg.model_copy(
        update={
            "serving": cfg.serving.model_copy(update={"auth": cfg.serving.auth.model_copy(update={"keys_file": None})})
        }
    )
    ring = load_keyring(no_file, environ={"CODERAY_OPERATOR_KEY": OPERATOR})
    assert _status(ring, OPERATOR, "operate") == 200 and _status(ring, DIGITS, "read") == 401
