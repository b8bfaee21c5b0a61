"""Mixed batches: every row of a batch runs its own setup in one forward pass.

A :class:`RowPlan` is built once per call from the rows' setups. Rows whose setup is
a name or a ``Stack`` of names (the common case) run on the *level* path: level 0 is
every row's innermost adapter, level 1 the next, and so on (a row with a shorter
stack has no adapter at the deeper levels). At each site a level runs as a handful
of batched operations — one per *bucket* (adapters of one method and shape that stack
into one bank, e.g. all rank-16 LoRAs), never one per adapter:

    x' = x * in_scale[row]              (IA3 on feed-forward inputs)
    y  = inner(x')                      (the base, or the level beneath)
    y  = y * out_scale[row]             (IA3)
    y += delta(x)[row]                  (LoRA, parallel bottleneck: gathered matmuls)
    y  = y + delta(y)[row]              (sequential bottleneck)

Each row belongs to at most one bucket per level, so for every row this is exactly
its own adapter's rule. Parts that do not stack into banks (sparse deltas, trained
module copies, bottlenecks at a LayerNorm or output block) run once per distinct
adapter on their rows' sub-batch, with the rows of the site's other batch-shaped
arguments and a row plan of just those rows for the sites nested inside. Rows whose
setup holds an ``Average`` or ``Fuse`` are evaluated per distinct setup on their
sub-batch, reusing the base output the level path computed for them (a whole decoder
layer as a site must not run twice: it would append its KV cache again).

At inference, when every row's setup is a plain name and a site's adapters only add
updates from its input (LoRA, the serving engine's common case), the site takes a
short way (:func:`lean_rows`): the same operations with a few Python calls instead of
the composition machinery's dozens, which on CPU cost as much as the small matmuls.

Banks (the stacked weights of one bucket at one site, across *all* adapters there)
are cached on the site and rebuilt when an adapter's tensors change (parameter
version counters), or built fresh in every forward when gradients are needed, so
mixed batches also train.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from .compose import apply_setup, first_tensor, is_plain_stack, stack_names
from .errors import StateError


@dataclass
class Bucket:
    """Adapters of one kind and shape at one site, stacked into one bank."""

    key: tuple                     # the parts' bucket_key()
    names: list[str]               # slot order
    owner: type                    # the part class, which knows how to stack and apply
    tensors: list[torch.Tensor]    # every parameter and buffer behind the bank
    bank: dict | None = None
    versions: tuple = ()

    def get(self, site) -> dict:
        """The bank: cached for inference and rebuilt when a tensor changed in place
        (version counters); stacked afresh, so differentiable, when gradients flow."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors):
            return self.owner.stack_bank([site.adapters[n] for n in self.names])
        versions = tuple(map(_VERSION, self.tensors))
        if self.bank is None or versions != self.versions:
            with torch.no_grad():
                self.bank = self.owner.stack_bank([site.adapters[n] for n in self.names])
            self.versions = versions
        return self.bank


def _bank_tensors(part) -> list[torch.Tensor]:
    return list(part.parameters()) + list(part.buffers()) + list(getattr(part, "extra_bank_tensors", list)())


