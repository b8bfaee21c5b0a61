"""Finding sites by name pattern, and wrapping each site once.

A *site* is a module of the base model where adapters act. It is replaced in its
parent by a :class:`Site` that keeps the original module as ``site.base`` and holds
any number of adapters' per-site parts in ``site.adapters``. Site names are always the
module names of the unwrapped model, so patterns, files and errors never see the
wrapper's extra ``.base`` level.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Callable, Iterator

from torch import nn

from .compose import apply_setup
from .errors import TargetError
from .mixed import Layout, apply_rows, lean_rows

try:  # Hugging Face's transposed linear layer (GPT-2), which stores its weight as (in, out)
    from transformers.pytorch_utils import Conv1D
    LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)
except ImportError:  # pragma: no cover - transformers is a dependency
    LINEAR_TYPES = (nn.Linear,)


class Site(nn.Module):
    """One wrapped module. Runs the base, then the active setup's adapters present here.

    ``state`` is the model's shared :class:`~polyadapter.state.AdapterState`, kept
    out of the module tree. With one setup for the whole batch the site evaluates it
    with :func:`~polyadapter.compose.apply_setup`; for a mixed batch (``state.rows``)
    with :func:`~polyadapter.mixed.apply_rows`, which reads this site's :meth:`layout`:
    its *banks*, the stacked weights of every adapter of one kind here, cached until
    they change.
    """

    def __init__(self, base: nn.Module, name: str, state):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        object.__setattr__(self, "site_name", name)
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "_layout", None)

    def forward(self, x, *args, **kwargs):
        rows = self.state.rows
        if rows is not None:
            y = lean_rows(rows, self, x, args, kwargs)
            if y is not None:
                return y
        call = partial(_call_module, args, kwargs)
        inner = partial(call, self.base)
        if rows is not None:
            return apply_rows(rows, self, inner, x, call)
        return apply_setup(self.state.setup, self, inner, x, call)

    def layout(self):
        """This site's adapters grouped into banks (see :class:`polyadapter.mixed.Layout`),
        rebuilt only when adapters are added, removed, merged or unmerged here."""
        # The parts themselves, not just their names: an adapter removed and added again
        # under the same name must not keep the old one's bank (the key holds the parts,
        # so their ids cannot be reused while it is cached).
        key = (tuple(self.adapters.items()), tuple(self.merged))
        cached = self._layout
        if cached is None or cached.key != key:
            cached = Layout.build(self, key)
            object.__setattr__(self, "_layout", cached)
        return cached

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, merged={self.merged}"


def _call_module(args, kwargs, module, x):
    return module(x, *args, **kwargs)


def iter_sites_and_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield (canonical name, module) for every module, looking through Site wrappers."""
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        yield from iter_sites_and_modules(child.base if isinstance(child, Site) else child, name)


def base_module(module):
    """The module a Site wraps, else ``module`` itself (also for None)."""
    return module.base if isinstance(module, Site) else module


def original_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical name -> the original (unwrapped) module."""
    return {n: base_module(m) for n, m in iter_sites_and_modules(model)}


def sites_of(model: nn.Module) -> dict[str, Site]:
    return {n: m for n, m in iter_sites_and_modules(model) if isinstance(m, Site)}


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    parent = model
    for part in parts[:-1]:
        parent = getattr(parent, part)
        if isinstance(parent, Site):
            parent = parent.base
    return parent, parts[-1]


def original_or_site(model: nn.Module, name: str) -> nn.Module:
    """What sits at canonical ``name`` now: its Site when wrapped, else the module."""
    parent, attr = _parent_and_attr(model, name)
    return getattr(parent, attr)


def wrap(model: nn.Module, name: str, state) -> Site:
    """Wrap the module at canonical ``name`` (idempotent) and return its Site."""
    parent, attr = _parent_and_attr(model, name)
    current = getattr(parent, attr)
    if isinstance(current, Site):
        return current
    site = Site(current, name, state)
    site.training = site.adapters.training = current.training  # new Modules start in train mode; not in an eval model
    setattr(parent, attr, site)
    return site


def unwrap(model: nn.Module, name: str) -> nn.Module:
    """Put the original module back in place of its Site and return it."""
    parent, attr = _parent_and_attr(model, name)
    current = getattr(parent, attr)
    if not isinstance(current, Site):
        return current
    setattr(parent, attr, current.base)
    return current.base


def matches(name: str, pattern: str) -> bool:
    """Pattern rule: exact name, dotted suffix, or ``re:<regex>`` matched in full."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def matches_any(name: str, patterns: list[str]) -> bool:
    return any(matches(name, p) for p in patterns)


def pattern_value(patterns: dict | None, name: str, default):
    """The value of the first key of ``patterns`` that matches ``name``, else ``default``."""
    for key, value in (patterns or {}).items():
        if matches(name, key):
            return value
    return default


def _output_layer_names(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    out = base_module(getter()) if callable(getter) else None  # wrapped while another adapter acts on it
    return {n for n, m in modules.items() if out is not None and m is out}


def resolve_targets(
    model: nn.Module,
    patterns: list[str],
    accepts: Callable[[nn.Module], bool],
    what: str,
    exclude: set[str] = frozenset(),
    modules: dict[str, nn.Module] | None = None,
) -> list[str]:
    """Canonical names of modules matched by ``patterns`` that ``accepts`` admits.

    Raises TargetError when a pattern matches nothing (listing names that exist) or
    when it matches only modules of a kind the method cannot act on. ``modules``:
    ``original_modules(model)`` when the caller has it already.
    """
    modules = original_modules(model) if modules is None else modules
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise TargetError(f"{what}: target pattern {p!r} is not a valid regular expression: {e}") from None
    chosen: list[str] = []
    for pattern in patterns:
        if pattern == "all-linear":
            skip = _output_layer_names(model, modules) | set(exclude)
            hits = [n for n, m in modules.items() if isinstance(m, LINEAR_TYPES) and n not in skip]
            if not hits:
                raise TargetError(f"{what}: 'all-linear' found no Linear layers (besides the output layer)")
        else:
            hits = [n for n in modules if matches(n, pattern)]
            if not hits:
                raise TargetError(
                    f"{what}: target pattern {pattern!r} matches no module. "
                    f"Some module names that exist: {_sample_names(modules)}"
                )
            admitted = [n for n in hits if accepts(modules[n])]
            if not admitted:
                kinds = sorted({type(modules[n]).__name__ for n in hits})
                raise TargetError(
                    f"{what}: target pattern {pattern!r} matches {len(hits)} module(s) "
                    f"(e.g. {hits[0]!r}) but none of a kind this method can act on; found {kinds}"
                )
            hits = admitted
        chosen.extend(n for n in hits if n not in chosen)
    return chosen


def _sample_names(modules: dict[str, nn.Module], k: int = 12) -> list[str]:
    # Leaf-ish names are the useful ones; show a spread rather than the first few.
    names = [n for n, m in modules.items() if not any(True for _ in m.children())] or list(modules)
    step = max(1, len(names) // k)
    return names[::step][:k]


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape  # Conv1D stores the weight as (in, out)
    return in_f, out_f


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a module: its own for Linear-like layers, else
    the first Linear-like layer's input and the last one's output (e.g. an MLP block)."""
    if isinstance(module, LINEAR_TYPES):
        return linear_dims(module)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    linears = [m for m in module.modules() if isinstance(m, LINEAR_TYPES)]
    if not linears:
        raise TargetError(f"cannot tell the input and output width of {type(module).__name__}: it has no Linear layers")
    return linear_dims(linears[0])[0], linear_dims(linears[-1])[1]
