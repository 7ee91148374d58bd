"""The reward table: the typed rows of every candidate path, persisted as JSON and CSV, plotted as a Pareto front."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from coderay.config import NetworkSpec, RewardSpec
from coderay.reward import average_accuracy
from coderay.rows import PATH_KINDS, Row, csv_columns, row_from_dict, score

__all__ = ["RewardTable", "PATH_KINDS"]


@dataclass
class RewardTable:
    rows: list[Row]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = [r if isinstance(r, Row) else row_from_dict(r) for r in self.rows]

    def for_service(self, local: str) -> list[Row]:
        """The candidate paths of `local` (local-only, skip, cooperative): what a service may run."""
        return [r for r in self.rows if r.local == local and r.is_path]

    def baselines(self, local: str) -> list[Row]:
        """Rows of the comparison baselines (edge-early), which need the local model mirrored on a host."""
        return [r for r in self.rows if r.local == local and not r.is_path]

    @property
    def locals(self) -> list[str]:
        return sorted({r.local for r in self.rows})

    def best(self, local: str) -> Row:
        """The measured row of highest reward (the path a service should run)."""
        measured = [r for r in self.for_service(local) if r.measured]
        if not measured:
            raise ValueError(f"no measured path for service {local!r}")
        return max(measured, key=lambda r: (r.reward, r.kind == "local"))

    def row(self, path_id: str) -> Row:
        for r in self.rows:
            if r.path_id == path_id:
                return r
        raise KeyError(f"no path {path_id!r} in the reward table")

    def pareto(self, local: str) -> list[Row]:
        """Measured paths no other measured path beats on both average test accuracy and throughput."""
        # (row, accuracy, throughput); a scored row has a throughput wherever it has an accuracy
        pts = [
            (r, acc, th)
            for r in self.for_service(local)
            if (acc := r.acc_avg_test) is not None and (th := r.th_total) is not None
        ]
        front = [
            (r, th)
            for r, acc, th in pts
            if not any(o_acc >= acc and o_th >= th and (o_acc > acc or o_th > th) for _, o_acc, o_th in pts)
        ]
        return [r for r, _ in sorted(front, key=lambda p: p[1])]

    def rescored(self, reward_spec: RewardSpec, network: NetworkSpec) -> RewardTable:
        """Every row re-scored (new costs, reward shape or network): no torch, no training."""
        return RewardTable([score(r, reward_spec, network) for r in self.rows], dict(self.meta))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        doc = {"meta": self.meta, "rows": [r.to_dict() for r in self.rows]}
        (directory / "table.json").write_text(json.dumps(doc, indent=2, default=str))
        with open(directory / "table.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=csv_columns(), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(r.to_csv() for r in self.rows)

    @classmethod
    def load(cls, directory: Path) -> RewardTable:
        data = json.loads((Path(directory) / "table.json").read_text())
        return cls([row_from_dict(r) for r in data["rows"]], data.get("meta", {}))

    def format(self, local: str, *, limit: int | None = None) -> str:
        rows = sorted(
            self.for_service(local),
            key=lambda r: -(r.reward if r.reward is not None else -1 + (r.pred_reward or 0) / 1e6),
        )
        head = (
            f"{'path':<34} {'kind':<5} {'trained':<7} {'pred acc':>8} {'val acc':>7} {'test acc':>8} "
            f"{'A^av':>6} {'Th/s':>7} {'×local':>6} {'reward':>7}"
        )
        lines = [head, "-" * len(head)]
        for r in rows[:limit]:
            pruned = bool(r.get("pruned"))  # its throughput is the bound's (free links), not the path's
            lines.append(
                f"{r['path_id']:<34} {r['kind']:<5} {'pruned' if pruned else 'yes' if r['trained'] else 'no':<7} "
                f"{_f(r['pred_acc'])} {_f(r['val_acc'], 7)} {_f(r['test_acc'])} {_f(r['acc_avg_test'], 6)} "
                f"{_f(None if pruned else r['th_total'], 7, 0)} {_f(None if pruned else r['th_ratio'], 6, 2)} "
                f"{_f(r['reward'], 7, 3)}"
            )
        return "\n".join(lines)

    def plot(self, path: Path) -> Path:
        """Accuracy vs throughput of every path, one panel per local service, the Pareto front drawn."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        locals_ = self.locals
        fig, axes = plt.subplots(1, len(locals_), figsize=(6 * len(locals_), 4.5), squeeze=False)
        for ax, local in zip(axes[0], locals_):
            rows = [r for r in self.for_service(local) if r.th_total is not None]  # failed candidates: no point
            a_local = self.row(f"{local}:local")["val_acc"]
            ys = []
            for kind, marker in (("coop", "o"), ("skip", "s"), ("local", "*")):
                pts = [r for r in rows if r["kind"] == kind]
                pred = [r for r in pts if r.get("acc_avg_test") is None and r.pred_acc is not None]
                meas = [r for r in pts if r.get("acc_avg_test") is not None]
                if pred:  # A^av estimated from the stage-1 prediction
                    y = [average_accuracy(a_local, r["pred_acc"], r["th_local"], r["th_host"]) for r in pred]
                    ax.scatter(
                        [r["th_total"] for r in pred],
                        y,
                        marker=marker,
                        facecolors="none",
                        edgecolors="grey",
                        alpha=0.5,
                        label=f"{kind} (predicted)",
                    )
                if meas:
                    ys += [r["acc_avg_test"] for r in meas]
                    ax.scatter(
                        [r["th_total"] for r in meas],
                        [r["acc_avg_test"] for r in meas],
                        marker=marker,
                        s=90 if kind == "local" else 35,
                        zorder=3,
                        label=f"{kind} (measured)",
                    )
            base = self.baselines(local)
            if base:
                ax.scatter(
                    [r["th_total"] for r in base],
                    [r["acc_avg_test"] for r in base],
                    marker="x",
                    color="tab:red",
                    alpha=0.6,
                    label="edge-early baseline",
                )
            front = self.pareto(local)
            ax.plot(
                [r["th_total"] for r in front],
                [r["acc_avg_test"] for r in front],
                "k--",
                lw=1,
                label="Pareto front (measured)",
            )
            best = self.best(local)
            ax.annotate(
                f"best: {best['path_id']}",
                (best["th_total"], best["acc_avg_test"]),
                textcoords="offset points",
                xytext=(6, -14),
                fontsize=8,
            )
            ax.set_xscale("log")
            ax.set_ylim(max(0.0, min(ys) - 0.12), 1.005)
            ax.set(
                title=f"{local}: accuracy vs throughput",
                xlabel="throughput Th (samples/s, modelled; log)",
                ylabel="average accuracy A^av (test)",
            )
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _f(v: float | None, width: int = 8, digits: int = 4) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"