@dataclass
class SlotBank:
    """A bucket whose bank has fixed slots (the serving engine's device slots): the
    bank is preallocated for ``capacity`` adapters on first use, an adapter keeps its
    slot for as long as it is installed, and installing one writes only its own slot
    (nothing is restacked over the other adapters). A full bank doubles. Used when
    ``state.bank_slots`` is set; slots left by removed adapters are reused."""

    key: tuple
    owner: type
    capacity: int
    names: list = field(default_factory=list)     # slot -> adapter name or None (free)
    bank: dict | None = None
    _held: list = field(default_factory=list)     # slot -> (part, its tensors, their versions) or None
    _checked: object = None                       # the state.bank_epoch its slots were last checked at

    def __post_init__(self):
        self.names = [None] * self.capacity
        self._held = [None] * self.capacity

    def slot_of(self, name: str) -> int:
        self._checked = None
        if name in self.names:
            return self.names.index(name)
        if None not in self.names:
            self._grow()
        slot = self.names.index(None)
        self.names[slot] = name
        return slot

    def keep_only(self, present: set) -> None:
        self._checked = None
        for slot, name in enumerate(self.names):
            if name is not None and name not in present:
                self.names[slot], self._held[slot] = None, None

    def _grow(self) -> None:
        old = self.capacity
        self.capacity *= 2
        self.names += [None] * old
        self._held += [None] * old
        self.bank = None  # reallocated (and every slot rewritten) on the next get

    def get(self, site) -> dict:
        # The serving engine sets ``state.bank_epoch`` to a count that moves whenever any
        # adapter tensor changes in place (the sum of their version counters), so while it
        # stands still the slots need no check; installs and removals reset ``_checked``.
        epoch = site.state.bank_epoch
        if epoch is not None and epoch == self._checked and self.bank is not None:
            return self.bank
        occupied = [(s, site.adapters[n]) for s, n in enumerate(self.names) if n is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for _, p in occupied for t in p.parameters()):
            return self._stacked(site, occupied[0][1])  # differentiable, afresh
        with torch.no_grad():
            stale = []
            for slot, part in occupied:
                held = self._held[slot]
                if held is None or held[0] is not part:
                    held = (part, _bank_tensors(part), None)
                versions = tuple(map(_VERSION, held[1]))
                if versions != held[2]:
                    stale.append((slot, part))
                self._held[slot] = (part, held[1], versions)
            if self.bank is None or not all(self._write(slot, part) for slot, part in stale):
                self.bank = self._stacked(site, occupied[0][1])  # first use, or not laid out slot by slot
        self._checked = epoch
        return self.bank

    def _stacked(self, site, fill) -> dict:
        """The whole bank stacked from the parts, ``fill`` standing in for free slots."""
        return self.owner.stack_bank([site.adapters[n] if n is not None else fill for n in self.names])

    def _write(self, slot: int, part) -> bool:
        """Write ``part`` into its slot; False if some bank entry is not laid out slot by
        slot (the caller restacks then: correct, just not O(1))."""
        one = self.owner.stack_bank([part])
        for k, v in one.items():
            full = self.bank.get(k)
            if not isinstance(v, torch.Tensor) or full is v:
                continue  # shared entries (the base weight, flags) are the same for every slot
            n = v.shape[0] if v.dim() else 0
            if not (isinstance(full, torch.Tensor) and n and full.shape[0] == self.capacity * n
                    and full.shape[1:] == v.shape[1:]):
                return False
            full[slot * n:(slot + 1) * n].copy_(v)
        return True


# Layout structure -> id, shared by sites of the same structure. Ids are never reused
# (a counter), so bounding the table (oldest out) only costs a recomputation, never a
# wrong match; a server that adds and removes adapters for weeks stays bounded.
_LAYOUT_IDS: OrderedDict[tuple, int] = OrderedDict()
_LAYOUT_COUNTER = itertools.count()
_LAYOUT_IDS_MAX = 4096
_VERSION = attrgetter("_version")  # a tensor's in-place modification counter


