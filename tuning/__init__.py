"""coderay's path search on Ray Tune: parallel, pinned, resumable, private.

    from tuning.search import run_tune_search
    table = run_tune_search(cfg)                    # a local cluster of the config's nodes
    table = run_tune_search(cfg, address="auto")    # a running cluster (`ray up cluster.yaml`)

What it does. coderay's one staged search (`coderay.search.staged_search`) runs with a Tune executor
(`tuning.search.TuneExecutor`): stage 1 is one experiment (a trial per candidate calling
`coderay.candidate.predict_path`, handed out by the search's `Frontier`: pruned as in-process), stage 2
another (a trial per selected candidate and local-only path calling `train_path`, and one per service for the
edge-early baseline). The selection, merge and table are the search's own, so the reward table is the
in-process one (same rows, same seeds, the same numbers up to float noise), saved in the same `search_dir`
with `meta["engine"] = "tune"`, links where serving loads them.

Where things run. Every Ray node carries a custom resource named after the config's node; a trial asks for
`{"CPU": 1, "<node>": 0.01}` (`tune.PlacementGroupFactory`), which pins it to that node. It computes at the
machine's speed, as the in-process search does: a node's CPU cap emulates serving capacity, and what the
throughput model reads (block profiles, link timings) is still timed inside the node's group. Tune reuses a
node's trial process for its next trial, with the services and fitted activations it loaded:
- a cooperative path `L[1..lout] → link_in → H[hin..hout] → link_out → L[lin..N]` trains on the HOST's node,
  holding the host's frozen blocks and the links (the host creates the links, per the paper);
- local-only and skip paths, and the edge-early baseline, run on the LOCAL node.

Privacy (the point of CoDE). No model parameter crosses nodes during the search. The local service's blocks
stay in a small actor pinned to the local node (`tuning.split.LocalSide`): split learning. For each batch
the host's trial sends the activation entering the local tail (link_out's output) and gets back the tail's
logits; in training it sends d loss / d logits and gets back d loss / d activation, which flows on through
link_out, the host's blocks and link_in. The local head L[1..lout] runs there too (forward only). It is the
same computation as in one process (same blocks, order and seeds): the Tune table equals the in-process one.
The host learns the local model's block shapes, profiles and accuracy (metadata the reward needs), never its
weights; the local node never sees the host's blocks or the links. Limits, stated plainly:
- the host's trial holds the local task's training samples and labels, read from coderay's data registry
  (in deployment the local node would stream them); with lout = 0, the setting the paper fixes, the raw
  input is what the local node sends to the host anyway;
- the local node's actor serves its cooperative trials a few calls at once (`tuning.split.SIDE_THREADS`), so
  trials on different hosts do not queue behind each other; the local model's share of the work (most of it
  in the demo, whose local model is the widest) runs there, and activations cross nodes (through Ray's object
  store) twice per batch;
- the edge-early baseline mirrors the local model's tail by definition; its trial runs on the local node and
  gets only the hosts' block profiles.

Resuming and failures. Experiments live under `<workdir>/tune/`; running the same search again restores
them (`Tuner.restore`): finished trials are not rerun. A trial that raises is retried twice from its last
checkpoint (the links after its last epoch); if it still fails its row says so (`error`, no reward).
"""

from tuning.search import run_tune_search

__all__ = ["run_tune_search"]
