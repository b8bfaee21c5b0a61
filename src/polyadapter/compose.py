"""Setups: what is active for a forward pass, and how a site evaluates it.

A setup is an adapter name or a tree of composition blocks (AdapterHub's names):

- ``Stack("en", "ner")``: adapters in sequence; the first acts nearest the base.
- ``Parallel("a", "b")``: the whole batch runs once per child, side by side in one
  pass; the model returns one output per child.
- ``Fuse("a", "b", "c")``: AdapterFusion — a trained fusion adapter attends over the
  children's outputs at every site (``FusionConfig`` makes one).
- ``Average("a", "b", weights=[0.7, 0.3])``: weighted sum of the children's outputs.
- ``BatchSplit("a", "b", batch_sizes=[2, 3])``: the first 2 rows use "a", the next 3 "b".

A *mixed batch* gives every row its own setup (``adapter_names=[...]`` on forward and
generate); ``BatchSplit`` is a shorthand for one.

Nesting rules (each refusal says which nesting and why): ``Parallel`` and
``BatchSplit`` act on the batch's rows, so they only stand at the top of a setup,
never inside another block or as one row's setup; ``Fuse`` attends over adapter
outputs, so its children are adapter names; prompt adapters act on the model's
inputs, so they may only appear as names or inside a ``Stack`` — not inside
``Average``, ``Fuse`` or ``Parallel``, where they would have to be averaged at a site.
"""
from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Union

import torch

from .errors import AdapterNameError, ConfigError


def _children(items) -> tuple:
    if len(items) == 1 and isinstance(items[0], (list, tuple)):
        items = tuple(items[0])
    return tuple(items)


class Block:
    """Base of composition blocks; ``children`` are names or blocks."""

    children: tuple

    def __repr__(self) -> str:
        inner = ", ".join(repr(c) for c in self.children)
        return f"{type(self).__name__}({inner}{self._extra()})"

    def _extra(self) -> str:
        return ""

    def __eq__(self, other):
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self):
        return hash((type(self).__name__, self.children, self._extra()))


class Stack(Block):
    def __init__(self, *children):
        self.children = _children(children)


class Parallel(Block):
    def __init__(self, *children):
        self.children = _children(children)


class Average(Block):
    def __init__(self, *children, weights=None):
        self.children = _children(children)
        n = len(self.children)
        if weights is None:
            weights = [1.0 / n] * n if n else []
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
            raise ConfigError(f"Average weights must be a list of numbers; found {weights!r}")
        weights = list(weights)
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)]
        if bad:
            raise ConfigError(f"Average weights must be finite numbers; found {bad[0]!r} in {weights!r}")
        self.weights = tuple(float(w) for w in weights)

    def _extra(self) -> str:
        return f", weights={list(self.weights)}"


class Fuse(Block):
    """``fusion``: name of the fusion adapter; found from the children when omitted."""

    def __init__(self, *children, fusion: str | None = None):
        self.children = _children(children)
        self.fusion = fusion

    def _extra(self) -> str:
        return f", fusion={self.fusion!r}" if self.fusion else ""


class BatchSplit(Block):
    def __init__(self, *children, batch_sizes):
        self.children = _children(children)
        if isinstance(batch_sizes, (str, bytes)) or not hasattr(batch_sizes, "__iter__"):
            raise ConfigError(f"BatchSplit batch_sizes must be a list of integers; found {batch_sizes!r}")
        batch_sizes = list(batch_sizes)
        bad = [b for b in batch_sizes if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0]
        if bad:
            raise ConfigError(f"BatchSplit batch_sizes must be non-negative integers; found {bad[0]!r} in "
                              f"{batch_sizes!r}")
        self.batch_sizes = tuple(int(b) for b in batch_sizes)

    def _extra(self) -> str:
        return f", batch_sizes={list(self.batch_sizes)}"


Setup = Union[str, Block, None]
ROW_LEVEL = (Parallel, BatchSplit)  # blocks that act on the batch's rows


