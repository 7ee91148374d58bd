"""Links: the small trainable adapters that join one block's output to another block's input.

A link is shaped from block metadata, never guessed: conv→conv is resize + norm + 1×1 conv, conv→flat is a
small pooled grid + norm + linear, flat→flat is norm + linear; each ends in a ReLU when the block it feeds
expects post-activation (non-negative) input. flat→conv is not offered: no path needs to turn a vector back
into a feature map, and such a link would be larger than the blocks it bridges.

Links start from a ridge least-squares fit on paired activations (what the receiving block would have
seen), so a link is useful before its first gradient step: the search's cheap stage-1 predictor.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Link", "link_kind", "match_image", "save_links", "load_links"]

Shape = tuple[int, ...]
_MAX_ROWS = 200_000


def link_kind(src: Shape, dst: Shape) -> str:
    """'conv→conv', 'conv→flat' or 'flat→flat'; ValueError for shapes no link joins."""
    kinds = {(3, 3): "conv→conv", (3, 1): "conv→flat", (1, 1): "flat→flat"}
    kind = kinds.get((len(src), len(dst)))
    if kind is None:
        raise ValueError(f"no link from shape {src} to {dst}: links join conv→conv, conv→flat or flat→flat")
    return kind


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool down, bilinear up: the cheap spatial match between feature maps."""
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def match_image(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    """An image batch resized and channel-matched to `shape` (C, H, W): grey→RGB repeats, RGB→grey averages."""
    x = _resize(x, tuple(shape[1:]))
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
        self.capacity = capacity if len(dst) == 3 else "1x1"     # wider links only where a feature map is made
        self.refine = _refinement(self.capacity, dst[0]) if self.capacity != "1x1" else None
        if self.kind == "conv→conv":
            self.norm = nn.BatchNorm2d(src[0])
            self.proj = nn.Conv2d(src[0], dst[0], kernel_size=1)
        else:
            self.grid = grid if self.kind == "conv→flat" else 1
            features = src[0] * self.grid**2
            self.norm = nn.BatchNorm1d(features)
            self.proj = nn.Linear(features, dst[0])
        self.act = nn.ReLU() if relu else nn.Identity()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv→conv":
            return _resize(x, self.dst[1:])                              # (B, C_src, H_dst, W_dst)
        if self.kind == "conv→flat":
            return F.adaptive_avg_pool2d(x, self.grid).flatten(1)       # (B, C_src·g·g)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.norm(self._features(x)))
        if self.refine is not None:
            y = y + self.refine(y)
        return self.act(y)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_lstsq(self, src: torch.Tensor, dst: torch.Tensor, *, ridge: float = 1e-3) -> float:
        """Fit norm statistics and the projection by ridge least squares so that link(src) ≈ dst.

        Returns the relative residual ‖link(src) − dst‖ / ‖dst‖ of the fit.
        """
        feats = self._features(src)
        dims = (0, 2, 3) if feats.dim() == 4 else (0,)
        mean, var = feats.mean(dims), feats.var(dims, unbiased=False)
        self.norm.running_mean.copy_(mean)
        self.norm.running_var.copy_(var)
        self.norm.weight.fill_(1.0)
        self.norm.bias.zero_()
        z = (feats - _bcast(mean, feats)) / torch.sqrt(_bcast(var, feats) + self.norm.eps)
        if z.dim() == 4:                                                 # rows are pixels: (B·H·W, C)
            x_rows, y_rows = z.permute(0, 2, 3, 1).flatten(0, 2), dst.permute(0, 2, 3, 1).flatten(0, 2)
        else:
            x_rows, y_rows = z, dst
        if len(x_rows) > _MAX_ROWS:
            keep = torch.randperm(len(x_rows), generator=torch.Generator().manual_seed(0))[:_MAX_ROWS]
            x_rows, y_rows = x_rows[keep], y_rows[keep]
        x1 = torch.cat([x_rows, torch.ones(len(x_rows), 1)], 1).double()
        gram = x1.T @ x1 + ridge * len(x1) * torch.eye(x1.shape[1], dtype=torch.float64)
        sol = torch.linalg.solve(gram, x1.T @ y_rows.double()).float()   # (C_in + 1, C_out)
        weight, bias = sol[:-1].T, sol[-1]
        self.proj.weight.copy_(weight.reshape(self.proj.weight.shape))
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
        branch = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.ReLU(),
                               nn.Conv2d(channels, channels, 1))
    elif capacity == "bottleneck":
        mid = max(8, channels // 4)
        branch = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.ReLU(), nn.Conv2d(mid, mid, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(mid, channels, 1))
    else:
        raise ValueError(f"unknown link capacity {capacity!r}; expected '1x1', '3x3' or 'bottleneck'")
    nn.init.zeros_(branch[-1].weight)
    nn.init.zeros_(branch[-1].bias)
    return branch


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1) if like.dim() == 4 else v.view(1, -1)


def save_links(module: nn.Module, directory: Path) -> Path:
    """A path's links (`module.spec`, `module.links`) with what rebuilds them: all the serving side needs."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module.spec.id.replace(':', '__')}.pt"
    torch.save({"path_id": module.spec.id, "link_out": module.link_out, "encoding": module.encoding,
                "links": {k: {"src": l.src, "dst": l.dst, "relu": isinstance(l.act, nn.ReLU), "capacity": l.capacity,
                              "state": l.state_dict()} for k, l in module.links.items()}}, path)
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
