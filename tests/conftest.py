"""Shared fixtures: a tiny two-node config on the bundled data, trained and searched once per session."""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine are far slower than one

TINY_YAML = """
name: tiny
seed: 0
workdir: {workdir}
nodes:
  - {{name: edge-a, cpus: 1, speed: 1.0}}
  - {{name: edge-b, cpus: 1, speed: 2.0}}
network: {{bandwidth_mbps: 100, rtt_ms: 1, encoding: float16}}
services:
  - name: digits
    arch: small_cnn
    arch_kwargs: {{widths: [8, 16, 32, 32]}}
    task: digits
    node: edge-a
    blocks: 5
    batch_size: 16
    train: {{epochs: 3, lr: 0.005, batch_size: 64}}
  - name: mnist
    arch: small_cnn
    arch_kwargs: {{widths: [8, 16, 32, 32]}}
    task: mnist5k
    node: edge-b
    blocks: 5
    guest_quota: 8
    batch_size: 16
    train: {{epochs: 1, lr: 0.005, batch_size: 64}}
search:
  locals: [digits]
  lout: [0]
  hin: [1]
  top_k: 2
  predict_samples: 256
  link_epochs: 1
reward: {{alpha: 8, beta: 1}}
# call_overhead_ms 0: the tiny models run in microseconds, and a replica call's 12 ms would make every path a tie
# (the controller tests need cooperation to pay at idle); test_core checks the model's charge of it
serving: {{port: 0, max_batch_size: 16, request_timeout_s: 20, call_overhead_ms: 0}}
emulation: {{cpu_caps: false}}   # the search and Tune tests run uncapped (faster); serving tests turn caps on
"""


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`), as in a Ray
    worker: with two OpenMP threads on a busy 2-core machine every parallel region waits for a time slice and a
    MobileNet forward takes seconds instead of milliseconds. The count before is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    path = root / "tiny.yaml"
    path.write_text(TINY_YAML.format(workdir=root / "work"))
    return path


@pytest.fixture(scope="session")
def tiny_cfg(tiny_config_path):
    from coderay.config import load_config

    return load_config(tiny_config_path)


@pytest.fixture(scope="session")
def trained_cfg(tiny_cfg):
    """The tiny config with every service trained (cached on disk for the session)."""
    from coderay.train import train_all

    train_all(tiny_cfg, progress=False)
    return tiny_cfg


@pytest.fixture(scope="session")
def search_ctx(trained_cfg):
    from coderay.candidate import SearchContext

    return SearchContext.load(trained_cfg, progress=False, train_missing=False)


@pytest.fixture(scope="session")
def searched_table(trained_cfg):
    """The in-process staged search on the tiny config: reward table and trained links on disk."""
    from coderay.search import run_search

    return run_search(trained_cfg, progress=False)


@pytest.fixture(scope="session")
def keep_busy():
    """`with keep_busy(service, node, samples):` keeps the service's block group computing whole batches (four
    callers sending `samples` inputs to all its blocks back to back, straight to its Serve handle, so HTTP is
    not the limit) until the block exits, then waits for the callers."""
    import contextlib
    import threading
    from concurrent.futures import ThreadPoolExecutor

    @contextlib.contextmanager
    def busy(service: str, node: str, samples: int, callers: int = 4):
        from ray import serve

        from coderay.plan import TO_END, Hop
        from deployments.app import APP_NAME
        from deployments.routing import Activation

        handle = serve.get_deployment_handle(f"blocks-{service}", APP_NAME).options(method_name="run")
        x = Activation(torch.rand(samples, 1, 28, 28), node)
        done = threading.Event()

        def call(_):
            while not done.is_set():
                handle.remote(x, (Hop("blocks", service, 1, TO_END),)).result(timeout_s=60)

        with ThreadPoolExecutor(callers) as pool:
            futures = [pool.submit(call, i) for i in range(callers)]
            try:
                yield
            finally:
                done.set()
                for f in futures:
                    f.result()

    return busy
