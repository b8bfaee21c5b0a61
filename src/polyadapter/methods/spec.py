"""What a method is (``MethodSpec``) and the preset-target helper every method uses.

Kept apart from the registry in ``methods/__init__.py`` so method modules import it
without importing the registry that imports them."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
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
    # ``size(module, config, site) -> int``: how many numbers the part will hold, told
    # before anything is allocated, for methods whose size a config number sets (a rank,
    # a width, a prompt length); ``AdapterModel.plan_adapter`` refuses absurd sizes with it.
    size: Callable[[nn.Module, AdapterConfig, str], int] | None = None


# Set while a plan's parts are made for tensors read from a file, which overwrite every
# value: random initialisation would be wasted work (12 ms of an 18 MB LoRA's 70 ms
# prepare on 2 cores). A ContextVar, so a load in one thread never changes how another
# thread's new adapter starts.
_FILLED_LATER: ContextVar[bool] = ContextVar("polyadapter_parts_filled_later", default=False)


@contextmanager
def parts_filled_later():
    """Parts made inside skip their random initialisation (their tensors are loaded next)."""
    token = _FILLED_LATER.set(True)
    try:
        yield
    finally:
        _FILLED_LATER.reset(token)


def random_init_wanted() -> bool:
    """False while :func:`parts_filled_later` is on in this thread."""
    return not _FILLED_LATER.get()


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
