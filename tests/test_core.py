"""CoDE core: links, paths, throughput, reward, training a path, the staged search."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from coderay.blocks import split_model
from coderay.candidate import build_path, candidates, predict_path, train_path
from coderay.cli import main
from coderay.config import NetworkSpec, RewardSpec
from coderay.links import Link, link_kind, load_links
from coderay.models import get_model, list_models
from coderay.paths import PathModule, enumerate_paths, path_budget
from coderay.pathspec import PathSpec
from coderay.reward import ACCURACY_FUNCTIONS, THROUGHPUT_FUNCTIONS, average_accuracy, reward
from coderay.search import spearman
from coderay.store import node_store
from coderay.throughput import PathCosts, path_throughput
from coderay.train import evaluate

SMALL = {"alexnet": {"hidden": 64}, "mobilenet_v2": {"width_mult": 0.35}}


def _boundaries(arch):
    model = get_model(arch, num_classes=10, input_shape=(1, 28, 28), **SMALL.get(arch, {})).eval()
    blocks = split_model(model, blocks=4)
    x, shapes = torch.zeros(1, 1, 28, 28), [(1, 28, 28)]
    with torch.no_grad():
        for b in blocks:
            x = b(x)
            shapes.append(tuple(x.shape[1:]))
    return shapes


@pytest.fixture(scope="module")
def arch_boundaries():
    return {a: _boundaries(a) for a in list_models()}


def test_links_match_shapes_for_every_architecture_pair(arch_boundaries):
    for a, b in itertools.product(arch_boundaries, repeat=2):
        for src, dst in itertools.product(arch_boundaries[a][1:], arch_boundaries[b][:-1]):
            if len(src) == 1 and len(dst) == 3:
                with pytest.raises(ValueError, match="no link"):
                    link_kind(src, dst)
                continue
            link = Link(src, dst, relu=True).eval()
            with torch.no_grad():
                out = link(torch.randn(2, *src))
            assert tuple(out.shape[1:]) == tuple(dst), (a, b, src, dst)
            assert link.num_params < 10 * (src[0] * dst[0] + 1) * 4 + 4 * src[0] * 4


def test_least_squares_init_recovers_a_linear_map():
    torch.manual_seed(0)
    src = torch.randn(64, 6, 5, 5)
    true = torch.nn.Conv2d(6, 4, 1)
    with torch.no_grad():
        dst = true(src)
    link = Link((6, 5, 5), (4, 5, 5), relu=False)
    assert link.init_lstsq(src, dst, ridge=1e-8) < 1e-3
    flat = Link((6, 5, 5), (3,), relu=False)
    pooled = torch.nn.functional.adaptive_avg_pool2d(src, 2).flatten(1)  # (64, 24)
    assert flat.init_lstsq(src, pooled @ torch.randn(24, 3), ridge=1e-8) < 1e-3


def test_enumeration_counts_on_a_small_case():
    bounds = {"loc": [(1, 8, 8), (4, 8, 8), (4, 4, 4), (10,)], "host": [(1, 8, 8), (4, 8, 8), (5,)]}
    paths = enumerate_paths("loc", bounds)
    kinds = [p.kind for p in paths]
    # coop: host exit must be conv (hout=1, so hin=1); (lout, lin) pairs 3 + 2 + 1; skip: (0,2), (0,3), (1,3)
    assert kinds.count("local") == 1 and kinds.count("skip") == 3 and kinds.count("coop") == 6
    assert len(set(p.id for p in paths)) == len(paths)
    for p in paths:
        assert PathSpec.parse(p.id) == p
        p.validate(3, 2 if p.host else None)
    assert [p.kind for p in enumerate_paths("loc", bounds, lout=[0], hin=[1], include_skip=False)].count("coop") == 3
    with pytest.raises(ValueError, match="not a path id"):
        PathSpec.parse("loc:host:1:2")


def test_path_budget_counts_skipped_and_added():
    spec = PathSpec("l", lout=1, lin=4, host="h", hin=2, hout=3)
    assert path_budget(spec, [1, 10, 100, 1000], [5, 50, 500], 7) == {
        "link_params": 7,
        "local_skipped_params": 110,
        "host_added_params": 550,
    }


def test_throughput_model():
    base = PathCosts(
        local_full=0.01,
        local_part=0.002,
        host_full=0.004,
        host_part=0.003,
        batch=32,
        guest_quota=0,
        bytes_out=100,
        bytes_back=100,
    )
    none = path_throughput(base, kind="coop", local_node="a", host_node="b")
    assert none.host == 0 and math.isclose(none.total, 100) and math.isclose(none.ratio, 1)
    th = [
        path_throughput(PathCosts(**{**base.__dict__, "guest_quota": s}), kind="coop", local_node="a", host_node="b")
        for s in (4, 8, 16)
    ]
    assert th[0].host < th[1].host < th[2].host
    assert all(t.host_own_after < t.host_own_before for t in th)
    # Th^l: the local node's time left after the offloaded samples' head and tail
    t = th[1]
    assert math.isclose(t.local, (1 - t.host * 0.002) / 0.01)
    slow = path_throughput(
        PathCosts(**{**base.__dict__, "guest_quota": 16}),
        kind="coop",
        network=NetworkSpec(bandwidth_mbps=0.01),
        local_node="a",
        host_node="b",
    )
    assert slow.bottleneck == "network" and slow.host < th[2].host
    skip = path_throughput(PathCosts(0.01, 0.005), kind="skip")
    assert skip.local == 0 and math.isclose(skip.host, 200)


def test_reward_is_monotone_in_accuracy_and_throughput():
    accs, ratios = [0.5, 0.8, 0.9, 0.99], [0.5, 1.0, 1.4, 3.0]
    for acc_fn, th_fn in itertools.product(ACCURACY_FUNCTIONS, THROUGHPUT_FUNCTIONS):
        spec = RewardSpec(accuracy=acc_fn, throughput=th_fn, alpha=4, beta=1)
        for r in ratios:
            vals = [reward(spec, a, r) for a in accs]
            assert vals == sorted(vals), (acc_fn, th_fn)
        for a in accs:
            vals = [reward(spec, a, r) for r in ratios]
            assert vals == sorted(vals), (acc_fn, th_fn)
    floor = RewardSpec(accuracy_floor=0.02)
    assert reward(floor, 0.95, 2.0, acc_local=0.98) == 0
    assert reward(floor, 0.97, 2.0, acc_local=0.98) > 0
    assert average_accuracy(0.9, 0.8, th_local=100, th_host=100) == pytest.approx(0.85)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1)


def _state(services):
    return {name: {k: v.clone() for k, v in s.model.state_dict().items()} for name, s in services.items()}


def test_training_a_path_trains_only_links_and_beats_untrained(search_ctx):
    spec = PathSpec("digits", lout=0, lin=4, host="mnist", hin=1, hout=3)
    local, host = search_ctx.services["digits"], search_ctx.services["mnist"]
    before = _state(search_ctx.services)
    torch.manual_seed(0)  # random links: what the least-squares start and training must beat
    links = {
        "in": Link(local.boundaries[0], host.boundaries[0], relu=False),
        "out": Link(host.boundaries[3], local.boundaries[3], relu=True),
    }
    untrained = evaluate(PathModule(spec, local.blocks, host.blocks, links), local.task.val)
    seen = []
    row, module = train_path(search_ctx, spec, epochs=5, progress=False, on_epoch=lambda e, loss, acc: seen.append(acc))
    assert row["val_acc"] > untrained + 0.3
    assert len(seen) == 5 and row["trained"]
    after = _state(search_ctx.services)
    for name in before:  # every frozen block bit-identical
        for k in before[name]:
            assert torch.equal(before[name][k], after[name][k]), (name, k)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("links.") for n in trainable)


def test_predicted_path_is_better_than_chance_and_has_throughput(search_ctx):
    spec = PathSpec("digits", lout=0, lin=4, host="mnist", hin=1, hout=3)
    row = predict_path(search_ctx, spec)
    assert row["pred_acc"] > 0.5
    assert row["th_total"] > 0 and row["th_host"] > 0 and row["reward"] is None
    module, residuals = build_path(search_ctx, spec)
    assert set(residuals) == {"in", "out"}
    # link_in's target is the image resized to the host's input, which an affine map reproduces: fitted to ~0
    assert residuals["in"] < 1e-2
    # link_out's fit (host features → the local block's input) beats the best constant guess, its target's
    # per-channel mean, by a margin (a fit on mismatched pairs would only reach that guess)
    target = search_ctx.fit_activations("digits", spec.lin - 1)
    constant = float((target - target.mean((0, 2, 3), keepdim=True)).norm() / target.norm())
    assert residuals["out"] < 0.8 * constant, (residuals["out"], constant)
    assert len(candidates(search_ctx, "digits")) == len(
        enumerate_paths("digits", {n: s.boundaries for n, s in search_ctx.services.items()}, lout=[0], hin=[1])
    )


def test_the_model_charges_one_replica_call_per_stage_per_chain(search_ctx):
    """A path's hops on one node are one replica call (plan.stages); its fixed CPU cost, divided by the node's
    rate and shared by a chain of B samples, is added to each node's per-sample seconds."""
    import dataclasses

    from coderay.candidate import call_seconds, path_costs
    from coderay.emulation import node_rate

    spec = PathSpec("digits", lout=0, lin=4, host="mnist", hin=1, hout=3)
    module, _ = build_path(search_ctx, spec)
    cfg0 = search_ctx.cfg
    cfg12 = cfg0.model_copy(update={"serving": cfg0.serving.model_copy(update={"call_overhead_ms": 12.0})})
    free = path_costs(
        dataclasses.replace(
            search_ctx,
            cfg=cfg0.model_copy(update={"serving": cfg0.serving.model_copy(update={"call_overhead_ms": 0.0})}),
        ),
        module,
    )
    paid = path_costs(dataclasses.replace(search_ctx, cfg=cfg12), module)
    local, host = cfg12.service("digits").node, cfg12.service("mnist").node
    b = min(cfg12.service("digits").batch_size, cfg12.serving.max_batch_size)
    one_call = call_seconds(cfg12, local, "digits")
    assert one_call == pytest.approx(0.012 / node_rate(cfg12, local) / b)
    assert paid.local_full - free.local_full == pytest.approx(one_call)  # local-only: one call
    assert paid.local_part - free.local_part == pytest.approx(one_call)  # lout = 0: only the tail stage
    assert paid.host_full - free.host_full == pytest.approx(call_seconds(cfg12, host, "mnist"))


