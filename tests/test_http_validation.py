"""The serving logic that needs no Ray: input decoding and validation, path plans, routing, batching, placement."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from coderay.config import CoderayConfig
from coderay.errors import CoderayError
from coderay.pathspec import PathSpec
from coderay.plan import TO_END, Hop, plan_hops, stages
from coderay.routing import Router, initial_routes, link_files
from deployments.blocks import Chunk, batch_samples, run_grouped
from deployments.merging import Merger
from deployments.placement import cpu_shares
from deployments.routing import Activation, hop_delay_s
from deployments.schemas import (
    ApiError,
    check_top_k,
    decode_binary,
    decode_images,
    decode_json_body,
    infer_openapi_body,
    to_batch,
)

SHAPE = (1, 28, 28)
BEST = "digits:mnist:0:1:2:3"
ROWS = [
    {"path_id": "digits:local", "local": "digits", "kind": "local", "reward": 0.60, "links_file": None},
    {"path_id": BEST, "local": "digits", "kind": "coop", "reward": 0.64, "links_file": "/x/best.pt"},
    {"path_id": "digits:mnist:0:1:1:2", "local": "digits", "kind": "coop", "reward": 0.62, "links_file": "/x/b.pt"},
    {"path_id": "digits:mnist:0:1:3:4", "local": "digits", "kind": "coop", "reward": None, "links_file": None},
    {"path_id": "digits:skip:0:3", "local": "digits", "kind": "skip", "reward": 0.5, "links_file": "/x/skip.pt"},
    {
        "path_id": "digits:edge-early:mnist:2:1",
        "local": "digits",
        "kind": "edge-early",
        "reward": 0.9,
        "links_file": None,
    },
]


def png(h: int = 28, w: int = 28, mode: str = "L", fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w), 128, np.uint8)).convert(mode).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def error_of(fn, *args, **kwargs) -> ApiError:
    """The HTTP error `fn` ends in: an ApiError, or a coderay domain error as the ingress maps it."""
    with pytest.raises((ApiError, CoderayError)) as info:
        fn(*args, **kwargs)
    return info.value if isinstance(info.value, ApiError) else ApiError.of(info.value)


# --------------------------------------------------------------------------- decoding


def test_json_inputs_accept_bchw_and_bhw():
    x = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    for body in (x.tolist(), x[:, 0].tolist()):
        out, k = decode_json_body(f'{{"inputs": {body}, "top_k": 2}}'.encode(), SHAPE, max_samples=8)
        assert out.shape == (3, 1, 28, 28) and out.dtype == torch.float32 and k == 2
        assert torch.equal(out, torch.from_numpy(x))


def test_binary_body_round_trips_exactly():
    x = np.random.default_rng(1).random((5, 1, 28, 28)).astype("<f4")
    out = decode_binary(x.tobytes(), {"x-shape": "5,1,28,28"}, SHAPE, max_samples=8)
    assert torch.equal(out, torch.from_numpy(x))
    assert decode_binary(x.tobytes(), {"x-shape": "5,28,28"}, SHAPE, max_samples=8).shape == (5, 1, 28, 28)


def test_png_images_decode_to_unit_pixels():
    out = decode_images([png(), "data:image/png;base64," + png(mode="RGB")], SHAPE, max_samples=8)
    assert out.shape == (2, 1, 28, 28)
    assert torch.allclose(out, torch.full_like(out, 128 / 255))


def test_pixels_within_rounding_of_the_range_are_clamped():
    x = np.zeros((1, 1, 28, 28))
    x[0, 0, 0, 0], x[0, 0, 0, 1] = -1e-6, 1 + 1e-6
    out = to_batch(x.tolist(), SHAPE, max_samples=4)
    assert out.min() == 0.0 and out.max() == 1.0


BAD_JSON = [
    (b"{", 422, "malformed JSON"),
    (b"[1, 2]", 422, "JSON object"),
    (b'{"inputs": []}', 422, "empty batch"),
    (b'{"inputs": [[["a"]]]}', 422, "strings"),
    (b'{"inputs": [[[true]]]}', 422, "booleans"),
    (b'{"inputs": [[[null]]]}', 422, "null"),
    (b'{"inputs": [[[0.5, 0.5], [0.5]]]}', 422, "ragged"),
    (b'{"inputs": [[[0.5]]]}', 422, "expected a batch shaped (B, 1, 28, 28)"),
    (b'{"inputs": [0.5]}', 422, "expected a batch shaped"),
    (b'{"inputs": 3}', 422, "inputs"),
    (b'{"inputs": [[[0.5]]], "images": ["x"]}', 422, "exactly one"),
    (b"{}", 422, "exactly one"),
    (b'{"inputs": [[[0.5]]], "extra": 1}', 422, "extra"),
    (b'{"images": ["%%%"]}', 422, "images[0]: not valid base64"),
    (b'{"images": ["aGVsbG8="]}', 422, "images[0]: not a readable PNG"),
    (b'{"inputs": [[[0.5]]], "top_k": 0}', 422, "top_k"),
    (b'{"inputs": "\xc3\x28"}', 422, "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, 422, "nested too deeply"),
    (b'{"inputs": ' + b"[" * 100 + b"0.5" + b"]" * 100 + b"}", 422, "nested deeper than a batch"),
    # were 500s: Python's json refuses integer literals past 4300 digits with a ValueError
    (b'{"inputs": [[[' + b"1" * 5000 + b"]]]}", 422, "too many digits"),
    (b'{"inputs": [[[0.5]]], "top_k": ' + b"9" * 5000 + b"}", 422, "too many digits"),
]


@pytest.mark.parametrize("raw,status,reason", BAD_JSON, ids=[r[2] for r in BAD_JSON])
def test_bad_json_bodies_name_the_problem(raw, status, reason):
    err = error_of(decode_json_body, raw, SHAPE, max_samples=4)
    assert err.status == status and reason in err.reason, err.reason
    assert err.body()["error"] == err.reason


def test_non_finite_and_out_of_range_pixels():
    for value, reason in ((math.nan, "finite"), (math.inf, "finite"), (1.5, "[0, 1]"), (-0.2, "[0, 1]")):
        x = np.zeros((1, 1, 28, 28))
        x[0, 0, 3, 4] = value
        err = error_of(to_batch, x.tolist(), SHAPE, max_samples=4)
        assert err.status == 422 and reason in err.reason
    raw = b'{"inputs": [[[NaN]]]}'  # Python's json reads NaN/Infinity literals: still refused
    x = np.full((1, 28, 28), 0.5).tolist()
    x[0][0][0] = float("nan")
    assert (
        "finite"
        in error_of(
            decode_json_body, str({"inputs": x}).replace("'", '"').replace("nan", "NaN").encode(), SHAPE, max_samples=4
        ).reason
    )
    assert error_of(decode_json_body, raw, SHAPE, max_samples=4).status == 422


def test_batch_above_the_limit_is_413():
    x = np.zeros((5, 28, 28)).tolist()
    assert error_of(to_batch, x, SHAPE, max_samples=4).status == 413
    assert error_of(decode_binary, bytes(4 * 5 * 784), {"x-shape": "5,1,28,28"}, SHAPE, max_samples=4).status == 413
    assert error_of(decode_images, [png()] * 5, SHAPE, max_samples=4).status == 413


@pytest.mark.parametrize(
    "headers,nbytes,reason",
    [
        ({}, 4 * 784, "X-Shape header missing"),
        ({"x-shape": "1,1,28,x"}, 4 * 784, "comma-separated integers"),
        ({"x-shape": "1,1,28,28"}, 2 * 784, "needs 3136"),
        ({"x-shape": "1,1,28,28", "x-dtype": "float64"}, 8 * 784, "unsupported dtype"),
        ({"x-shape": "1,3,28,28"}, 4 * 3 * 784, "expected a batch shaped"),
        ({"x-shape": "0,1,28,28"}, 0, "empty batch"),
        ({"x-shape": "1,-1,28,28"}, 0, "non-negative"),
        ({"x-shape": "1,1,28,28,1"}, 4 * 784, "expected a batch shaped"),
        # were 500s: numpy's reshape refused these shapes itself (rank above 64, dimensions beyond its index range)
        ({"x-shape": ",".join(["1"] * 70)}, 4, "rank 70"),
        ({"x-shape": "1,0,99999999999999999999999"}, 0, "expected a batch shaped"),
        ({"x-shape": "1,0,4611686018427387904,4"}, 0, "expected a batch shaped"),
    ],
)
def test_bad_binary_bodies(headers, nbytes, reason):
    err = error_of(decode_binary, bytes(nbytes), headers, SHAPE, max_samples=4)
    assert err.status == 422 and reason in err.reason, err.reason


def test_bad_images():
    assert "expected a PNG" in error_of(decode_images, [png(fmt="JPEG")], SHAPE, max_samples=4).reason
    assert "expected 28x28" in error_of(decode_images, [png(h=10)], SHAPE, max_samples=4).reason


def test_top_k_bounds():
    assert check_top_k(None, 10) == 3 and check_top_k(10, 10) == 10
    assert error_of(check_top_k, 11, 10).status == 422


def test_numbers_of_huge_magnitude_are_named_out_of_range():
    """1e300 is refused as outside [0, 1] (it was reported as the inf its float32 cast made), an integer beyond
    64 bits as such (it was 'null, ragged or mixed values')."""
    x = np.full((1, 28, 28), 0.5).tolist()
    x[0][3][4] = 1e300
    assert "[0, 1]" in error_of(to_batch, x, SHAPE, max_samples=4).reason
    x[0][3][4] = 10**30
    assert "64 bits" in error_of(to_batch, x, SHAPE, max_samples=4).reason


def test_content_type_decides_the_decoder_before_the_body_is_read():
    from deployments.schemas import body_kind

    assert body_kind(None) == body_kind("application/json; charset=utf-8") == body_kind("application/x+json") == "json"
    assert body_kind("Application/Octet-Stream") == "binary"
    err = error_of(body_kind, "text/plain; " + "x" * 10_000)
    assert err.status == 415 and len(err.reason) < 400


def test_error_bodies_render_any_client_text():
    """A reason quoting a lone surrogate or a huge key still renders (ASCII JSON), cut to a bounded length."""
    from deployments.ingress import ErrorJSON
    from deployments.schemas import echo, format_validation

    body = ErrorJSON({"error": "\ud800 " + echo("\udfff" * 10_000), "value": math.nan}).body
    assert json.loads(body)["value"] is None and len(body) < 1000
    assert len(format_validation([{"loc": ("body", "k" * 10_000), "msg": "Extra inputs are not permitted"}] * 9)) < 1000


def test_inflight_bytes_refuse_instead_of_buffering_and_are_given_back():
    from deployments.ingress import InflightBytes

    bound = InflightBytes(1000)
    with bound.claim() as first:
        first.cover(600)
        first.cover(700)  # a chunked body growing: only the new bytes are taken
        assert (bound.held, first.bytes) == (700, 700)
        with pytest.raises(ApiError) as busy, bound.claim() as second:
            second.cover(400)
        assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "1"} and bound.refused == 1
        assert bound.held == 700  # the refused claim holds nothing
    assert bound.held == 0
    with pytest.raises(ApiError) as alone, bound.claim() as big:
        big.cover(1001)
    assert alone.value.status == 413 and "max_inflight_bytes" in alone.value.reason and bound.held == 0
    with pytest.raises(RuntimeError), bound.claim() as failing:
        failing.cover(500)
        raise RuntimeError("the path failed")
    assert bound.held == 0  # given back however the request ends


def test_openapi_body_documents_both_encodings():
    content = infer_openapi_body()["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} <= set(content)
    assert "inputs" in content["application/json"]["schema"]["properties"]


# --------------------------------------------------------------------------- path plans and routing


def test_plans_chain_blocks_and_links_on_the_right_services():
    assert plan_hops(PathSpec.local_only("digits")) == [Hop("blocks", "digits", 1, TO_END)]
    coop = PathSpec.parse("digits:mnist:2:1:3:4")
    assert plan_hops(coop) == [
        Hop("blocks", "digits", 1, 2),
        Hop("links", "mnist", path_id=coop.id, link="in"),
        Hop("blocks", "mnist", 1, 3, guest=True, path_id=coop.id),
        Hop("links", "mnist", path_id=coop.id, link="out"),
        Hop("blocks", "digits", 4, TO_END),
    ]
    skip = PathSpec.parse("digits:skip:0:3")
    assert [h.kind for h in plan_hops(skip)] == ["links", "blocks"] and plan_hops(skip)[0].service == "digits"


def test_stages_make_one_call_per_node_visited():
    coop = PathSpec.parse("digits:mnist:2:1:3:4")
    runs = stages(plan_hops(coop))
    assert [[h.service for h in run] for run in runs] == [["digits"], ["mnist"] * 3, ["digits"]]
    assert [h.kind for h in runs[1]] == ["links", "blocks", "links"]
    local_out = stages(plan_hops(coop, link_out="local"))
    assert [[h.kind for h in run] for run in local_out] == [["blocks"], ["links", "blocks"], ["links", "blocks"]]
    assert stages(plan_hops(PathSpec.parse("digits:skip:0:3"))) == [tuple(plan_hops(PathSpec.parse("digits:skip:0:3")))]


def test_merger_sends_concurrent_requests_as_one_chain_and_splits_the_answer():
    """Requests that arrive while `depth` chains are in flight leave together (up to max_samples); each gets
    its own rows and its share of the wire bytes; a failed chain fails each of its requests."""
    import asyncio

    sent: list[int] = []

    async def run(x: torch.Tensor) -> Activation:
        sent.append(len(x))
        await asyncio.sleep(0.05)
        if (x < 0).any():
            raise RuntimeError("replica lost")
        return Activation(x * 2, "edge-a", hops=2, wire_bytes=10 * len(x))

    async def main():
        m = Merger(run, max_samples=8, depth=1)
        xs = [torch.full((n, 1), float(i)) for i, n in enumerate([2, 3, 3, 4, 1])]
        outs = await asyncio.gather(*(m.submit(x) for x in xs))
        bad = await asyncio.gather(
            m.submit(torch.ones(2, 1)), m.submit(-torch.ones(1, 1)), m.submit(torch.ones(1, 1)), return_exceptions=True
        )
        return xs, outs, bad, m.stats

    xs, outs, bad, stats = asyncio.run(main())
    assert sent[:3] == [2, 6, 5]  # the first alone; then as many as fit 8 samples; then the rest
    for x, out in zip(xs, outs):
        assert torch.equal(out.x, x * 2) and out.wire_bytes == 10 * len(x) and out.hops == 2
    assert sent[3:] == [2, 2] and isinstance(bad[0], Activation)  # a failed chain fails its requests only
    assert all(isinstance(b, RuntimeError) for b in bad[1:]) and stats["max_requests_in_chain"] == 2


def test_merger_sends_a_second_chain_only_when_full():
    """With one chain in flight, waiting requests leave early only as a full chain (max_samples), so moderate
    load does not split them into half-size calls; a partial remainder waits for the chain in flight."""
    import asyncio

    sent: list[tuple[int, int]] = []

    async def run(x: torch.Tensor) -> Activation:
        sent.append((len(x), m.in_flight))
        await asyncio.sleep(0.05)
        return Activation(x, "edge-a")

    async def main():
        first = asyncio.ensure_future(m.submit(torch.zeros(2, 1)))
        await asyncio.sleep(0.01)  # the first chain is in flight
        rest = [asyncio.ensure_future(m.submit(torch.zeros(n, 1))) for n in (3, 3)]
        await asyncio.sleep(0.01)
        assert len(sent) == 1  # 6 of 8 samples waiting: not sent beside the first
        rest.append(asyncio.ensure_future(m.submit(torch.zeros(2, 1))))
        await asyncio.sleep(0.01)
        assert sent[1] == (8, 2)  # full: it leaves while the first is still in flight
        rest.append(asyncio.ensure_future(m.submit(torch.zeros(1, 1))))
        await asyncio.gather(first, *rest)

    m = Merger(run, max_samples=8, depth=2)
    asyncio.run(main())
    assert sent == [(2, 1), (8, 2), (1, 1)]  # the partial remainder left once no chain was in flight


def test_link_files_group_by_the_node_that_runs_them():
    assert link_files(ROWS) == {
        "mnist": {BEST: "/x/best.pt", "digits:mnist:0:1:1:2": "/x/b.pt"},
        "digits": {"digits:skip:0:3": "/x/skip.pt"},
    }


def test_initial_routes_are_the_table_best(tiny_cfg):
    routes = initial_routes(tiny_cfg, ROWS)
    assert routes == {
        "digits": {"path": BEST, "coop_fraction": 1.0},  # edge-early is not a path
        "mnist": {"path": "mnist:local", "coop_fraction": 0.0},
    }


def test_router_validates_and_switches(tiny_cfg):
    router = Router(tiny_cfg, ROWS)
    assert router.routes["digits"].path.id == BEST
    for svc, path, frac, status, reason in [
        ("nope", "nope:local", None, 404, "unknown service"),
        ("digits", "garbage", None, 422, "not a path id"),
        ("digits", "mnist:local", None, 422, "answers service 'mnist'"),
        ("digits", "digits:mnist:0:1:4:5", None, 422, "not in the reward table"),
        ("digits", "digits:mnist:0:1:3:4", None, 422, "no trained links"),
        ("digits", BEST, 1.5, 422, "coop_fraction"),
    ]:
        err = error_of(router.validate, svc, path, frac)
        assert err.status == status and reason in err.reason, err.reason
    with pytest.raises(CoderayError):  # one bad entry: nothing switches
        router.apply({"digits": {"path": "digits:local"}, "mnist": {"path": "bad"}})
    assert router.routes["digits"].path.id == BEST
    router.apply({"digits": {"path": "digits:local"}})
    assert router.snapshot()["digits"] == {"path": "digits:local", "coop_fraction": 0.0}


def test_host_without_guest_quota_is_refused(tiny_cfg):
    raw = tiny_cfg.model_dump()
    raw["services"][1]["guest_quota"] = 0
    router = Router(CoderayConfig.model_validate(raw), ROWS)
    assert router.routes["digits"].path.id == "digits:local"  # the table's best is no longer possible
    assert "does not admit 'digits'" in error_of(router.validate, "digits", BEST).reason


def test_a_host_admits_only_the_guests_it_grants(tiny_cfg):
    raw = tiny_cfg.model_dump()
    raw["services"][1]["guests"] = {"digits": 0}  # mnist lists digits with no slots
    cfg = CoderayConfig.model_validate(raw)
    assert cfg.service("mnist").grant("digits") == 0 and tiny_cfg.service("mnist").grant("digits") == 8
    router = Router(cfg, ROWS)
    assert router.routes["digits"].path.id == "digits:local"
    assert "does not admit 'digits'" in error_of(router.validate, "digits", BEST).reason
    raw["services"][1]["guests"] = {"digits": 5}
    assert CoderayConfig.model_validate(raw).service("mnist").grant("digits") == 5
    raw["services"][1]["guests"] = {"digits": 9}  # more than its guest_quota 8
    with pytest.raises(ValidationError, match="guests.digits: 9 slots"):
        CoderayConfig.model_validate(raw)
    raw["services"][1]["guests"] = {"nobody": 1}
    with pytest.raises(ValidationError, match="unknown guest 'nobody'"):
        CoderayConfig.model_validate(raw)


def test_coop_fraction_splits_traffic_evenly(tiny_cfg):
    router = Router(tiny_cfg, ROWS)
    router.apply({"digits": {"path": BEST, "coop_fraction": 0.25}})
    chosen = [router.choose("digits").id for _ in range(100)]
    assert chosen.count(BEST) == 25 and chosen.count("digits:local") == 75
    router.apply({"digits": {"path": BEST, "coop_fraction": 0.0}})
    assert {router.choose("digits").id for _ in range(10)} == {"digits:local"}


def test_emulated_hop_delay(tiny_cfg):
    assert hop_delay_s(tiny_cfg, "edge-a", "edge-a", 10**6) == 0.0
    # tiny config: 100 Mbit/s, 1 ms RTT -> 0.5 ms + 8e6 bit / 1e8 bit/s
    assert hop_delay_s(tiny_cfg, "edge-a", "edge-b", 10**6) == pytest.approx(0.0005 + 0.08)
    off = tiny_cfg.model_copy(update={"serving": tiny_cfg.serving.model_copy(update={"emulate_network": False})})
    assert hop_delay_s(off, "edge-a", "edge-b", 10**6) == 0.0
    a = Activation(torch.zeros(1), "edge-a").moved(torch.ones(1), "edge-b", delay_s=0.002, crossed=True)
    assert (a.node, a.hops, a.delay_ms) == ("edge-b", 1, 2.0)


# --------------------------------------------------------------------------- batching and placement


def test_batch_size_counts_samples_and_enforces_the_guest_quota():
    """Serve's batcher defers the chunk whose addition makes the batch size exceed max_batch_size = B: a chunk
    that takes the guests past s, or one guest past its grant, must size the batch above B, whatever its length."""
    B = 16
    own = Chunk(torch.zeros(10, 1), 1, 5, False, quota=8, capacity=B)
    guest = Chunk(torch.zeros(6, 1), 1, 2, True, quota=8, capacity=B, owner="digits", grant=8)
    assert batch_samples([own]) == 10 and batch_samples([own, guest]) == 16 == B
    assert batch_samples([guest]) <= B < batch_samples([guest, guest])  # 12 guest samples > s = 8: the second waits
    # grants per guest: digits may take 5 slots, parity 3, of s = 8
    a = Chunk(torch.zeros(4, 1), 1, 2, True, quota=8, capacity=B, owner="digits", grant=5)
    b = Chunk(torch.zeros(3, 1), 1, 2, True, quota=8, capacity=B, owner="parity", grant=3)
    assert batch_samples([a, b]) == 7
    assert batch_samples([a]) <= B < batch_samples([a, a])  # 8 of digits' samples > its 5, though within s
    assert batch_samples([b]) <= B < batch_samples([b, b])


def test_mixed_block_ranges_in_one_batch_match_separate_runs():
    torch.manual_seed(0)
    blocks = [torch.nn.Linear(4, 4) for _ in range(3)]
    x = [torch.randn(n, 4) for n in (2, 3, 1)]
    chunks = [Chunk(x[0], 1, 3, False, 0, 8), Chunk(x[1], 2, 2, True, 4, 8, "g", 4), Chunk(x[2], 1, 3, False, 0, 8)]
    out = run_grouped(blocks, chunks)
    with torch.no_grad():
        assert torch.allclose(out[0], blocks[2](blocks[1](blocks[0](x[0]))), atol=1e-6)
        assert torch.allclose(out[1], blocks[1](x[1]), atol=1e-6)
        assert torch.allclose(out[2], blocks[2](blocks[1](blocks[0](x[2]))), atol=1e-6)
    assert out[0].untyped_storage().nbytes() == out[0].numel() * 4  # not a view of the group's output


def test_cpu_shares_split_each_node(tiny_cfg):
    assert cpu_shares(tiny_cfg) == {"digits": 1.0, "mnist": 1.0}
    raw = tiny_cfg.model_dump()
    raw["services"][1]["node"] = "edge-a"
    assert cpu_shares(CoderayConfig.model_validate(raw)) == {"digits": 0.5, "mnist": 0.5}
