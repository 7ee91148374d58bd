"""Links: the small trainable adapters that join one block's output to another block's input.

A link is shaped from the boundary metadata (the per-sample shapes that ``coderay.blocks.profile_blocks``
records), never guessed. A boundary is one of three layouts:

* ``conv``: a feature map ``(C, H, W)``;
* ``tokens``: a sequence ``(T, D)`` as between transformer layers (ViT, with a class token first when T − 1
  is a square; Swin-style maps are ``conv`` already);
* ``flat``: a vector ``(F,)``.

Every link is *spatial match → norm → projection of channels*, ending in a ReLU when the block it feeds
expects non-negative input. The spatial match works on a grid: a feature map is one, a token sequence is
laid out as its √T × √T patch grid (the class token dropped) or as a 1 × T row when T is not a square.

* to ``conv`` (C', H', W'): the grid resized to H' × W' (average-pool down, bilinear up), 1×1 conv C → C';
* to ``tokens`` (T', D'): the grid resized to the target's patch grid and flattened, the grid's mean
  prepended as the class token when the target has one, per-token linear D → D';
* to ``flat`` (F'): the grid average-pooled to 2 × 2 and flattened, linear C·4 → F'; flat → flat is linear.

A flat vector has no grid, so flat → conv and flat → tokens are not offered: no path needs to turn a vector
back into a feature map, and such a link would be larger than the blocks it bridges.

Links start from a ridge least-squares fit on paired activations (what the receiving block would have
seen), so a link is useful before its first gradient step: the search's cheap stage-1 predictor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from coderay.paths import PathModule

__all__ = ["Link", "link_kind", "layout", "match_image", "save_links", "load_links"]

Shape = tuple[int, ...]
_MAX_ROWS = 200_000
_LAYOUTS = {3: "conv", 2: "tokens", 1: "flat"}


def layout(shape: Shape) -> str:
    """'conv' for (C, H, W), 'tokens' for (T, D), 'flat' for (F,); ValueError for anything else."""
    kind = _LAYOUTS.get(len(tuple(shape)))
    if kind is None or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(
            f"no link layout for shape {tuple(shape)}: expected (C, H, W), (T, D) or (F,) of positive ints"
        )
    return kind


def link_kind(src: Shape, dst: Shape) -> str:
    """'conv→conv', 'conv→tokens', 'tokens→flat', ...: the layouts a link joins; ValueError for flat→conv/tokens."""
    a, b = layout(src), layout(dst)
    if a == "flat" and b != "flat":
        raise ValueError(
            f"no link from shape {tuple(src)} to {tuple(dst)}: a flat vector has no grid to make a "
            f"{b} boundary from (links join conv/tokens → anything, flat → flat)"
        )
    return f"{a}→{b}"


def _patch_grid(tokens: int) -> tuple[tuple[int, int], bool]:
    """The (h, w) patch grid of a token sequence and whether a class token comes first."""
    for cls in (False, True):
        side = math.isqrt(tokens - cls)
        if tokens - cls > 0 and side * side == tokens - cls:
            return (side, side), cls
    return (1, tokens), False


def _as_grid(x: torch.Tensor, kind: str) -> torch.Tensor:
    """A conv map as is; a token batch (B, T, D) as its patch grid (B, D, h, w)."""
    if kind == "conv":
        return x
    (h, w), cls = _patch_grid(x.shape[1])
    patches = x[:, 1:] if cls else x  # (B, h·w, D)
    return patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)  # (B, D, h, w)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool down, bilinear up: the cheap spatial match between feature maps."""
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def match_image(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    """An image batch resized and channel-matched to `shape` (C, H, W): grey→RGB repeats, RGB→grey averages."""
    x = _resize(x, (shape[1], shape[2]))
    c_in, c_out = x.shape[1], shape[0]
    if c_in == c_out:
        return x
    if c_in == 1:
        return x.expand(-1, c_out, -1, -1)
    return x.mean(1, keepdim=True).expand(-1, c_out, -1, -1)


class Link(nn.Module):
    """A trainable adapter from activations of shape `src` to activations of shape `dst` (per sample)."""

    def __init__(self, src: Shape, dst: Shape, *, relu: bool, grid: int = 2, capacity: str = "1x1"):
        super().__init__()
        self.src, self.dst, self.kind = tuple(src), tuple(dst), link_kind(src, dst)
        self.capacity = capacity if len(dst) == 3 else "1x1"  # wider links only where a feature map is made
        self.refine = _refinement(self.capacity, dst[0]) if self.capacity != "1x1" else None
        self._from, self._to = self.kind.split("→")
        channels = src[0] if self._from != "tokens" else src[1]
        self.norm: nn.BatchNorm1d | nn.BatchNorm2d
        self.proj: nn.Conv1d | nn.Conv2d | nn.Linear
        if self._to == "conv":
            self.norm = nn.BatchNorm2d(channels)
            self.proj = nn.Conv2d(channels, dst[0], kernel_size=1)
        elif self._to == "tokens":
            self.norm = nn.BatchNorm1d(channels)
            self.proj = nn.Conv1d(channels, dst[1], kernel_size=1)  # per-token linear
        else:
            self.grid = grid if self._from != "flat" else 1
            features = channels * self.grid**2
            self.norm = nn.BatchNorm1d(features)
            self.proj = nn.Linear(features, dst[0])
        self.act = nn.ReLU() if relu else nn.Identity()

    def _upsamples(self, x: torch.Tensor) -> bool:
        """conv/tokens → conv onto a larger map: project at the source size, then resize the (fewer) output
        channels. Bilinear weights sum to one, so this is the same function as resize-then-project in eval
        mode (norm and projection are per-pixel affine), at a fraction of the cost."""
        if self._to != "conv" or self._from == "flat":
            return False
        h, w = _as_grid(x[:1], self._from).shape[-2:]
        return h * w < self.dst[1] * self.dst[2]

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Source activations spatially matched to the target (kept at source size when upsampling), channels first."""
        if self._from == "flat":
            return x  # (B, F)
        grid = _as_grid(x, self._from)  # (B, C, h, w)
        if self._to == "conv":
            return grid if self._upsamples(x) else _resize(grid, self._dst_hw)  # (B, C, H_dst, W_dst) or (B, C, h, w)
        if self._to == "flat":
            return F.adaptive_avg_pool2d(grid, self.grid).flatten(1)  # (B, C·g·g)
        (h, w), cls = _patch_grid(self.dst[0])
        seq = _resize(grid, (h, w)).flatten(2)  # (B, C, h·w)
        if cls:
            seq = torch.cat([seq.mean(2, keepdim=True), seq], 2)  # (B, C, 1 + h·w): the class token
        return seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.norm(self._features(x)))
        if self._upsamples(x):
            y = _resize(y, self._dst_hw)  # (B, C_dst, H_dst, W_dst)
        if self.refine is not None:
            y = y + self.refine(y)  # conv targets only
        if self._to == "tokens":
            y = y.transpose(1, 2)  # (B, T_dst, D_dst)
        return self.act(y)

    @property
    def _dst_hw(self) -> tuple[int, int]:
        """(H, W) of a conv target."""
        return self.dst[1], self.dst[2]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_lstsq(self, src: torch.Tensor, dst: torch.Tensor, *, ridge: float = 1e-3) -> float:
        """Fit norm statistics and the projection by ridge least squares so that link(src) ≈ dst.

        Returns the relative residual ‖link(src) − dst‖ / ‖dst‖ of the fit.
        """
        feats = self._features(src)
        target = dst
        if self._upsamples(src):  # fit at the source size, against the target averaged down to it
            target = _resize(dst, (feats.shape[-2], feats.shape[-1]))
        dims = {4: (0, 2, 3), 3: (0, 2), 2: (0,)}[feats.dim()]
        mean, var = feats.mean(dims), feats.var(dims, unbiased=False)
        # BatchNorm tracks running statistics by default, and these norms are built with the default
        assert self.norm.running_mean is not None and self.norm.running_var is not None
        self.norm.running_mean.copy_(mean)
        self.norm.running_var.copy_(var)
        self.norm.weight.fill_(1.0)
        self.norm.bias.zero_()
        z = (feats - _bcast(mean, feats)) / torch.sqrt(_bcast(var, feats) + self.norm.eps)
        if z.dim() == 4:  # rows are pixels: (B·H·W, C)
            x_rows, y_rows = z.permute(0, 2, 3, 1).flatten(0, 2), target.permute(0, 2, 3, 1).flatten(0, 2)
        elif z.dim() == 3:  # rows are tokens: (B·T, C)
            x_rows, y_rows = z.transpose(1, 2).flatten(0, 1), target.flatten(0, 1)
        else:
            x_rows, y_rows = z, target
        if len(x_rows) > _MAX_ROWS:
            keep = torch.randperm(len(x_rows), generator=torch.Generator().manual_seed(0))[:_MAX_ROWS]
            x_rows, y_rows = x_rows[keep], y_rows[keep]
        x1 = torch.cat([x_rows, torch.ones(len(x_rows), 1)], 1).double()
        gram = x1.T @ x1 + ridge * len(x1) * torch.eye(x1.shape[1], dtype=torch.float64)
        sol = torch.linalg.solve(gram, x1.T @ y_rows.double()).float()  # (C_in + 1, C_out)
        weight, bias = sol[:-1].T, sol[-1]
        self.proj.weight.copy_(weight.reshape(self.proj.weight.shape))
        assert self.proj.bias is not None  # every projection is built with a bias
        self.proj.bias.copy_(bias)
        was_training = self.training
        self.eval()
        residual = (self(src) - dst).norm() / dst.norm().clamp_min(1e-12)
        self.train(was_training)
        return residual.item()


def _refinement(capacity: str, channels: int) -> nn.Module:
    """A residual branch on the projected feature map whose last layer starts at zero, so the link starts
    as its least-squares fit: '3x3' depthwise 3×3 + 1×1 mix; 'bottleneck' 1×1 → 3×3 → 1×1 at C/4."""
    if capacity == "3x3":
        head: list[nn.Module] = [nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.ReLU()]
        last = nn.Conv2d(channels, channels, 1)
    elif capacity == "bottleneck":
        mid = max(8, channels // 4)
        head = [nn.Conv2d(channels, mid, 1), nn.ReLU(), nn.Conv2d(mid, mid, 3, padding=1), nn.ReLU()]
        last = nn.Conv2d(mid, channels, 1)
    else:
        raise ValueError(f"unknown link capacity {capacity!r}; expected '1x1', '3x3' or 'bottleneck'")
    assert last.bias is not None  # built with a bias
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*head, last)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def save_links(module: PathModule, directory: Path) -> Path:
    """A path's links (`module.spec`, `module.links`) with what rebuilds them: all the serving side needs."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module.spec.id.replace(':', '__')}.pt"
    torch.save(
        {
            "path_id": module.spec.id,
            "link_out": module.link_out,
            "encoding": module.encoding,
            "links": {
                k: {
                    "src": link.src,
                    "dst": link.dst,
                    "relu": isinstance(link.act, nn.ReLU),
                    "capacity": link.capacity,
                    "state": link.state_dict(),
                }
                for k, link in module.links.items()
            },
        },
        path,
    )
    return path


def load_links(path: str | Path) -> tuple[str, dict[str, Link]]:
    """(path id, {name: link in eval mode}) from a file `save_links` wrote."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    links = {}
    for k, d in blob["links"].items():
        links[k] = Link(tuple(d["src"]), tuple(d["dst"]), relu=d["relu"], capacity=d.get("capacity", "1x1"))
        links[k].load_state_dict(d["state"])
        links[k].eval()
    return blob["path_id"], links