def test_staged_search_table(searched_table, search_ctx):
    table = searched_table
    rows = table.for_service("digits")
    trained = [r for r in rows if r["trained"]]
    assert len(trained) <= 0.3 * len(rows)
    assert table.meta["summary"]["digits"]["trained"] == len(trained)
    best = table.best("digits")
    assert best["reward"] == max(r["reward"] for r in rows if r["reward"] is not None)
    out = Path(table.meta["dir"])
    for name in ("table.json", "table.csv", "pareto.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "table.json").read_text())["rows"][0]["path_id"]
    # the trained links on disk reproduce the measured accuracy exactly
    coop = max((r for r in trained if r["kind"] == "coop"), key=lambda r: r["reward"])
    spec = PathSpec.parse(coop["path_id"])
    path_id, links = load_links(node_store(search_ctx.cfg, coop["host_node"]) / coop["links_file"])
    assert path_id == coop["path_id"]
    local, host = search_ctx.services["digits"], search_ctx.services[spec.host]
    module = PathModule(spec, local.blocks, host.blocks, links).eval()
    assert evaluate(module, local.task.test) == coop["test_acc"]
    # the edge-early baseline mirrors part of the local model on the host
    base = table.baselines("digits")
    assert base and all(r["mirrored_params"] > 0 for r in base)
    assert table.pareto("digits")


def test_cli_search_and_blocks(searched_table, tiny_config_path, capsys):
    assert main(["search", str(tiny_config_path), "--in-process", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["meta"]["from_cache"] and len(data["rows"]) == len(searched_table.rows)
    assert main(["search", str(tiny_config_path), "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "best path: " + searched_table.best("digits")["path_id"] in out
    assert main(["blocks", "alexnet", "--blocks", "6", "--json", "--batch-sizes", "1"]) == 0
    blocks = json.loads(capsys.readouterr().out)["blocks"]
    assert len(blocks) == 6
    assert all(a["out_shape"] == b["in_shape"] for a, b in zip(blocks, blocks[1:]))
    with pytest.raises(SystemExit):
        main(["blocks", "alexnet", "--input", "1x28"])
    assert "--input: expected CxHxW" in capsys.readouterr().err


def test_search_json_is_pure_json_on_stdout(searched_table, tiny_config_path):
    """`coderay search --json | python -m json.tool` works: progress and logs go to stderr, even when the
    search runs (not only when it is cached)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "coderay.cli", "search", str(tiny_config_path), "--in-process", "--json", "--force"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(run.stdout)
    assert not data["meta"]["from_cache"] and "stage 2 trains" in run.stderr
    assert [r["path_id"] for r in data["rows"]] == [r["path_id"] for r in searched_table.rows]


def test_wider_links_start_as_their_least_squares_fit():
    torch.manual_seed(0)
    src, dst = torch.randn(64, 6, 5, 5), torch.relu(torch.randn(64, 4, 5, 5))
    base = Link((6, 5, 5), (4, 5, 5), relu=True)
    r0 = base.init_lstsq(src, dst)
    for capacity in ("3x3", "bottleneck"):
        wide = Link((6, 5, 5), (4, 5, 5), relu=True, capacity=capacity)
        assert wide.init_lstsq(src, dst) == pytest.approx(r0, rel=1e-5)  # the residual branch starts at 0
        assert wide.num_params > base.num_params
    assert Link((6, 5, 5), (3,), relu=False, capacity="3x3").capacity == "1x1"  # flat targets stay linear


def test_stage2_keeps_the_best_link_variant(search_ctx, tmp_path):
    """Two variants (plain, and a bottleneck trained with feature matching): the row names the one of best
    validation accuracy, and the saved links rebuild exactly that path."""
    from dataclasses import replace

    from coderay.candidate import SearchContext
    from coderay.config import LinkVariant

    search = search_ctx.cfg.search.model_copy(
        update={"link_variants": [LinkVariant(), LinkVariant(capacity="bottleneck", distill=0.5)]}
    )
    ctx = SearchContext(search_ctx.cfg.model_copy(update={"search": search}), search_ctx.services)
    spec = PathSpec("digits", lout=0, lin=4, host="mnist", hin=1, hout=3)
    seen = []
    row, module = train_path(
        ctx, spec, epochs=1, progress=False, links_dir=tmp_path, on_epoch=lambda e, loss, acc: seen.append((e, acc))
    )
    assert [e for e, _ in seen] == [1, 2]  # epochs count across the variants
    assert row.link_variant == ("1x1" if seen[0][1] >= seen[1][1] else "bottleneck+distill0.5")
    assert row.val_acc == max(acc for _, acc in seen)
    _, links = load_links(row.links_file)
    local = search_ctx.services["digits"]
    rebuilt = PathModule(
        spec, local.blocks, search_ctx.services["mnist"].blocks, links, link_out=row.link_out_on, encoding=row.encoding
    ).eval()
    assert evaluate(rebuilt, local.task.test) == row.test_acc
    assert replace(row, link_variant=None) != row
