"""Serving coderay on Ray Serve: frozen block groups and links pinned to their nodes, paths chained over HTTP.

Modules: `schemas` (HTTP models, input decoding), `routing` (what travels between replicas, the emulated hop),
`placement` (node pinning, CPU shares), `blocks` (block-group deployment, with the links on its node), `merging`
(requests on one path sharing a chain), `chains` (running a path: deadline, retries, fallback), `sync` (the
ingress's side of the controller), `ingress` (FastAPI: the HTTP surface), `app` (build / deploy / Serve config /
`coderay serve`), `manifests` (launch files). Import from the modules; this package imports nothing heavy so
`deployments.schemas` stays usable without Ray Serve started.
"""

__all__ = [
    "app",
    "blocks",
    "chains",
    "ingress",
    "manifests",
    "merging",
    "placement",
    "routing",
    "schemas",
    "sync",
]
