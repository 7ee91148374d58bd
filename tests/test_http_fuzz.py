"""Property-based tests (hypothesis) of "bad input is never a 500": whatever a client sends, the API answers a 4xx
with a JSON `{"error": reason}`, or a 200 when the input was in fact valid; never a 5xx, a hang or a dead replica.

Two layers. The pure decoding functions (`deployments.schemas`) take many examples against an oracle that says
which inputs must be accepted and with which status the others are refused. The real served app (a local Ray
cluster from conftest's tiny config, deployed once for the module, real HTTP through Serve's front) takes a
bounded number of examples of each kind: bodies, numbers, shapes, dtypes, encodings, images, headers, routes;
then the ingress replica must still be the same process and still answer a good request. Every run draws the same
examples (`derandomize`, no example database), so a CI failure repeats here.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import string
import threading
import time
from types import SimpleNamespace
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deployments.schemas import (
    ECHO_CHARS,
    FLOAT32_NAMES,
    PIXEL_TOLERANCE,
    ApiError,
    body_kind,
    decode_binary,
    decode_body,
    decode_images,
    echo,
    format_validation,
)

SHAPE = (1, 28, 28)
MAX_SAMPLES = 8  # the served fixture's serving.max_request_samples, and the unit tests'
MAX_BODY = 64 * 2**10  # ... its serving.max_body_bytes
MAX_INFLIGHT = 48 * 2**10  # ... its serving.max_inflight_bytes: below the body limit, so that a body can
# pass one and not the other
INFER = "/v1/services/digits/infer"
BINARY = "application/octet-stream"

QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
UNIT = settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=QUIET)
SERVED = settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=QUIET)


# --------------------------------------------------------------------------- strategies


json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_docs = st.recursive(
    json_leaves,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=24,
)
infer_docs = st.one_of(
    json_docs,
    st.fixed_dictionaries({"inputs": json_docs}),
    st.fixed_dictionaries({"images": json_docs}),
    st.fixed_dictionaries(
        {"inputs": json_docs}, optional={"images": json_docs, "top_k": json_docs, "extra": json_docs}
    ),
)


@st.composite
def json_numbers(draw: st.DrawFn) -> str:
    """A JSON number literal of any magnitude and precision (integers past Python's 4300-digit parsing limit,
    exponents past float64's range), or one of the NaN/Infinity literals Python's json also reads."""
    special = draw(st.sampled_from([None, None, None, "NaN", "Infinity", "-Infinity"]))
    if special:
        return special
    if draw(st.booleans()):
        return repr(draw(st.floats(-0.01, 1.01) | st.floats(allow_nan=False, allow_infinity=False)))
    sign = draw(st.sampled_from(["", "-"]))
    whole = draw(
        st.just("0")
        | st.from_regex(r"[1-9][0-9]{0,40}", fullmatch=True)
        | st.integers(4290, 4400).map(lambda n: "9" * n)
    )
    frac = draw(st.just("") | st.from_regex(r"\.[0-9]{1,25}", fullmatch=True))
    exp = draw(st.just("") | st.from_regex(r"[eE][+-]?[0-9]{1,7}", fullmatch=True))
    return f"{sign}{whole}{frac}{exp}"


def in_range(literal: str) -> bool:
    """Whether a pixel sent as `literal` must be accepted: finite and in [0, 1] within the clamping tolerance."""
    value = float(literal)
    return math.isfinite(value) and -PIXEL_TOLERANCE <= value <= 1 + PIXEL_TOLERANCE


def json_batch(literal: str, row: int, col: int) -> bytes:
    """One (1, 28, 28) sample of 0.5 with `literal` at (row, col), as JSON text (the literal verbatim)."""
    rows = []
    for r in range(28):
        cells = ["0.5"] * 28
        if r == row:
            cells[col] = literal
        rows.append("[" + ",".join(cells) + "]")
    return ('{"inputs": [[' + ",".join(rows) + "]]}").encode()


dims = st.integers(-2, 40) | st.sampled_from([0, 1, 3, 28, 29]) | st.integers(-(2**70), 2**70)


@st.composite
def binary_requests(draw: st.DrawFn) -> tuple[list[int], int, float]:
    """(X-Shape dimensions, body length, pixel value): near-valid shapes (any batch count, one dimension off, the
    B,H,W form) as often as shapes of any rank and magnitude; body lengths right or off."""
    kind = draw(st.sampled_from(["valid", "bhw", "off", "any"]))
    b = draw(st.integers(0, MAX_SAMPLES + 2))
    if kind == "valid":
        shape = [b, 1, 28, 28]
    elif kind == "bhw":
        shape = [b, 28, 28]
    elif kind == "off":
        shape = [b, 1, 28, 28]
        shape[draw(st.integers(0, 3))] = draw(dims)
    else:
        shape = draw(st.lists(dims, min_size=1, max_size=draw(st.sampled_from([5, 80]))))
    size = 4 * math.prod(shape) if all(0 <= d <= 64 for d in shape) else 0
    nbytes = draw(st.sampled_from([size, size, size + 4, max(0, size - 1)]) | st.integers(0, 4096))
    value = draw(st.sampled_from([0.0, 0.5, 1.0]) | st.floats(width=32))
    return shape, min(nbytes, 4 * (MAX_SAMPLES + 2) * 784), value


def binary_status(shape: list[int], nbytes: int, value: float) -> int:
    """The status a binary request must get: 200 only for a (B, 1, 28, 28) or (B, 28, 28) batch of 1..max
    samples whose body has exactly its 4 bytes per value, all in [0, 1]."""
    s = tuple(shape)
    if min(s) < 0:
        return 422
    if len(s) == 3 and s[1:] == (28, 28):
        s = (s[0], 1, 28, 28)
    if len(s) != 4 or s[1:] != SHAPE or s[0] == 0:
        return 422
    if s[0] > MAX_SAMPLES:
        return 413
    if nbytes != 4 * math.prod(s):
        return 422
    return 200 if math.isfinite(value) and -PIXEL_TOLERANCE <= value <= 1 + PIXEL_TOLERANCE else 422


def x_shape(shape: list[int], sep: str = ",") -> str:
    return sep.join(map(str, shape))


header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
dtype_names = (
    st.sampled_from(
        [
            "float32",
            "f4",
            "<f4",
            "float",
            "FLOAT32",
            "float64",
            "f8",
            ">f4",
            "int8",
            "uint8",
            "float16",
            "bfloat16",
            "complex64",
            "",
        ]
    )
    | header_text
)


@st.composite
def images(draw: st.DrawFn) -> tuple[str, bool | None]:
    """(base64 text, must it decode?): PNGs of any size and mode (True only at 28x28), other formats (False),
    truncated PNGs and random bytes (None: either answer is right as long as it is clean), text (False)."""
    kind = draw(st.sampled_from(["png", "png", "format", "truncated", "bytes", "text"]))
    if kind == "text":
        return draw(st.text(max_size=40)), False
    valid: bool | None = None
    if kind == "bytes":
        blob = draw(st.binary(max_size=300))
    else:
        w, h = draw(st.sampled_from([28]) | st.integers(1, 40)), draw(st.sampled_from([28]) | st.integers(1, 40))
        img = Image.new(
            draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "LA", "I;16"])), (w, h), color=draw(st.integers(0, 255))
        )
        fmt = "PNG" if kind != "format" else draw(st.sampled_from(["GIF", "BMP", "JPEG", "TIFF"]))
        buf = io.BytesIO()
        (img if fmt == "PNG" else img.convert("RGB")).save(buf, format=fmt)
        blob = buf.getvalue()
        if kind == "truncated":
            blob = blob[: draw(st.integers(0, max(0, len(blob) - 13)))]  # the IEND chunk and more cut off
        else:
            valid = kind == "png" and (w, h) == (28, 28)
    text = base64.b64encode(blob).decode()
    if draw(st.booleans()):
        text = "data:image/png;base64," + text
    return text, valid


# --------------------------------------------------------------------------- the decoding functions


def outcome(fn, *args, **kwargs) -> torch.Tensor | ApiError:
    """What a decoding call ends in: its batch (without decode_body's top_k), or the ApiError that refuses it;
    anything else fails the test."""
    try:
        out = fn(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out
    except ApiError as e:
        assert 400 <= e.status < 500 and e.reason, e
        json.dumps(e.body(), ensure_ascii=True, allow_nan=False)  # the error body is JSON
        return e


def a_batch(out: torch.Tensor | ApiError) -> bool:
    """True for a decoded batch (and checks it is one: float32, (B, 1, 28, 28), pixels in [0, 1])."""
    if isinstance(out, ApiError):
        return False
    assert out.dtype == torch.float32 and tuple(out.shape[1:]) == SHAPE and 1 <= len(out) <= MAX_SAMPLES
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    return True


@UNIT
@given(
    raw=st.binary(max_size=2048),
    kind=st.sampled_from(["json", "binary"]),
    shape=header_text,
    dtype=st.none() | dtype_names,
)
def test_random_bytes_decode_or_are_refused_with_a_4xx(raw, kind, shape, dtype):
    headers = {"x-shape": shape} | ({} if dtype is None else {"x-dtype": dtype})
    a_batch(outcome(decode_body, raw, kind, headers, SHAPE, max_samples=MAX_SAMPLES))


@UNIT
@given(doc=infer_docs, encoding=st.sampled_from(["utf-8", "utf-16", "utf-32"]))
def test_random_json_documents_decode_or_are_refused_with_a_4xx(doc, encoding):
    raw = json.dumps(doc).encode(encoding)
    a_batch(outcome(decode_body, raw, "json", {}, SHAPE, max_samples=MAX_SAMPLES))


@UNIT
@given(literal=json_numbers(), row=st.integers(0, 27), col=st.integers(0, 27))
def test_numbers_of_any_magnitude_are_accepted_exactly_when_they_are_pixels(literal, row, col):
    out = outcome(decode_body, json_batch(literal, row, col), "json", {}, SHAPE, max_samples=MAX_SAMPLES)
    assert a_batch(out) == in_range(literal), (literal, out)
    if not a_batch(out):
        assert out.status == 422 and any(why in out.reason for why in ("finite", "[0, 1]", "digits", "64 bits"))
    else:
        assert out[0, 0, row, col] == pytest.approx(min(1.0, max(0.0, float(literal))), abs=1e-7)


@UNIT
@given(req=binary_requests(), sep=st.sampled_from([",", "x", ", "]))
def test_binary_shapes_of_any_rank_get_the_status_the_shape_deserves(req, sep):
    shape, nbytes, value = req
    count = nbytes // 4
    raw = np.full(count, value, dtype="<f4").tobytes() + bytes(nbytes - 4 * count)
    out = outcome(decode_binary, raw, {"x-shape": x_shape(shape, sep)}, SHAPE, max_samples=MAX_SAMPLES)
    expected = binary_status(shape, nbytes, value)
    assert (200 if a_batch(out) else out.status) == expected, (shape, nbytes, value, out)


@UNIT
@given(dtype=dtype_names)
def test_only_float32_dtypes_are_read(dtype):
    out = outcome(
        decode_binary,
        np.full(784, 0.5, "<f4").tobytes(),
        {"x-shape": "1,1,28,28", "x-dtype": dtype},
        SHAPE,
        max_samples=MAX_SAMPLES,
    )
    assert a_batch(out) == (dtype.strip().lower() in FLOAT32_NAMES), (dtype, out)


@UNIT
@given(items=st.lists(images(), min_size=1, max_size=3))
def test_images_decode_exactly_when_they_are_pngs_of_the_tasks_size(items):
    out = outcome(decode_images, [text for text, _ in items], SHAPE, max_samples=MAX_SAMPLES)
    expected = [valid for _, valid in items]
    if all(expected):
        assert a_batch(out) and len(out) == len(items)
    elif False in expected:
        assert not a_batch(out) and out.status == 422 and out.reason.startswith("images[")
    else:
        a_batch(out)


@UNIT
@given(
    ctype=st.none()
    | st.text(max_size=40)
    | st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "APPLICATION/OCTET-STREAM",
            "text/json",
            "application/problem+json",
            "text/plain",
            "multipart/form-data; boundary=x",
            "",
        ]
    )
)
def test_content_types_are_json_binary_or_415(ctype):
    try:
        kind = body_kind(ctype)
    except ApiError as e:
        assert e.status == 415 and "Content-Type" in e.reason and len(e.reason) < 400
        return
    base = (ctype or "").split(";")[0].strip().lower()
    assert kind == ("binary" if base == BINARY else "json")


@UNIT
@given(text=st.text(max_size=5000), loc=st.lists(st.text(max_size=300) | st.integers(), max_size=4))
def test_echoed_client_text_is_bounded_and_encodable(text, loc):
    """A reason quotes the client's own text (a header, a JSON key): cut short, and encodable whatever it holds
    (lone surrogates included), so the refusal itself cannot fail."""
    quoted, line = echo(text), format_validation([{"loc": ("body", *loc), "msg": "bad"}] * 7)
    json.dumps({"error": quoted, "detail": line}, ensure_ascii=True)
    assert len(quoted) <= ECHO_CHARS + 30 and len(line) <= 5 * (4 * (ECHO_CHARS + 31) + 10) + 20


def test_large_bodies_are_decoded_off_the_event_loop():
    """Bodies above INLINE_DECODE_BYTES go to the decoding executor, so the loop that serves every other request
    of the replica is not the thread that parses them; small ones decode in place (a thread hop costs more)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from deployments.ingress import INLINE_DECODE_BYTES, decode_request

    class Recording(ThreadPoolExecutor):
        def __init__(self) -> None:
            super().__init__(1)
            self.threads: list[str] = []

        def submit(self, fn, /, *args, **kwargs):
            def run():
                self.threads.append(threading.current_thread().name)
                return fn(*args, **kwargs)

            return super().submit(run)

    small = json.dumps({"inputs": np.full((1, 28, 28), 0.5).tolist()}).encode()
    large = json.dumps({"inputs": np.full((64, 28, 28), 0.5).tolist()}).encode()
    assert len(small) <= INLINE_DECODE_BYTES < len(large)

    async def main(pool: Recording) -> list[int]:
        sizes = []
        for raw in (small, large):
            out, _ = await decode_request(raw, "json", {}, SHAPE, max_samples=64, executor=pool)
            sizes.append(len(out))
        return sizes

    with Recording() as pool:
        assert asyncio.run(main(pool)) == [1, 64]
    assert len(pool.threads) == 1 and pool.threads[0] != threading.main_thread().name


# --------------------------------------------------------------------------- the served app over HTTP


@pytest.fixture(scope="module")
def served(trained_cfg):
    """The tiny config deployed on a local Ray cluster with small request limits (no search: the services answer
    local-only, which is all the decoding needs); the ingress's process id taken first, to check at the end that
    no fuzzed request killed or restarted it."""
    import ray
    from ray import serve

    from coderay.cluster import LocalCluster
    from coderay.table import RewardTable
    from deployments.app import deploy, direct_url, free_port

    serving = trained_cfg.serving.model_copy(
        update={
            "request_timeout_s": 8.0,
            "max_request_samples": MAX_SAMPLES,
            "max_body_bytes": MAX_BODY,
            "max_inflight_bytes": MAX_INFLIGHT,
        }
    )
    cfg = trained_cfg.model_copy(update={"serving": serving})
    if ray.is_initialized():
        ray.shutdown()
    cluster = LocalCluster(cfg)
    try:
        start = time.perf_counter()
        url = deploy(cfg, RewardTable([]), port=free_port())
        print(f"\ndeployed in {time.perf_counter() - start:.1f} s at {url}")
        with httpx.Client(base_url=url, timeout=30) as client:
            pid = client.get("/v1/debug/replicas").json()["ingress"]["pid"]
            yield SimpleNamespace(cfg=cfg, url=url, direct=direct_url(url), client=client, pid=pid)
    finally:
        serve.shutdown()
        cluster.shutdown()


def refusal(r: httpx.Response, *statuses: int) -> str:
    """The reason of a JSON refusal: one of `statuses` when given (a 503 only when asked for), else any 4xx."""
    assert r.status_code in statuses if statuses else 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    reason = r.json()["error"]
    assert isinstance(reason, str) and len(reason) > 8
    return reason


def answered(r: httpx.Response, samples: int) -> None:
    assert r.status_code == 200, r.text[:300]
    assert r.json()["samples"] == samples and len(r.json()["predictions"]) == samples


def good_binary(samples: int = 2) -> dict:
    return {
        "content": np.full((samples, 1, 28, 28), 0.5, "<f4").tobytes(),
        "headers": {"Content-Type": BINARY, "X-Shape": f"{samples},1,28,28"},
    }


@SERVED
@given(
    raw=st.binary(max_size=4096),
    ctype=st.none()
    | st.sampled_from(["application/json", BINARY, "text/plain", "application/x-www-form-urlencoded"])
    | header_text,
    shape=st.none() | header_text,
)
def test_served_random_bodies_are_refused_with_a_json_4xx(served, raw, ctype, shape):
    headers = ({} if ctype is None else {"Content-Type": ctype}) | ({} if shape is None else {"X-Shape": shape})
    r = served.client.post(INFER, content=raw, headers=headers)
    if r.status_code == 200:  # random bytes that happen to be a valid batch: answered, not refused
        assert r.json()["predictions"]
    else:
        refusal(r)


@SERVED
@given(doc=infer_docs, encoding=st.sampled_from(["utf-8", "utf-16"]), top_k=st.none() | header_text)
def test_served_random_json_is_refused_with_a_json_4xx(served, doc, encoding, top_k):
    params = {} if top_k is None else {"top_k": top_k}
    refusal(
        served.client.post(
            INFER, content=json.dumps(doc).encode(encoding), params=params, headers={"Content-Type": "application/json"}
        )
    )


@SERVED
@given(literal=json_numbers(), row=st.integers(0, 27), col=st.integers(0, 27))
def test_served_numbers_of_any_magnitude(served, literal, row, col):
    r = served.client.post(INFER, content=json_batch(literal, row, col), headers={"Content-Type": "application/json"})
    if in_range(literal):
        answered(r, 1)
    else:
        refusal(r, 422)


@SERVED
@given(req=binary_requests(), dtype=st.none() | dtype_names)
def test_served_shapes_and_dtypes(served, req, dtype):
    shape, nbytes, value = req
    count = nbytes // 4
    raw = np.full(count, value, dtype="<f4").tobytes() + bytes(nbytes - 4 * count)
    headers = {"Content-Type": BINARY, "X-Shape": x_shape(shape)} | ({} if dtype is None else {"X-Dtype": dtype})
    r = served.client.post(INFER, content=raw, headers=headers)
    dtype_ok = dtype is None or dtype.strip().lower() in FLOAT32_NAMES
    expected = binary_status(shape, nbytes, value) if dtype_ok else 422
    if expected == 200:
        answered(r, shape[0])
    else:
        refusal(r, expected)


@SERVED
@given(items=st.lists(images(), min_size=1, max_size=3))
def test_served_images(served, items):
    r = served.client.post(INFER, json={"images": [text for text, _ in items]})
    expected = [valid for _, valid in items]
    if all(expected):
        answered(r, len(items))
    elif False in expected:
        refusal(r, 422)
    elif r.status_code != 200:
        refusal(r, 422)


reserved = {
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "x-shape",
    "x-dtype",
    "connection",
    "expect",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "cookie",
    "authorization",
    "x-request-id",
    "x-forwarded-for",
}
header_names = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=20).filter(
    lambda n: n.lower() not in reserved
)


@SERVED
@given(
    extra=st.lists(st.tuples(header_names, header_text), max_size=8),
    dup=st.lists(st.tuples(st.sampled_from(["Content-Type", "X-Shape", "X-Dtype"]), header_text), max_size=3),
)
def test_served_headers_unknown_and_duplicated(served, extra, dup):
    """Unknown headers never change the answer to a good request; a duplicated Content-Type, X-Shape or X-Dtype
    answers from its first value (HTTP's rule for single-valued fields) and never fails the server."""
    good = good_binary()
    headers = list(good["headers"].items()) + extra
    answered(served.client.post(INFER, content=good["content"], headers=headers), 2)
    r = served.client.post(INFER, content=good["content"], headers=headers + dup)
    if r.status_code != 200:
        refusal(r)


@SERVED
@given(
    svc=st.text(max_size=30) | st.sampled_from(["digits", "mnist", "nope"]),
    body=infer_docs
    | st.fixed_dictionaries(
        {"path": st.text(max_size=30) | st.just("digits:local")}, optional={"coop_fraction": json_leaves}
    ),
    method=st.sampled_from(["GET", "PUT", "DELETE", "POST"]),
)
def test_served_routes_with_wrong_services_and_bodies(served, svc, body, method):
    url = f"/v1/services/{quote(svc, safe='')}/route"
    r = served.client.request(
        method, url, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    if r.status_code == 200:  # a valid service and body: the route changed; hand it back
        assert svc in ("digits", "mnist") and r.json()["service"] == svc
        assert served.client.delete(f"/v1/services/{svc}/route").status_code == 200
    else:
        refusal(r)
    if svc not in ("digits", "mnist"):
        refusal(served.client.post(f"/v1/services/{quote(svc, safe='')}/infer", **good_binary()), 404, 405)


def test_served_huge_headers_are_refused(served):
    """Headers are bounded on both fronts: Serve's HAProxy port refuses past its buffer (16 KiB, 101 headers)
    with its own 400 page, before the app; the ingress's direct port, whose server takes any size, gets the app's
    431 JSON refusal. Below the bound, a huge X-Shape is the app's 422."""
    good = good_binary()
    for size in (1000, 8000):
        refusal(
            served.client.post(INFER, content=good["content"], headers=good["headers"] | {"X-Shape": "1" * size}), 422
        )
    for headers in ({"X-Big": "a" * 20_000}, {"X-Big": "a" * 1_000_000}, {f"X-H{i}": "v" for i in range(150)}):
        r = httpx.post(served.url + INFER, content=good["content"], headers=good["headers"] | headers, timeout=30)
        assert 400 <= r.status_code < 500, r.text[:200]
        if served.direct:
            r = httpx.post(
                served.direct + INFER, content=good["content"], headers=good["headers"] | headers, timeout=30
            )
            assert "headers too large" in refusal(r, 431)
    answered(served.client.post(INFER, **good), 2)


def test_served_body_limits_and_inflight_bound(served):
    """A body above serving.max_body_bytes or above the in-flight bound alone is a 413 before it is buffered;
    while a slow upload holds most of the bound, another body that would pass it gets a 503 with Retry-After,
    and the bound is given back when that upload ends (here: the client goes away)."""
    c = served.client
    assert "max_body_bytes" in refusal(
        c.post(INFER, content=bytes(MAX_BODY + 4), headers={"Content-Type": BINARY, "X-Shape": "1,1,28,28"}), 413
    )
    assert "max_inflight_bytes" in refusal(
        c.post(INFER, content=bytes(MAX_INFLIGHT + 4), headers={"Content-Type": BINARY, "X-Shape": "1,1,28,28"}), 413
    )
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    hold = MAX_INFLIGHT - 4096
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {BINARY}\r\nX-Shape: 1,1,28,28\r\n"
            f"Content-Length: {hold}\r\n\r\n".encode()
            + bytes(1024)
        )
        held = wait_for(lambda: inflight(c)["held"] >= hold)
        assert held, f"the slow upload never reached the ingress: {inflight(c)}"
        r = c.post(INFER, **good_binary(2))
        assert "max_inflight_bytes" in refusal(r, 503) and r.headers.get("retry-after") == "1"
    assert wait_for(lambda: inflight(c)["held"] == 0), inflight(c)
    answered(c.post(INFER, **good_binary(2)), 2)
    assert inflight(c)["refused"] >= 1


def inflight(client: httpx.Client) -> dict:
    return client.get("/v1/debug/replicas").json()["ingress"]["inflight_bytes"]


def wait_for(check, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_the_replica_survived_the_fuzzing(served):
    """Last in the file: after every malformed request above, the same ingress process answers a good request in
    each encoding."""
    c = served.client
    assert c.get("/v1/debug/replicas").json()["ingress"]["pid"] == served.pid
    answered(c.post(INFER, **good_binary(3)), 3)
    answered(c.post(INFER, json={"inputs": np.full((2, 28, 28), 0.25).tolist()}), 2)
    buf = io.BytesIO()
    Image.new("L", (28, 28), 128).save(buf, format="PNG")
    answered(c.post(INFER, json={"images": [base64.b64encode(buf.getvalue()).decode()]}), 1)
    assert c.get("/healthz").json()["status"] == "ok"
