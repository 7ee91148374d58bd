"""A path's identity: which blocks of which services it runs, and its stable id.

A cooperative path of local service L through host H is
    L[1..lout] → link_in → H[hin..hout] → link_out → L[lin..N]      (0 ≤ lout < lin ≤ N, 1 ≤ hin ≤ hout ≤ N_H)
a skip path is L[1..lout] → link → L[lin..N] with lin > lout + 1, and local-only is L[1..N].
The local tail always keeps L's classifier, so every path answers L's task. Only links train.

Torch-free, so routing and the controller name paths without loading a model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PathSpec"]


@dataclass(frozen=True, order=True)
class PathSpec:
    local: str
    lout: int = 0  # local blocks 1..lout run before the sample leaves (0: the raw input leaves)
    lin: int = 1  # local blocks lin..N run after it comes back
    host: str | None = None
    hin: int | None = None  # host blocks hin..hout carry the sample
    hout: int | None = None

    @classmethod
    def local_only(cls, local: str) -> PathSpec:
        return cls(local)

    @property
    def kind(self) -> str:
        if self.host is not None:
            return "coop"
        return "local" if self.lin == self.lout + 1 else "skip"

    @property
    def id(self) -> str:
        """Stable and URL-safe: `digits:local`, `digits:skip:0:3`, `digits:mnist:0:1:3:4` (lout:hin:hout:lin)."""
        if self.kind == "local":
            return f"{self.local}:local"
        if self.kind == "skip":
            return f"{self.local}:skip:{self.lout}:{self.lin}"
        return f"{self.local}:{self.host}:{self.lout}:{self.hin}:{self.hout}:{self.lin}"

    @classmethod
    def parse(cls, path_id: str) -> PathSpec:
        parts = path_id.split(":")
        try:
            if len(parts) == 2 and parts[1] == "local":
                return cls.local_only(parts[0])
            if len(parts) == 4 and parts[1] == "skip":
                return cls(parts[0], lout=int(parts[2]), lin=int(parts[3]))
            if len(parts) == 6:
                lout, hin, hout, lin = map(int, parts[2:])
                return cls(parts[0], lout=lout, lin=lin, host=parts[1], hin=hin, hout=hout)
        except ValueError:
            pass
        raise ValueError(
            f"not a path id: {path_id!r}; expected 'SVC:local', 'SVC:skip:LOUT:LIN' or 'SVC:HOST:LOUT:HIN:HOUT:LIN'"
        )

    def validate(self, n_local: int, n_host: int | None = None) -> None:
        if not 0 <= self.lout < self.lin <= n_local:
            raise ValueError(f"{self.id}: need 0 ≤ lout < lin ≤ {n_local}")
        if self.host is not None and (n_host is None or not 1 <= (self.hin or 0) <= (self.hout or 0) <= n_host):
            raise ValueError(f"{self.id}: need 1 ≤ hin ≤ hout ≤ {n_host}")

    def __str__(self) -> str:
        if self.kind == "local":
            return f"{self.local}[1..N]"
        head = f"{self.local}[1..{self.lout}] → " if self.lout else "input → "
        mid = f"link → {self.host}[{self.hin}..{self.hout}] → link" if self.host else "link"
        return f"{head}{mid} → {self.local}[{self.lin}..N]"
