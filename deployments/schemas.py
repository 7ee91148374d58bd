"""The HTTP API's request and response models, and the decoding of a request body into a pixel batch.

Decoding is one pure step (bytes in, a float32 `(B, C, H, W)` tensor of pixels in [0, 1] out) so it is tested
without Ray. Every problem with user input raises `ApiError` with a status and a reason that names what is wrong;
the ingress turns it into `{"error": reason, ...}`. Three encodings of the same batch:

- JSON `{"inputs": [...]}`: nested lists, `(B, C, H, W)` or `(B, H, W)` for one-channel tasks;
- JSON `{"images": ["<base64 PNG>", ...]}` (a `data:image/png;base64,` prefix is accepted);
- `application/octet-stream`: raw little-endian float32 with an `X-Shape: B,C,H,W` (or `B,H,W`) header,
  the fast one (no JSON parsing of a large nested list).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coderay.errors import CoderayError, InvalidRouteError, UnknownServiceError

__all__ = [
    "ApiError",
    "InferRequest",
    "ClassScore",
    "Prediction",
    "NetworkInfo",
    "InferResponse",
    "RouteRequest",
    "RouteInfo",
    "ServiceInfo",
    "ServiceStats",
    "ErrorBody",
    "PIXEL_TOLERANCE",
    "DEFAULT_TOP_K",
    "parse_json",
    "format_validation",
    "decode_json_body",
    "decode_binary",
    "decode_images",
    "check_pixels",
    "to_batch",
    "check_top_k",
    "infer_openapi_body",
    "body_kind",
    "decode_body",
    "echo",
]

ECHO_CHARS = 80  # at most this much of the client's own text is quoted back in a reason
PIXEL_TOLERANCE = 1e-4  # pixels this far outside [0, 1] (float rounding) are clamped; further out is an error
DEFAULT_TOP_K = 3
BINARY_TYPES = ("application/octet-stream",)
JSON_TYPES = ("", "application/json", "text/json")
FLOAT32_NAMES = ("float32", "f4", "<f4", "float")
BODY_DTYPE = np.dtype("<f4")  # the binary body: little-endian float32


class ApiError(Exception):
    """A request the API refuses: HTTP `status`, a `reason` naming what is wrong, optional extra JSON fields and
    response `headers` (e.g. Retry-After on a 503)."""

    def __init__(self, status: int, reason: str, *, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(reason)
        self.status, self.reason, self.extra, self.headers = status, reason, extra, headers

    def body(self) -> dict:
        return {"error": self.reason, **self.extra}

    @classmethod
    def of(cls, exc: CoderayError) -> ApiError:
        """coderay's domain error as the HTTP answer it gets: 404 unknown service, 422 invalid route, else 503."""
        status = next((code for kind, code in HTTP_STATUS.items() if isinstance(exc, kind)), 503)
        return cls(status, exc.reason)


HTTP_STATUS = {UnknownServiceError: 404, InvalidRouteError: 422}


# --------------------------------------------------------------------------- models (also the OpenAPI schema)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InferRequest(_Model):
    """A batch to classify: exactly one of `inputs` and `images`."""

    inputs: list[Any] | None = Field(
        None, description="pixels in [0, 1], nested lists shaped (B, C, H, W) or (B, H, W) for one-channel tasks"
    )
    images: list[str] | None = Field(None, description="base64-encoded PNG images, one per sample")
    top_k: int | None = Field(
        None,
        ge=1,
        description=f"how many classes to return per sample (default {DEFAULT_TOP_K}); the query parameter wins",
    )


class ClassScore(_Model):
    class_index: int
    class_name: str
    prob: float


class Prediction(_Model):
    class_index: int  # argmax
    class_name: str
    prob: float
    top_k: list[ClassScore]


class NetworkInfo(_Model):
    emulated: bool  # True: the delays below were added on purpose (one machine emulating the edge)
    cross_node_hops: int  # hops of this request's activations between different nodes
    delay_ms: float  # emulated delay added on those hops (0 when not emulated)
    wire_bytes: int  # bytes of activations that crossed between nodes (the wire encoding's)


