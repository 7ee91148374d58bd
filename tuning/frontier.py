"""Stage 1's pruning on Tune: a `Searcher` that hands out trials from a `coderay.search.Frontier`.

Tune asks the searcher for a trial whenever it could start one. Candidates leave the frontier best reward bound
first, and only while their bound beats their service's bar; every finished prediction raises the bar, so
fewer candidates are predicted than with one experiment of every trial. A trial waits on its node's CPU (it is
pinned there), so the searcher hands out only candidates whose node has room: the next best bound on a busy
node never holds back an idle one. Pruning stays exact in that order too, since a bar only rises. Each node
gets one trial more than it can run, waiting: Tune hands a finished trial's process (`reuse_actors`, with the
services it loaded) only to a trial already waiting for its resources, and stops it otherwise, so without one
every trial would start a new process (imports and data, ~20 s on a busy machine).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence

from ray.tune.search import Searcher

from coderay.pathspec import PathSpec
from coderay.rows import Row
from coderay.search import Frontier

__all__ = ["FrontierSearcher"]


class FrontierSearcher(Searcher):
    """`first` (local-only paths: outside the frontier) go first, then the frontier's candidates; FINISHED once
    nothing is left. `cands`: each path's trial candidate (its node and CPUs); `node_of`: edge server → the Ray
    node it runs on; `slots`: trials each Ray node runs at once. Pickled with the experiment, so a resumed search
    goes on from the same state."""

    def __init__(
        self,
        frontier: Frontier,
        first: Sequence[PathSpec],
        cands: Mapping[str, dict],
        node_of: Mapping[str, str],
        slots: Mapping[str, int],
    ):
        super().__init__()
        self.frontier, self.first = frontier, list(first)
        self.cands, self.node_of, self.slots = dict(cands), dict(node_of), dict(slots)
        self.running: dict[str, dict] = {}  # trial id → its candidate
        self.total = len(self.first) + len(frontier)  # trials at most: none pruned

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the space is the frontier's; Tune's param space holds only the config

    def _fits(self, spec: PathSpec) -> bool:
        """Whether `spec`'s Ray node has a slot, or none waiting yet, for its trial."""
        node = self.node_of[self.cands[spec.id]["node"]]
        return sum(self.node_of[c["node"]] == node for c in self.running.values()) <= self.slots[node]

    def suggest(self, trial_id: str) -> dict | None:
        spec = next((s for s in self.first if self._fits(s)), None)
        if spec is not None:
            self.first.remove(spec)
        else:
            spec = self.frontier.next(accept=self._fits)
        if spec is None:
            done = not self.first and not len(self.frontier)
            return Searcher.FINISHED if done else None  # type: ignore[return-value]  # Tune's word for done
        self.running[trial_id] = self.cands[spec.id]
        return {"cand": self.cands[spec.id]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """A trial is done (a failing one only after its last retry): its node has room again, and its
        prediction raises its service's bar."""
        cand = self.running.pop(trial_id, None)
        if cand is not None and result and not error:  # a trial's last report: its predicted reward
            self.frontier.record(Row.of(PathSpec.parse(cand["path_id"]), pred_reward=result.get("reward")))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