# ---------------------------------------------------------------------- checking
def normalize(setup: Setup, state, top: bool = True) -> Setup:
    """Check a setup against the model's adapters and return its canonical form:
    one-child Stacks collapse, nested Stacks flatten, a fusion adapter's name becomes
    its ``Fuse`` block, and ``Fuse`` gets its fusion adapter's name."""
    if setup is None:
        return None
    if isinstance(setup, str):
        record = _record(state, setup)
        if record.config.method == "fusion":
            return normalize(Fuse(*record.config.adapters, fusion=setup), state, top)
        if record.config.method == "basis":
            raise ConfigError(f"{setup!r} is a shared basis: it only serves its basis_lora adapters and cannot run "
                              f"by itself; activate one of those instead")
        return setup
    if not isinstance(setup, Block):
        raise ConfigError(f"a setup is an adapter name or a block (Stack, Parallel, Fuse, Average, BatchSplit); "
                          f"found {type(setup).__name__}: {setup!r}")
    name = type(setup).__name__
    if not setup.children:
        raise ConfigError(f"{name} needs at least one child")
    if isinstance(setup, ROW_LEVEL) and not top:
        raise ConfigError(f"{name} cannot be nested inside another block: it acts on the batch's rows, so it "
                          f"only stands at the top of a setup")
    if isinstance(setup, Fuse):
        return _normalize_fuse(setup, state)
    children = tuple(normalize(c, state, top=False) for c in setup.children)
    if any(c is None for c in children):
        raise ConfigError(f"{name}: a child is None; leave it out instead")
    if not isinstance(setup, Stack):
        for c in children:
            prompts = sorted(_prompt_names(c, state))
            if prompts:
                raise ConfigError(f"{name} cannot hold prompt adapter(s) {prompts}: a prompt acts on the model's "
                                  f"inputs, not at a site, so its output cannot be split or averaged; use it "
                                  f"alone or in a Stack")
    if isinstance(setup, Stack):
        flat: list = []
        for c in children:
            flat.extend(c.children if isinstance(c, Stack) else (c,))
        names = [c for c in flat if isinstance(c, str)]
        if len(set(names)) != len(names):
            raise AdapterNameError(f"an adapter appears twice in the Stack {setup!r}")
        return flat[0] if len(flat) == 1 else Stack(*flat)
    if isinstance(setup, Average):
        if len(setup.weights) != len(children):
            raise ConfigError(f"Average has {len(children)} children but {len(setup.weights)} weights")
        return Average(*children, weights=setup.weights)
    if isinstance(setup, BatchSplit):
        if len(setup.batch_sizes) != len(children) or any(b < 0 for b in setup.batch_sizes):
            raise ConfigError(f"BatchSplit needs one non-negative batch size per child; found {len(children)} "
                              f"children and batch_sizes={list(setup.batch_sizes)}")
        return BatchSplit(*children, batch_sizes=setup.batch_sizes)
    return Parallel(*children)


def _normalize_fuse(setup: Fuse, state) -> Fuse:
    for c in setup.children:
        if not isinstance(c, str):
            raise ConfigError(f"Fuse children must be adapter names, found {c!r}: fusion attends over the outputs "
                              f"of single adapters")
        if _record(state, c).config.method in ("fusion", "prompt"):
            raise ConfigError(f"Fuse cannot hold {c!r} ({_record(state, c).config.method}): fusion attends over "
                              f"the site outputs of ordinary adapters")
    names = list(setup.children)
    if setup.fusion is None:
        found = [n for n, r in state.adapters.items()
                 if r.config.method == "fusion" and list(r.config.adapters) == names]
        if not found:
            raise AdapterNameError(f"no fusion adapter over {names}; add one with "
                                   f"add_adapter(name, FusionConfig(adapters={names}))")
        fusion = found[0]
    else:
        fusion = setup.fusion
        record = _record(state, fusion)
        if record.config.method != "fusion":
            raise ConfigError(f"Fuse(fusion={fusion!r}): {fusion!r} is a {record.config.method} adapter, "
                              f"not a fusion adapter")
        if list(record.config.adapters) != names:
            raise ConfigError(f"fusion adapter {fusion!r} was made for {list(record.config.adapters)}, "
                              f"not {names} (the order matters)")
    return Fuse(*names, fusion=fusion)


def _record(state, name: str):
    if name not in state.adapters:
        raise AdapterNameError(f"no adapter named {name!r}; adapters: {list(state.adapters)}")
    return state.adapters[name]


def depends_on(config) -> list[str]:
    """The other adapters an adapter's config builds on (fused adapters, a routing
    library or inventory, a shared basis)."""
    out: list[str] = []
    for field_name in ("adapters", "library", "inventory"):
        out += list(getattr(config, field_name, None) or [])
    basis = getattr(config, "basis", None)
    return out + ([basis] if isinstance(basis, str) else [])