class InferResponse(_Model):
    service: str
    path: str  # the path id that answered (the local-only path after a fallback)
    path_kind: str  # local, skip or coop
    fallback: bool  # True: the chosen cooperative path failed and local-only answered
    latency_ms: float  # time spent running the path (decoding and encoding excluded)
    samples: int
    predictions: list[Prediction]
    network: NetworkInfo


class RouteRequest(_Model):
    path: str = Field(
        description="a path id of this service from GET /v1/services/{svc}/paths, e.g. "
        "'digits:local' or 'digits:mnist:0:1:2:3'"
    )
    coop_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="share of requests sent on `path` when it is not local-only "
        "(the rest run local-only); default 1.0, or 0.0 for local",
    )


class RouteInfo(_Model):
    service: str
    path: str
    path_kind: str
    coop_fraction: float


class ServiceInfo(_Model):
    name: str
    task: str
    classes: list[str]
    input_shape: list[int]
    node: str
    guest_quota: int
    batch_size: int
    active_path: str
    coop_fraction: float
    pinned: bool  # True: set by PUT (or a config deploy), held until DELETE releases it
    stats: dict


class ServiceStats(TypedDict):
    """A service's cumulative request figures in one ingress replica (`ServiceInfo.stats`, the controller's sync)."""

    requests: int
    samples: int
    fallbacks: int
    retries: int
    latency_s: float
    by_path: dict[str, int]  # path id -> requests answered on it


class ErrorBody(_Model):
    error: str


# --------------------------------------------------------------------------- decoding


def echo(text: str) -> str:
    """The client's `text` as quoted in a reason: repr'd (control characters, lone surrogates escaped), cut to
    `ECHO_CHARS`, so a huge or binary header or key cannot bloat or break the error body."""
    quoted = repr(text)
    return quoted if len(quoted) <= ECHO_CHARS else f"{quoted[:ECHO_CHARS]}... ({len(text)} characters)"


def parse_json(raw: bytes) -> Any:
    """The JSON document in `raw`; 422 naming the position of a syntax error."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(
            422, "body is not UTF-8 text; send JSON, or raw float32 with Content-Type: application/octet-stream"
        ) from None
    except json.JSONDecodeError as e:
        raise ApiError(422, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ApiError(422, "malformed JSON: nested too deeply") from None
    except ValueError:  # Python refuses integer literals of more than 4300 digits (sys.get_int_max_str_digits)
        raise ApiError(422, "malformed JSON: an integer literal with too many digits") from None


def format_validation(errors: Sequence[Mapping[str, Any]]) -> str:
    """Pydantic/FastAPI validation errors as one line: `field: message; field: message` (client-chosen field
    names, such as an unknown key, are cut to `ECHO_CHARS`)."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(_field(p) for p in e.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _field(part: Any) -> str:
    text = str(part)
    return text if len(text) <= ECHO_CHARS and text.isprintable() else echo(text)


def body_kind(content_type: str | None) -> str:
    """'binary' or 'json' for a request's Content-Type (absent: JSON, as curl -d sends it); 415 otherwise, before
    any of the body is read."""
    ctype = (content_type or "application/json").split(";")[0].strip().lower()
    if ctype in BINARY_TYPES:
        return "binary"
    if ctype in JSON_TYPES or ctype.endswith("+json"):
        return "json"
    raise ApiError(
        415,
        f"Content-Type {echo(ctype)} not supported: send application/json ({{'inputs': ...}} or "
        "{'images': ...}) or application/octet-stream with X-Shape",
    )


def decode_body(
    raw: bytes, kind: str, headers: Mapping[str, str], input_shape: tuple[int, ...], *, max_samples: int
) -> tuple[torch.Tensor, int | None]:
    """(pixels (B, C, H, W), top_k from a JSON body or None): the whole decoding of an infer request's body, pure
    and blocking (the ingress runs large ones off its event loop)."""
    if kind == "binary":
        return decode_binary(raw, headers, input_shape, max_samples=max_samples), None
    return decode_json_body(raw, input_shape, max_samples=max_samples)


