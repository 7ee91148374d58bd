"""Architectures as *staged* models, one concern per submodule; this package re-exports the public API.

A staged model (``staged.StagedModel``) is an ``nn.Sequential`` of named stages whose forward is exactly the
composition of its stages, so a stage name is a valid cut point and blocks (``coderay.blocks``) are slices of
it. Three sources, all built by ``get_model`` (``registry``):

* Registered builders (``register_model``): ``small_cnn`` and the hand-staged ``alexnet``, ``mobilenet_v2``,
  ``resnet18`` (``hand_staged``).
* Any torchvision classification model by name (``list_torchvision_models()``), and any
  ``'package.module:function'`` returning an ``nn.Module`` (``by_name``): adapted to small inputs
  (``input_adapt.adapt_input``), then traced with torch.fx (``fx_split.trace_model``) into stages that end at
  every graph node where exactly one tensor crosses (residual-safe); N blocks are balanced by MACs.

Weights come from disk only (``weights.load_weights``). ``list_models()`` lists the registered names;
``is_known_model(name)`` accepts every name ``get_model`` builds (the config checks names with it).
"""

from coderay.models.by_name import list_torchvision_models
from coderay.models.fx_split import trace_model
from coderay.models.hand_staged import _TORCHVISION_PAIRS as _TORCHVISION_PAIRS  # registers the builders
from coderay.models.input_adapt import adapt_input
from coderay.models.registry import _REGISTRY as _REGISTRY
from coderay.models.registry import get_model, is_known_model, list_models, register_model
from coderay.models.staged import StagedModel
from coderay.models.staged import _check_input_shape as _check_input_shape
from coderay.models.weights import load_weights

__all__ = [
    "StagedModel",
    "register_model",
    "list_models",
    "list_torchvision_models",
    "is_known_model",
    "get_model",
    "trace_model",
    "adapt_input",
    "load_weights",
]