def names_in(setup: Setup) -> list[str]:
    """Every adapter name a setup uses (fusion adapters included), in order."""
    if setup is None:
        return []
    if isinstance(setup, str):
        return [setup]
    out = [n for c in setup.children for n in names_in(c)]
    if isinstance(setup, Fuse) and setup.fusion:
        out.append(setup.fusion)
    return out


def _prompt_names(setup: Setup, state) -> set[str]:
    return {n for n in names_in(setup) if state.adapters[n].config.method == "prompt"}


def prompt_stack(setup: Setup, state) -> list[str]:
    """The prompt adapters a (normalized) row setup applies, innermost first."""
    return [n for n in names_in(setup) if state.adapters[n].config.method == "prompt"]


def is_plain_stack(setup: Setup) -> bool:
    """True for None, a name, or a Stack of names: what the per-level fast path runs."""
    return setup is None or isinstance(setup, str) or (
        isinstance(setup, Stack) and all(isinstance(c, str) for c in setup.children))


def stack_names(setup: Setup) -> tuple[str, ...]:
    if setup is None:
        return ()
    return (setup,) if isinstance(setup, str) else tuple(setup.children)


# ---------------------------------------------------------------------- evaluation
def apply_setup(setup: Setup, site, inner, x, call):
    """The site's output under ``setup`` (every row the same). ``inner(x)`` computes
    everything beneath (the base module); ``call(module, x)`` runs a module with the
    site's other call arguments (for trained module copies, which replace the base)."""
    if setup is None:
        return inner(x)
    if isinstance(setup, str):
        part = site.adapters[setup] if setup in site.adapters else None
        if part is None or setup in site.merged:
            return inner(x)
        if getattr(part, "replaces_base", False):  # a trained copy of the module itself
            return call(part.module, x)
        return part.apply(inner, x)
    if not any(n in site.adapters for n in names_in(setup)):
        return inner(x)
    if isinstance(setup, Stack):
        fn = inner
        for child in setup.children:
            fn = partial(_apply_child, child, site, fn, call)
        return fn(x)
    inner = memo(inner)
    if isinstance(setup, Average):
        outs = [apply_setup(c, site, inner, x, call) for c in setup.children]
        return weighted_sum(outs, setup.weights)
    if isinstance(setup, Fuse):
        part = site.adapters[setup.fusion] if setup.fusion in site.adapters else None
        if part is None:
            return inner(x)
        outs = [apply_setup(c, site, inner, x, call) for c in setup.children]
        return part.fuse(inner(x), outs)
    raise ConfigError(f"{type(setup).__name__} is not evaluated at a site; it is resolved before the forward pass")


def _apply_child(child, site, inner, call, x):
    return apply_setup(child, site, inner, x, call)


def memo(inner):
    """``inner`` that computes once per input tensor, so the children of an Average or
    Fuse share the base output instead of recomputing it. Without autograd, parts may
    update the output they get in place, so each caller then gets its own copy."""
    cache: dict = {}

    def call(x):
        key = id(x)
        if key not in cache:
            cache[key] = (x, inner(x))   # keep x alive so its id stays unique
        y = cache[key][1]
        if torch.is_grad_enabled():
            return y
        return _clone(y) if isinstance(y, torch.Tensor) else type(y)(_clone(t) if isinstance(t, torch.Tensor) else t
                                                                       for t in y)
    return call


_PRE_NORM = "_polyadapter_pre_norm"  # mixed.PRE_NORM (a LayerNorm site's pre-norm sum), kept on copies


def _clone(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    mark = getattr(t, _PRE_NORM, None)
    if mark is not None:
        setattr(out, _PRE_NORM, mark)
    return out


def first_tensor(y):
    """(tensor to combine, rest of a tuple output or None)."""
    if isinstance(y, torch.Tensor):
        return y, None
    return y[0], tuple(y[1:])


def weighted_sum(outs: list, weights) -> object:
    firsts = [first_tensor(o)[0] for o in outs]
    total = firsts[0] * weights[0]
    for t, w in zip(firsts[1:], weights[1:]):
        total = total + t * w
    rest = first_tensor(outs[0])[1]
    return total if rest is None else (total,) + rest