def decode_json_body(raw: bytes, input_shape: tuple[int, ...], *, max_samples: int) -> tuple[torch.Tensor, int | None]:
    """(pixels (B, C, H, W), top_k from the body or None) from a JSON body."""
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        raise ApiError(422, f"body must be a JSON object with 'inputs' or 'images', got {type(doc).__name__}")
    try:
        req = InferRequest.model_validate(doc)
    except ValidationError as e:
        raise ApiError(422, format_validation(e.errors())) from None
    if (req.inputs is None) == (req.images is None):
        raise ApiError(422, "give exactly one of 'inputs' (nested lists of pixels) and 'images' (base64 PNG)")
    if req.images is not None:
        return decode_images(req.images, input_shape, max_samples=max_samples), req.top_k
    assert req.inputs is not None  # exactly one of the two was given (checked above)
    return to_batch(req.inputs, input_shape, max_samples=max_samples, field="inputs"), req.top_k


def _check_count(n: int, max_samples: int, field: str) -> None:
    if n == 0:
        raise ApiError(422, f"{field}: empty batch; send at least one sample")
    if n > max_samples:
        raise ApiError(
            413,
            f"{field}: batch of {n} samples is above the limit of {max_samples} per request "
            "(serving.max_request_samples); split it",
            limit=max_samples,
        )


def _expected(input_shape: tuple[int, ...]) -> str:
    c, h, w = input_shape
    alt = f" or (B, {h}, {w})" if c == 1 else ""
    return f"(B, {c}, {h}, {w}){alt}"


def _shape_batch(arr: np.ndarray, input_shape: tuple[int, ...], field: str) -> np.ndarray:
    c, h, w = input_shape
    if arr.ndim == 3 and c == 1 and arr.shape[1:] == (h, w):
        arr = arr[:, None]  # (B, H, W) -> (B, 1, H, W)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (c, h, w):
        raise ApiError(
            422,
            f"{field}: expected a batch shaped {_expected(input_shape)}, got {tuple(arr.shape)}",
            expected=[c, h, w],
        )
    return arr


def to_batch(inputs: list, input_shape: tuple[int, ...], *, max_samples: int, field: str = "inputs") -> torch.Tensor:
    """Nested lists of numbers → a checked float32 pixel batch (B, C, H, W). The range is checked on the numbers
    as sent (float64 or int64), before the cast, so 1e300 is named as out of range, not as the inf it casts to."""
    _check_count(len(inputs), max_samples, field)
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ApiError(
            422,
            f"{field}: ragged nested lists (or nested deeper than a batch); every sample must "
            f"have the same shape, the batch {_expected(input_shape)}",
        ) from None
    if arr.dtype.kind not in "iuf":
        what = {
            "b": "booleans",
            "U": "strings",
            "S": "strings",
            "O": "null, objects, ragged lists or integers beyond 64 bits",
        }.get(arr.dtype.kind, f"values of dtype {arr.dtype}")
        raise ApiError(422, f"{field}: pixels must be numbers in [0, 1]; found {what}")
    arr = _shape_batch(arr, input_shape, field)
    return check_pixels(arr, field)


def decode_binary(
    raw: bytes, headers: Mapping[str, str], input_shape: tuple[int, ...], *, max_samples: int
) -> torch.Tensor:
    """Raw little-endian float32 + `X-Shape: B,C,H,W` (or `B,H,W`) → a checked pixel batch."""
    dtype = headers.get("x-dtype", "float32").strip().lower()
    if dtype not in FLOAT32_NAMES:
        raise ApiError(422, f"X-Dtype: unsupported dtype {echo(dtype)}; the binary body must be little-endian float32")
    text = headers.get("x-shape")
    if text is None:
        raise ApiError(
            422,
            f"X-Shape header missing: a binary body needs its shape, e.g. "
            f"'X-Shape: 8,{','.join(map(str, input_shape))}'",
        )
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ApiError(
            422,
            f"X-Shape: expected comma-separated integers such as 8,{','.join(map(str, input_shape))}, got {echo(text)}",
        ) from None
    if min(shape) < 0:
        raise ApiError(422, f"X-Shape: dimensions must be non-negative integers, got {echo(text)}")
    shape = _binary_shape(shape, input_shape, text)  # before any array exists: numpy refuses some shapes itself
    _check_count(shape[0], max_samples, "X-Shape")
    need = BODY_DTYPE.itemsize * math.prod(shape)
    if len(raw) != need:
        raise ApiError(
            422,
            f"body has {len(raw)} bytes but X-Shape {echo(text)} needs {need} (4-byte little-endian float32 per value)",
        )
    return check_pixels(np.frombuffer(raw, dtype=BODY_DTYPE).reshape(shape), "body")