@dataclass
class Layout:
    """How a site's (unmerged) adapters act in a mixed batch: each adapter's role and,
    for bankable parts, its bucket and slot. Sites with the same structure (e.g. every
    site of an all-linear LoRA) share ``id``, so row plans computed for one serve all."""

    key: tuple
    roles: dict[str, tuple[str, object]]   # name -> (role, bucket index | adapter name)
    slots: dict[str, int]
    buckets: list[Bucket]
    id: int

    @classmethod
    def build(cls, site, key) -> Layout:
        roles, slots, buckets, index = {}, {}, [], {}
        pooled = site.state.bank_slots
        if pooled:  # the site keeps its slot banks across rebuilds; free the slots of adapters gone
            banks = site.__dict__.setdefault("_slot_banks", {})
            for bank in banks.values():
                bank.keep_only({n for n in site.adapters if n not in site.merged})
        for name, part in site.adapters.items():
            if name in site.merged:
                continue
            if getattr(part, "replaces_base", False):
                roles[name] = ("replace", name)
            elif getattr(part, "row_role", None) is None:
                roles[name] = ("apply", name)
            else:
                bkey = part.bucket_key()
                if bkey not in index:
                    index[bkey] = len(buckets)
                    if pooled and bkey not in banks:
                        banks[bkey] = SlotBank(bkey, type(part), int(pooled))
                    buckets.append(banks[bkey] if pooled else Bucket(bkey, [], type(part), []))
                bucket = buckets[index[bkey]]
                if pooled:
                    slots[name] = bucket.slot_of(name)
                else:
                    slots[name] = len(bucket.names)
                    bucket.names.append(name)
                    bucket.tensors.extend(_bank_tensors(part))  # DoRA's extra: the base weight
                roles[name] = (part.row_role, index[bkey])
        signature = tuple((n, r, slots.get(n)) for n, r in roles.items()) + (bool(pooled),)
        layout_id = _LAYOUT_IDS.get(signature)
        if layout_id is None:
            layout_id = _LAYOUT_IDS[signature] = next(_LAYOUT_COUNTER)
            if len(_LAYOUT_IDS) > _LAYOUT_IDS_MAX:
                _LAYOUT_IDS.popitem(last=False)
        return cls(key, roles, slots, buckets, layout_id)


@dataclass
class Step:
    """One bucket's (or one unbanked adapter's) work at one level of one site."""

    role: str                      # in_scale | out_scale | delta_in | delta_out | replace | apply
    ref: object                    # bucket index (bankable roles) or adapter name
    rows: torch.Tensor | None      # row indices, None for every row
    slots: torch.Tensor | None     # bank slot per row in ``rows`` (bankable roles)
    span: tuple | None = None      # (start, end) when ``rows`` are consecutive: views, no copies


