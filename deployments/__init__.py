"""Serving coderay on Ray Serve: frozen block groups and links pinned to their nodes, paths chained over HTTP.

Modules: `schemas` (HTTP models, input decoding), `routing` (path plans, the live routing map), `placement`
(node pinning, CPU shares), `blocks` (block-group deployment), `links` (link deployment), `ingress` (FastAPI),
`app` (build / deploy / Serve config / `coderay serve`). Import from the modules; this package imports nothing
heavy so `deployments.schemas` stays usable without Ray Serve started.
"""

__all__ = ["app", "blocks", "ingress", "links", "placement", "routing", "schemas"]