def _binary_shape(shape: tuple[int, ...], input_shape: tuple[int, ...], text: str) -> tuple[int, ...]:
    """The X-Shape as (B, C, H, W), checked against the task's shape on the integers alone: a rank above
    numpy's 64 or a dimension beyond its index range would make `reshape` raise on its own terms."""
    c, h, w = input_shape
    if len(shape) == 3 and c == 1 and shape[1:] == (h, w):
        shape = (shape[0], 1, h, w)
    if len(shape) != 4 or shape[1:] != (c, h, w):
        got = f"rank {len(shape)}" if len(shape) > 8 else echo(text)
        raise ApiError(422, f"X-Shape: expected a batch shaped {_expected(input_shape)}, got {got}", expected=[c, h, w])
    return shape


def decode_images(images: list[str], input_shape: tuple[int, ...], *, max_samples: int) -> torch.Tensor:
    """Base64 PNGs of the task's size → a pixel batch; one-channel tasks read them as greyscale, three as RGB."""
    from PIL import Image

    _check_count(len(images), max_samples, "images")
    c, h, w = input_shape
    mode = {1: "L", 3: "RGB"}.get(c)
    if mode is None:
        raise ApiError(422, f"images: this service takes {c}-channel input, which PNG cannot carry; send 'inputs'")
    out = np.empty((len(images), c, h, w), dtype=np.float32)
    for i, text in enumerate(images):
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            blob = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, f"images[{i}]: not valid base64") from None
        try:
            img = Image.open(io.BytesIO(blob))
            if img.format != "PNG":
                raise ApiError(422, f"images[{i}]: expected a PNG image, got {img.format}")
            if img.size != (w, h):
                raise ApiError(
                    422, f"images[{i}]: expected {w}x{h} pixels, got {img.size[0]}x{img.size[1]}", expected=[c, h, w]
                )
            pixels = np.asarray(img.convert(mode), dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)
        except ApiError:
            raise
        except Exception:  # noqa: BLE001 — PIL raises many types (UnidentifiedImageError, DecompressionBomb...)
            raise ApiError(422, f"images[{i}]: not a readable PNG image") from None
        out[i] = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(out)


def check_pixels(arr: np.ndarray, field: str) -> torch.Tensor:
    """NaN/inf and values outside [0, 1] are errors (within `PIXEL_TOLERANCE` they are clamped). `arr` is any
    real dtype; the float32 batch is made only once the values are known to fit."""
    finite = np.isfinite(arr)
    if not finite.all():
        idx = tuple(int(v) for v in np.argwhere(~finite)[0])
        raise ApiError(422, f"{field}: pixels must be finite; found {arr[idx]} at index {list(idx)}")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
        raise ApiError(
            422,
            f"{field}: pixels must lie in [0, 1] (raw pixels, not normalised ones); "
            f"found values in [{lo:.4g}, {hi:.4g}]",
        )
    return torch.from_numpy(np.clip(arr, 0.0, 1.0).astype(np.float32))  # a copy: frombuffer arrays are read-only


def check_top_k(top_k: int | None, num_classes: int) -> int:
    k = DEFAULT_TOP_K if top_k is None else top_k
    if not 1 <= k <= num_classes:
        raise ApiError(422, f"top_k: must be between 1 and {num_classes} (the number of classes), got {k}")
    return k


def infer_openapi_body() -> dict:
    """The request body of POST /infer for /docs: the JSON model and the binary encoding."""
    schema = InferRequest.model_json_schema()
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema, "example": {"inputs": [[[0.0, 0.5], [1.0, 0.25]]], "top_k": 3}},
                "application/octet-stream": {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": "little-endian float32 pixels in [0, 1]; "
                        "shape in the X-Shape header, e.g. 8,1,28,28",
                    }
                },
            },
        }
    }