@dataclass
class RowPlan:
    setups: list                   # normalized setup per row
    device: torch.device
    levels: list[list] = field(default_factory=list)        # level -> adapter name or None per row
    groups: dict = field(default_factory=dict)              # non-plain setup -> row ids
    _steps: dict = field(default_factory=dict)
    _groups_t: dict = field(default_factory=dict)

    @classmethod
    def build(cls, setups: list, device) -> RowPlan:
        plan = cls(list(setups), torch.device(device))
        depth = max((len(stack_names(s)) for s in setups if is_plain_stack(s)), default=0)
        plan.levels = [[None] * len(setups) for _ in range(depth)]
        for i, s in enumerate(setups):
            if is_plain_stack(s):
                for level, name in enumerate(stack_names(s)):
                    plan.levels[level][i] = name
            else:
                plan.groups.setdefault(s, []).append(i)
        return plan

    @property
    def n_rows(self) -> int:
        return len(self.setups)

    def factor(self, n: int, site: str) -> int:
        """How many batch entries each row has at a site (beam search, flattened tokens)."""
        if n % self.n_rows:
            raise StateError(f"mixed batch: {self.n_rows} row setups were given but site {site!r} got a batch "
                             f"of {n}; pass one setup per row of the batch")
        return n // self.n_rows

    def steps(self, layout: Layout, level: int, k: int) -> list[Step]:
        cache_key = (level, k, layout.id)
        steps = self._steps.get(cache_key)
        if steps is None:
            steps = self._steps[cache_key] = _make_steps(layout, self.levels[level], k, self.device)
        return steps

    def lean_steps(self, layout: Layout, n: int) -> list[Step] | None:
        """The steps of a site on :func:`lean_rows`'s short way for a batch of ``n``: every
        row's setup a plain name, the site's adapters all at level 0 and all adding an
        update from the site input (LoRA); [] when no row has an adapter here; None
        where the short way does not apply. Cached per structure like :meth:`steps`."""
        key = ("lean", layout.id, n)
        if key not in self._steps:
            steps = None
            if not self.groups and n and n % self.n_rows == 0:
                levels = [self.steps(layout, level, n // self.n_rows) for level in range(len(self.levels))]
                if not any(levels):
                    steps = []
                elif not any(levels[1:]) and all(s.role == "delta_in" for s in levels[0]):
                    steps = levels[0]
            self._steps[key] = steps
        return self._steps[key]

    def group_rows(self, k: int) -> list[tuple[object, torch.Tensor]]:
        if k not in self._groups_t:
            self._groups_t[k] = [(s, _expand(torch.tensor(rows, dtype=torch.long), k).to(self.device))
                                 for s, rows in self.groups.items()]
        return self._groups_t[k]


def _expand(rows: torch.Tensor, k: int) -> torch.Tensor:
    return rows if k == 1 else (rows[:, None] * k + torch.arange(k)).flatten()


_ORDER = {"in_scale": 0, "out_scale": 1, "delta_in": 2, "apply": 2, "delta_out": 3, "replace": 4}


def _make_steps(layout: Layout, names: list, k: int, device) -> list[Step]:
    members: dict = {}
    for i, n in enumerate(names):
        if n in layout.roles:
            members.setdefault(layout.roles[n], []).append((i, n))
    steps = []
    for (role, ref), rows_names in members.items():
        rows = torch.tensor([i for i, _ in rows_names], dtype=torch.long)
        slots = None
        if isinstance(ref, int):
            slots = torch.tensor([layout.slots[n] for _, n in rows_names], dtype=torch.long)
            slots = (slots.repeat_interleave(k) if k > 1 else slots).to(device)
        full = len(rows_names) == len(names)
        first, last = rows_names[0][0], rows_names[-1][0]
        span = (first * k, (last + 1) * k) if last - first + 1 == len(rows_names) else None
        steps.append(Step(role, ref, None if full else _expand(rows, k).to(device), slots, span))
    steps.sort(key=lambda s: _ORDER[s.role])
    return steps


# ---------------------------------------------------------------------- pre-norm sums
# Adapters at a post-LN block's LayerNorm (AdapterHub's seq_bn) chain on the sum *before*
# the norm: each output carries ``(z_in, delta)`` under this attribute (the pre-norm
# input it read and what it added), so the next adapter of a Stack, a fusion layer, and
# the level path below read ``z_in + delta`` instead of trying to invert a LayerNorm.
PRE_NORM = "_polyadapter_pre_norm"


def carried_pre_norm(y: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """The pre-norm sum ``y`` carries, else ``default`` (the site input: nothing beneath)."""
    mark = getattr(y, PRE_NORM, None)
    if mark is None:
        return default
    z, d = mark
    return z if d is None else z + d


def _rows_with_mark(first, rows):
    sub = first.index_select(0, rows)
    mark = getattr(first, PRE_NORM, None)
    if mark is not None:
        setattr(sub, PRE_NORM, (carried_pre_norm(first, None).index_select(0, rows), None))
    return sub


def _put_rows_with_mark(first, rows, new, x):
    out = _put_rows(first, rows, new)
    if getattr(new, PRE_NORM, None) is not None:
        full = carried_pre_norm(first, x)
        setattr(out, PRE_NORM, (full.index_copy(0, rows, carried_pre_norm(new, None).to(full.dtype)), None))
    elif getattr(first, PRE_NORM, None) is not None:
        setattr(out, PRE_NORM, getattr(first, PRE_NORM))
    return out


# ---------------------------------------------------------------------- at a site
def lean_rows(plan: RowPlan, site, x, args: tuple, kwargs: dict):
    """The site's output for a mixed batch by a short way, or None (nothing run) where
    it does not apply. It applies at inference when every row's setup is a plain name
    and the site's adapters only add an update computed from its input (LoRA): the
    serving engine's steps. Then it is :func:`apply_rows` without the composition
    machinery: the base (a plain ``nn.Linear`` without hooks called directly), and one
    bank call per bucket. On CPU a site's Python costs as much as its LoRA matmuls, so
    every call saved here shows in the engine's tokens/s."""
    if torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    layout = site.layout()
    steps = plan.lean_steps(layout, x.shape[0])
    if steps is None:
        return None
    base = site.base
    if args or kwargs or not _plain_linear(base):
        y = base(x, *args, **kwargs)
    else:
        y = F.linear(x, base.weight, base.bias)
    first, rest = first_tensor(y)
    own = first.data_ptr() != x.data_ptr()
    for s in steps:
        first = _bank_apply(site, layout.buckets[s.ref], x, first, s, own)
    return first if rest is None else (first,) + rest


def _plain_linear(module) -> bool:
    """Whether calling ``module`` is exactly ``F.linear`` with its weight and bias: an
    ``nn.Linear`` (not a subclass) with no hooks of its own and no global ones."""
    return (type(module) is nn.Linear and not module._forward_pre_hooks and not module._forward_hooks
            and not _module_hooks._global_forward_pre_hooks and not _module_hooks._global_forward_hooks)


def apply_rows(plan: RowPlan, site, inner, x, call):
    """The site's output for a mixed batch (see the module docstring)."""
    k = plan.factor(x.shape[0], site.site_name)
    layout = site.layout()
    fn = inner
    for level in range(len(plan.levels)):
        steps = plan.steps(layout, level, k)
        if steps:
            fn = partial(_apply_level, site, layout, steps, fn, call)
    y = fn(x)
    for setup, rows in plan.group_rows(k):
        sub = x.index_select(0, rows)
        sub_call = _call_on_rows(call, rows, x.shape[0])
        # The level path already ran the base on these rows (they have no level adapters):
        # reuse that output rather than calling the base again — a whole decoder layer as
        # a site would otherwise append its KV cache twice.
        first, rest = first_tensor(y)
        done = first.index_select(0, rows)
        base_out = done if rest is None else (done,) + rest
        inner = partial(_base_or_done, sub_call, site.base, sub, base_out)
        with _uniform(site.state, setup):  # sites nested in this one see the group's setup
            ys = apply_setup(setup, site, inner, sub, sub_call)
        y = _put_rows(y, rows, first_tensor(ys)[0])
    return y


def _base_or_done(call, base, sub, done, t):
    """The base's output for ``t``: ``done`` when ``t`` is the rows' own input, else a
    fresh call (a part that scales the input first, e.g. (IA)^3 on feed-forward layers)."""
    return done if t is sub else call(base, t)


@contextmanager
def _uniform(state, setup):
    saved = state.rows, state.setup
    state.rows, state.setup = None, setup
    try:
        yield
    finally:
        state.rows, state.setup = saved


def _apply_level(site, layout: Layout, steps: list[Step], inner, call, x):
    xin = x
    scale_in = [s for s in steps if s.role == "in_scale"]
    if scale_in:
        xin = x * _row_scales(site, layout, scale_in, x)
    y = inner(xin)
    first, rest = first_tensor(y)
    own = not torch.is_grad_enabled() and first.data_ptr() != x.data_ptr()  # safe to update in place
    for s in steps:
        if s.role == "out_scale":
            first = first * _row_scales(site, layout, [s], first)
            own = not torch.is_grad_enabled()
        elif s.role in ("delta_in", "delta_out"):
            source = x if s.role == "delta_in" else first
            first = _bank_apply(site, layout.buckets[s.ref], source, first, s, own)
        elif s.role == "apply":
            part = site.adapters[s.ref]
            sub_x = x if s.rows is None else x.index_select(0, s.rows)
            sub_y = first if s.rows is None else _rows_with_mark(first, s.rows)
            new = first_tensor(part.apply(lambda _x, _y=sub_y: _y, sub_x))[0]
            first = new if s.rows is None else _put_rows_with_mark(first, s.rows, new, x)
        elif s.role == "replace":
            part = site.adapters[s.ref]
            sub_x = x if s.rows is None else x.index_select(0, s.rows)
            if s.rows is None:
                new = first_tensor(call(part.module, sub_x))[0]
            else:  # sites nested in the module (a block's projection) see these rows' plan
                with _rows_only(site.state, s.rows, x.shape[0]):
                    new = first_tensor(_call_on_rows(call, s.rows, x.shape[0])(part.module, sub_x))[0]
            first = new if s.rows is None else _put_rows(first, s.rows, new)
    return first if rest is None else (first,) + rest


@contextmanager
def _rows_only(state, rows: torch.Tensor, n: int):
    """The mixed-batch plan of just ``rows`` (of a batch of ``n``), while a module runs on them."""
    plan = state.rows
    k = n // plan.n_rows
    saved = state.rows
    state.rows = RowPlan.build([plan.setups[r // k] for r in rows.tolist()], plan.device)
    try:
        yield
    finally:
        state.rows = saved


def _call_on_rows(call, rows: torch.Tensor, n: int):
    """``call`` with its other batch-shaped arguments cut to ``rows`` too: a module run
    on a sub-batch (a module copy, a part that calls a block with its residual input)
    must see those rows of every batch-shaped argument, not the whole batch's."""
    if not isinstance(call, partial) or len(call.args) != 2:
        return call
    args, kwargs = call.args

    def pick(v):
        return v.index_select(0, rows) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
    return partial(call.func, tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()})


def _bank_apply(site, bucket: Bucket, t, out, step: Step, in_place: bool):
    """``out`` plus (or replaced by) the bucket's contribution computed from ``t`` for
    the step's rows, each with its own slot of the bank."""
    bank, owner, rows = bucket.get(site), bucket.owner, step.rows
    if rows is None:
        return owner.bank_forward(bank, t, out, step.slots, in_place, site.training)
    if in_place and step.span is not None and step.role == "delta_in":
        # consecutive rows (the serving engine orders a step's rows by bucket and slot):
        # work on views of the input and output, no gather and no scatter
        part = out[step.span[0]:step.span[1]]
        sub = owner.bank_forward(bank, t[step.span[0]:step.span[1]], part, step.slots, True, site.training)
        if sub.data_ptr() != part.data_ptr():
            part.copy_(sub)
        return out
    sub = owner.bank_forward(bank, t.index_select(0, rows), out.index_select(0, rows), step.slots, True,
                             site.training)
    return out.index_copy_(0, rows, sub) if in_place else out.index_copy(0, rows, sub)


def _row_scales(site, layout: Layout, steps: list[Step], t: torch.Tensor) -> torch.Tensor:
    """Per-row scale vectors broadcastable against ``t`` (ones for rows outside ``steps``)."""
    n, width = t.shape[0], t.shape[-1]
    full = None
    for s in steps:
        vals = layout.buckets[s.ref].get(site)["scale"].index_select(0, s.slots).to(t.dtype)   # (rows, width)
        if s.rows is None:
            full = vals
        else:
            if full is None:
                full = torch.ones(n, width, dtype=t.dtype, device=t.device)
            full = full.index_copy(0, s.rows, vals)
    return full.view(n, *([1] * (t.dim() - 2)), width)


def _put_rows(y, rows: torch.Tensor, new: torch.Tensor):
    first, rest = first_tensor(y)
    first = first.index_copy(0, rows, new.to(first.dtype))
    return first if rest is None else (first,) + rest


# ---------------------------------------------------------------------- Parallel
def replicate_inputs(args: tuple, kwargs: dict, batch: int, k: int) -> tuple[tuple, dict]:
    """Every batch-shaped tensor input repeated ``k`` times along the batch (Parallel)."""
    def rep(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v.repeat(k, *([1] * (v.dim() - 1)))
        return v
    return tuple(rep(a) for a in args), {n: rep(v) for n, v in kwargs.items()}


def split_outputs(out, batch: int, k: int) -> tuple:
    """One output per Parallel child: every tensor whose first dimension is ``k*batch``
    is cut into ``k`` pieces; a loss over the whole replicated batch is dropped (compute
    each child's loss from its own logits); other entries are shared."""
    def piece(v, j):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == k * batch:
            return v[j * batch:(j + 1) * batch]
        if isinstance(v, tuple) and not hasattr(v, "_fields"):
            return tuple(piece(t, j) for t in v)
        return v
    outs = []
    for j in range(k):
        if isinstance(out, torch.Tensor) or (isinstance(out, tuple) and not hasattr(out, "keys")):
            outs.append(piece(out, j))
        elif hasattr(out, "keys"):
            fields = {n: piece(out[n], j) for n in out.keys() if n != "loss"}
            outs.append(type(out)(**fields))
        else:
            outs.append(out)
    return tuple(outs)
