"""The link deployment: the trained links of every path whose links a service's node runs.

A cooperative path's link_in runs on the host's node (the host creates the links), its link_out on the host's
or the local node (the row's `link_out_on`); a skip path's link on the local node. Each link set loads the whole
links file of every path it runs a link of. Loaded inside the replica from the reward table's `links_file`s (`coderay.links.load_links`).
"""
from __future__ import annotations

import asyncio
import logging

import torch
from ray import serve

from coderay.config import CoderayConfig
from coderay.links import load_links
from coderay.paths import to_wire

from coderay.emulation import work_as

from deployments.placement import capacity_info, replica_location, torch_threads
from deployments.routing import Activation, hop_delay_s

__all__ = ["LinkSet"]

log = logging.getLogger(__name__)


@serve.deployment
class LinkSet:
    """Links of the paths in `files` ({path id: links file}), on `service`'s node."""

    def __init__(self, cfg: CoderayConfig, service: str, files: dict[str, str]):
        self.cfg, self.service, self.node = cfg, service, cfg.service(service).node
        torch_threads(1)
        self.cap = work_as(cfg, self.node)            # shares the node's CPU quota with its block group
        self.links = {}
        for path_id, file in files.items():
            stored_id, links = load_links(file)
            if stored_id != path_id:
                raise ValueError(f"{file} holds the links of {stored_id!r}, not {path_id!r}: the reward table "
                                 "and the links directory disagree; rerun the search")
            self.links[path_id] = links
        self.calls = 0
        log.info("links on %s (%s): %s", self.node, service, sorted(self.links))

    async def run(self, a: Activation, path_id: str, link: str, send: str | None = None) -> Activation:
        """The path's link `link` on `a`; `send`: the wire encoding of the output for a next hop elsewhere."""
        try:
            module = self.links[path_id][link]
        except KeyError:
            raise ValueError(f"links-{self.service} has no {link!r} link for {path_id!r}; it holds "
                             f"{sorted(self.links)}") from None
        self.calls += 1
        delay = hop_delay_s(self.cfg, a.node, self.node, a.x.nbytes)
        if delay:
            await asyncio.sleep(delay)
        with torch.inference_mode():
            y = module(a.x.float())
        return a.moved(to_wire(y, send) if send else y, self.node, delay_s=delay, crossed=a.node != self.node)

    def info(self) -> dict:
        return {"deployment": f"links-{self.service}", "service": self.service, **replica_location(self.node),
                "torch_threads": torch.get_num_threads(), "paths": sorted(self.links),
                "capacity": capacity_info(self.cfg, self.cap),
                "stats": {"calls": self.calls}}
