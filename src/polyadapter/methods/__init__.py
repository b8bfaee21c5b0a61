"""Method registry. One module per method; each exposes ``SPEC``.

A method is data plus three functions:
- ``config_cls``: its config dataclass (``polyadapter.config.AdapterConfig`` subclass);
- ``fill_defaults(model, config)``: the config with presets resolved for this model
  (so the saved config records the concrete patterns that were used);
- ``make_part(module, config, site_name)``: the per-site ``nn.Module`` that holds this
  adapter's parameters at one site. A part implements ``apply(inner, x)``: ``inner(x)``
  computes everything beneath this adapter (the base module, or the adapter before it
  in a stack); ``apply`` returns the site's new output. Parts that can live in the base
  weights also implement ``merge(base)`` and ``unmerge(base)``.

``accepts(module)`` says which modules a site method can act on. Methods with
``level="input"`` (prompt tuning) have no sites: their part acts on the input
embeddings of the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from ..presets import model_family, preset


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    make_part: Callable[[nn.Module, AdapterConfig, str], nn.Module]
    fill_defaults: Callable[[nn.Module, AdapterConfig], AdapterConfig]
    accepts: Callable[[nn.Module], bool] | None = None
    level: str = "site"
    summary: str = ""


def with_preset_targets(model: nn.Module, config: AdapterConfig, key: str) -> AdapterConfig:
    """``config`` with ``targets`` taken from the family preset ``key`` when unset."""
    if config.targets is not None:
        return config
    patterns = preset(model, key)
    if patterns is None:
        raise ConfigError(
            f"{config.method} config: no target preset {key!r} for model type "
            f"{getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)!r} "
            f"(family {model_family(model)!r}); pass targets=[...] (module-name patterns, or 'all-linear')"
        )
    return config.replace(targets=list(patterns))


def _registry() -> dict[str, MethodSpec]:
    from . import arrow, basis, bottleneck, fusion, ia3, lora, poly, prompt, sparse
    specs = [lora.SPEC, ia3.SPEC, bottleneck.SPEC, prompt.SPEC, sparse.SPEC, fusion.SPEC, *basis.SPECS,
             arrow.SPEC, poly.SPEC]
    return {s.name: s for s in specs}


METHODS: dict[str, MethodSpec] = _registry()


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]
