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

import dataclasses

from ..config import AdapterConfig
from ..errors import ConfigError
from .spec import MethodSpec, with_preset_targets  # noqa: F401  (re-exported)


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


def config_from_dict(data: dict, where: str = "config") -> AdapterConfig:
    """Build a method config from a JSON-like dict, refusing unknown methods and keys,
    values of the wrong type and non-finite numbers; errors name ``where`` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {type(data).__name__}")
    data = dict(data)
    method = data.pop("method", None)
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}; known methods: {sorted(METHODS)}")
    cls = METHODS[method].config_cls
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for method {method!r}; allowed: {sorted(allowed)}")
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
