"""The object users hold: a frozen base model plus any number of named adapters.

    pm = AdapterModel(base)                       # or polyadapter.wrap(base)
    pm.add_adapter("topic", LoraConfig(r=8, modules_to_save=["classifier"]))
    pm.train_adapter("topic")                     # only "topic" requires grad
    pm.set_active("topic")                        # or several names: a stack
    pm.merge_adapter("topic"); pm.unmerge_adapter("topic")
    pm.save_adapter("topic", "out/topic"); pm.load_adapter("out/topic", name="t2")

Every change is planned first (all parameters built, every name and shape checked)
and installed second, so an error leaves the model as it was.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .compose import (
    ROW_LEVEL,
    BatchSplit,
    Block,
    Stack,
    depends_on,
    is_plain_stack,
    names_in,
    normalize,
    prompt_stack,
)
from .config import AdapterConfig
from .errors import AdapterNameError, ConfigError, LoadError, ShapeMismatchError, StateError, TargetError
from .fingerprint import fingerprint
from .methods import config_from_dict, method_spec
from .methods.prompt import prepare_rows
from .methods.spec import parts_filled_later
from .mixed import RowPlan, replicate_inputs, split_outputs
from .names import INPUT_SITE, check_name
from .saved_modules import ModuleCopy
from .sites import Site, original_modules, original_or_site, resolve_targets, sites_of
from .sites import unwrap as unwrap_site
from .sites import wrap as wrap_site
from .state import AdapterRecord, AdapterState


@dataclass
class Plan:
    """Everything an adapter will add, built but not yet installed."""

    record: AdapterRecord
    parts: dict[str, nn.Module] = field(default_factory=dict)  # site -> part (saved modules too)
    input_part: nn.Module | None = None

    def all_parts(self) -> dict[str, nn.Module]:
        """File-key prefix -> part, the input-level part included."""
        out = dict(self.parts)
        if self.input_part is not None:
            out[INPUT_SITE] = self.input_part
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _keyed_state(self.all_parts())

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checked tensors (keys as in :meth:`state_dict`) into the parts: straight
        into each parameter and buffer, or through ``load_state_dict`` for a part that
        checks what it loads (sparse deltas' indices) or has load hooks."""
        for site, part in self.all_parts().items():
            if not _plain_loading(part):
                own = part.state_dict()
                part.load_state_dict({k: tensors[f"{site}.{k}"].to(v.dtype) for k, v in own.items()})
                continue
            with torch.no_grad():
                for k, v in part.state_dict(keep_vars=True).items():
                    src = tensors[f"{site}.{k}"]
                    if src.shape != v.shape:  # copy_ would broadcast
                        raise ShapeMismatchError(f"site {site!r}: tensor {k!r} has shape {tuple(src.shape)}, "
                                                 f"the part expects {tuple(v.shape)}")
                    v.copy_(src)


def _plain_loading(part: nn.Module) -> bool:
    """Whether loading ``part`` is nothing but copying each tensor in (50 us less per part)."""
    default = nn.Module._load_from_state_dict
    return all(type(m)._load_from_state_dict is default and not m._load_state_dict_pre_hooks
               and not m._load_state_dict_post_hooks for m in part.modules())


def _keyed_state(parts: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``<site>.<tensor>`` -> tensor over every part: the keys of adapter files."""
    return {f"{s}.{k}": v for s, part in parts.items() for k, v in part.state_dict().items()}


class _BoundForward:
    """``pm.forward``: calls :meth:`AdapterModel._forward` and reports the base model's
    signature (plus ``adapter_names``) to ``inspect.signature``."""

    __slots__ = ("owner",)

    def __init__(self, owner):
        self.owner = owner

    def __call__(self, *args, **kwargs):
        return AdapterModel._forward(self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return self.owner.forward_signature()

    @property
    def __doc__(self):
        return AdapterModel._forward.__doc__


class _ForwardAttribute:
    """``AdapterModel.forward``: the plain function on the class (its signature names
    ``labels``, which Trainer's label detection reads), a :class:`_BoundForward` on an
    instance."""

    def __get__(self, obj, objtype=None):
        return AdapterModel._forward if obj is None else _BoundForward(obj)


class AdapterModel(nn.Module):
    # Hugging Face Trainer refuses to train a quantized base (e.g. one loaded from GGUF)
    # unless trainable adapters are attached on top; this is how transformers says so.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, AdapterModel):
            raise StateError("this model is already an AdapterModel")
        if any(isinstance(m, Site) for m in model.modules()):
            raise StateError("this model already holds polyadapter sites; wrap it once")
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.input_parts = nn.ModuleDict()
        self.training = model.training  # an eval base stays in eval (no adapter dropout)
        # The largest adapter plan_adapter builds: a sane memory bound against absurd sizes.
        self.max_adapter_numel = 2 * sum(p.numel() for p in model.parameters()) + 2**26
        object.__setattr__(self, "state", AdapterState(
            base_fingerprint=fingerprint(dict(model.named_parameters()), model)))

    # ------------------------------------------------------------------ running
    def _forward(self, *args, adapter_names: list | None = None, labels=None, **kwargs):
        """Run the model under the active setup, or — with ``adapter_names``, one setup
        per row (an adapter name, a block, or None for the bare base) — run a mixed
        batch. A ``Parallel`` setup returns one output per child. ``labels`` go to the
        base model (named here so that Hugging Face's Trainer finds the label column)."""
        if labels is not None:
            kwargs["labels"] = labels
        args, kwargs, k, batch = self._begin_call(args, kwargs, adapter_names)
        args, kwargs = self._with_prompts(args, kwargs, "prepare")
        out = self.model(*args, **kwargs)
        return split_outputs(out, batch, k) if k else out

    forward = _ForwardAttribute()

    def forward_signature(self) -> inspect.Signature:
        """The base model's forward signature plus ``adapter_names``: what
        ``inspect.signature(pm.forward)`` reports, so tools that keep only the columns a
        model takes (Trainer's ``remove_unused_columns``) keep the base's inputs."""
        try:
            base = inspect.signature(self.model.forward)
        except (TypeError, ValueError):
            return inspect.signature(AdapterModel._forward)
        params = [p for p in base.parameters.values() if p.name != "adapter_names"]
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        tail = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
        head = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
        return base.replace(parameters=head + [extra] + tail)

    def generate(self, *args, adapter_names: list | None = None, **kwargs):
        """Hugging Face ``generate``; with ``adapter_names`` every sequence keeps its own
        setup through all decoding steps (beams included)."""
        args, kwargs, k, batch = self._begin_call(args, kwargs, adapter_names)
        args, kwargs = self._with_prompts(args, kwargs, "prepare_generate")
        out = self.model.generate(*args, **kwargs)
        return split_outputs(out, batch, k) if k else out

    def _begin_call(self, args: tuple, kwargs: dict, adapter_names) -> tuple[tuple, dict, int, int]:
        """Resolve this call's per-row setups into ``state.rows`` (None when every row
        runs the active setup). Returns the (possibly replicated) inputs, the Parallel
        width (0 when not Parallel) and the caller's batch size.

        The row plan stays on the state after the call, so gradient checkpointing's
        recompute during backward sees it; the next call replaces it."""
        self.state.rows = None
        setup = self.state.setup
        if adapter_names is None and not isinstance(setup, ROW_LEVEL):
            return args, kwargs, 0, 0
        if self.state.merged:
            raise StateError(f"adapter {sorted(self.state.merged)[0]!r} is merged into the base, so every row "
                             f"of a mixed batch would see it; unmerge it first")
        batch = _batch_size(args, kwargs)
        k = 0
        if adapter_names is not None:
            rows = self._row_setups(adapter_names, batch)
        elif isinstance(setup, BatchSplit):
            if sum(setup.batch_sizes) != batch:
                raise StateError(f"{setup!r} covers {sum(setup.batch_sizes)} rows but the batch has {batch}")
            rows = [c for c, b in zip(setup.children, setup.batch_sizes) for _ in range(b)]
        else:  # Parallel: the batch runs once per child, side by side
            k = len(setup.children)
            args, kwargs = replicate_inputs(args, kwargs, batch, k)
            rows = [c for c in setup.children for _ in range(batch)]
        self.state.rows = RowPlan.build(rows, _device_of(self.model))
        return args, kwargs, k, batch

    def _row_setups(self, adapter_names, batch: int) -> list:
        if isinstance(adapter_names, (str, Block)) or not hasattr(adapter_names, "__len__"):
            raise ConfigError(f"adapter_names must be a list with one setup per row; found {adapter_names!r}")
        if len(adapter_names) != batch:
            raise ConfigError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows")
        out, seen = [], {}
        for i, entry in enumerate(adapter_names):
            if isinstance(entry, ROW_LEVEL):
                raise ConfigError(f"adapter_names[{i}] is {type(entry).__name__}: it acts on the whole batch, "
                                  f"so it cannot be one row's setup; use set_active({type(entry).__name__}(...))")
            key = entry if isinstance(entry, (str, type(None))) else repr(entry)
            if key not in seen:
                seen[key] = normalize(entry, self.state, top=False)
            out.append(seen[key])
        return out

    def _with_prompts(self, args: tuple, kwargs: dict, how: str) -> tuple[tuple, dict]:
        """The call's inputs with the active input-level parts (prompts) applied; these
        act on the model's inputs, so they run here rather than at a site."""
        plan = self.state.rows
        if plan is None:
            per_row = None
            prompts = prompt_stack(self.state.setup, self.state)
        else:
            stacks = {id(s): prompt_stack(s, self.state) for s in plan.setups}  # once per distinct setup
            per_row = [stacks[id(s)] for s in plan.setups]
            prompts = [n for names in stacks.values() for n in names]
        if not prompts:
            return args, kwargs
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise TypeError("with a prompt adapter active, pass inputs as keyword arguments")
            kwargs = {**kwargs, "input_ids": args[0]}
        if per_row is not None:
            parts = [[self.input_parts[n] for n in names] for names in per_row]
            return (), prepare_rows(self.model, kwargs, parts, generate=how == "prepare_generate")
        for name in prompts:
            kwargs = getattr(self.input_parts[name], how)(self.model, kwargs)
        return (), kwargs

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        return list(self.state.adapters)

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self.state.active

    def record(self, name: str) -> AdapterRecord:
        if name not in self.state.adapters:
            raise AdapterNameError(f"no adapter named {name!r}; adapters: {self.adapters}")
        return self.state.adapters[name]

    def add_adapter(self, name: str, config: AdapterConfig | dict, activate: bool = True) -> AdapterRecord:
        """Add a new adapter with freshly initialised parameters."""
        plan = self.plan_adapter(name, config)
        self.install(plan)
        if activate:
            self.set_active(name)
        return plan.record

    def check_new_name(self, name, where: str = "") -> None:
        """AdapterNameError unless ``name`` is a valid name no adapter has yet."""
        prefix = f"{where}: " if where else ""
        check_name(name, where)
        if name in self.state.adapters:
            raise AdapterNameError(f"{prefix}an adapter named {name!r} already exists; adapters: {self.adapters}")

    def plan_adapter(self, name: str, config: AdapterConfig | dict, *, filled: bool = False) -> Plan:
        """Build an adapter's parts without touching the model (used by add and load).
        ``filled``: every tensor is loaded next (:meth:`Plan.load_tensors`), so the parts
        skip their random initialisation."""
        if filled:
            with parts_filled_later():
                return self.plan_adapter(name, config)
        self.check_new_name(name)
        if isinstance(config, dict):
            config = config_from_dict(config, where=f"adapter {name!r}")
        spec = method_spec(config.method)
        config = spec.fill_defaults(self.model, config)
        what = f"adapter {name!r} ({config.method})"
        modules = original_modules(self.model)
        saved = resolve_targets(self.model, config.modules_to_save, lambda m: True, what + " modules_to_save",
                                modules=modules)
        plan = Plan(AdapterRecord(name, config, sites=[], saved_modules=saved))
        if spec.level == "input":
            self._check_size(spec, config, what, {INPUT_SITE: self.model}, saved, modules)
            plan.input_part = spec.make_part(self.model, config, INPUT_SITE)
        else:
            sites = resolve_targets(self.model, config.targets, spec.accepts, what, exclude=set(saved),
                                    modules=modules)
            clash = sorted(set(sites) & set(saved))
            if clash:
                raise TargetError(f"{what}: {clash[0]!r} is both a target and in modules_to_save")
            self._check_size(spec, config, what, {site: modules[site] for site in sites}, saved, modules)
            for site in sites:
                plan.parts[site] = spec.make_part(modules[site], config, site)
            plan.record.sites = sites
        for site in saved:
            plan.parts[site] = ModuleCopy(modules[site])
        return plan

    def _check_size(self, spec, config, what: str, at: dict, saved: list[str], modules: dict) -> None:
        """ConfigError before anything is allocated when the adapter would hold more
        numbers than ``max_adapter_numel`` (an absurd rank, width or prompt length)."""
        numel = sum(p.numel() for s in saved for p in modules[s].parameters())  # full copies
        if spec.size is not None:
            numel += sum(int(spec.size(module, config, site)) for site, module in at.items())
        limit = self.max_adapter_numel
        if numel > limit:
            raise ConfigError(f"{what} would hold {numel:,} numbers (about {numel * 4 / 2**30:,.1f} GiB in "
                              f"fp32), more than the limit of {limit:,} (twice the base model plus 64M); check "
                              f"its rank/width/length fields, or raise AdapterModel.max_adapter_numel")

    def install(self, plan: Plan) -> None:
        """Put a planned adapter into the model, all or nothing: if any step fails, every
        site wrapped and every part added so far is taken out again before the error
        propagates, so the module tree and the state are as before."""
        name = plan.record.name
        self.check_new_name(name)
        wrapped, added = [], []
        try:
            for part in plan.all_parts().values():
                part.train(self.model.training)  # new parts follow the model's train/eval mode
            for site, part in plan.parts.items():
                if not isinstance(original_or_site(self.model, site), Site):
                    wrapped.append(site)
                holder = wrap_site(self.model, site, self.state)
                holder.adapters[name] = part
                added.append(holder)
            if plan.input_part is not None:
                self.input_parts[name] = plan.input_part
            self.state.adapters[name] = plan.record
            for p in self.adapter_parameters(name).values():
                p.requires_grad_(False)
        except BaseException:
            for holder in added:
                if name in holder.adapters:
                    del holder.adapters[name]
            for site in reversed(wrapped):
                unwrap_site(self.model, site)
            if name in self.input_parts:
                del self.input_parts[name]
            self.state.adapters.pop(name, None)
            raise

    def remove_adapter(self, name: str) -> None:
        record = self.record(name)
        users = [n for n, r in self.state.adapters.items() if name in depends_on(r.config)]
        if users:
            raise StateError(f"adapter {name!r} is used by {users} (fusion, routing or shared basis); "
                             f"remove those first")
        if self.is_merged(name):
            raise StateError(f"adapter {name!r} is merged into the base; unmerge it before removing it")
        sites = sites_of(self.model)
        for site in record.sites + record.saved_modules:
            del sites[site].adapters[name]
            if len(sites[site].adapters) == 0:
                unwrap_site(self.model, site)
        if name in self.input_parts:
            del self.input_parts[name]
        del self.state.adapters[name]
        if name in self.state.active:  # drop it from the active setup (a Stack of names keeps the rest)
            setup = self.state.setup
            rest = [n for n in names_in(setup) if n != name] if is_plain_stack(setup) else []
            self.set_active(*rest)

    def set_active(self, *setups) -> None:
        """Choose the setup for the following calls: an adapter name, a composition
        block (Stack, Parallel, Fuse, Average, BatchSplit), several of them (a Stack:
        the first acts nearest the base), or nothing (the bare base)."""
        if len(setups) == 1 and isinstance(setups[0], list):
            setups = tuple(setups[0])
        setups = tuple(s for s in setups if s is not None)
        setup = None if not setups else setups[0] if len(setups) == 1 else Stack(*setups)
        setup = normalize(setup, self.state)
        self.state.setup = setup
        self.state.active = tuple(names_in(setup))

    def parts(self, name: str) -> dict[str, nn.Module]:
        """Site name -> this adapter's part at that site (saved modules included)."""
        record = self.record(name)
        sites = sites_of(self.model)
        out = {s: sites[s].adapters[name] for s in record.sites + record.saved_modules}
        if name in self.input_parts:
            out[INPUT_SITE] = self.input_parts[name]
        return out

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """File key -> tensor for everything the adapter saves (parameters and buffers)."""
        return _keyed_state(self.parts(name))

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {f"{s}.{k}": p for s, part in self.parts(name).items() for k, p in part.named_parameters()}

    # ------------------------------------------------------------------ state dict
    def adapter_key_prefixes(self, prefix: str = "") -> tuple[str, ...]:
        """Module-tree prefixes under which adapter tensors live: every site's
        ``adapters`` container and the input-level parts."""
        found = [f"{prefix}{path}.adapters." for path, m in self.named_modules() if isinstance(m, Site)]
        return tuple(found) + (f"{prefix}input_parts.",)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Every adapter's parameters and buffers (trained module copies included), keyed
        by their place in the module tree — not the frozen base, which is
        ``pm.model.state_dict()``. So Trainer and accelerate checkpoints hold only the
        adapters, and ``load_state_dict`` can never change the base."""
        full = super().state_dict(*args, prefix=prefix, keep_vars=keep_vars)
        keep = self.adapter_key_prefixes(prefix)
        out = type(full)((k, v) for k, v in full.items() if k.startswith(keep))
        if hasattr(full, "_metadata"):
            out._metadata = full._metadata
        if destination is None:
            return out
        destination.update(out)
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load adapter tensors as :meth:`state_dict` keys them; all or nothing: names
        (with ``strict``), shapes and finite values are checked before any tensor is
        copied. Keys of the base are never loaded (unexpected)."""
        from torch.nn.modules.module import _IncompatibleKeys

        from .formats.files import check_tensors
        own = self.state_dict(keep_vars=True)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise LoadError(f"state dict does not fit this model's adapters: missing {missing[:3]} "
                            f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
        given = {k: state_dict[k] for k in own if k in state_dict}
        check_tensors(given, {k: own[k] for k in given}, "state dict")
        super().load_state_dict(given, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------ training
    def train_adapter(self, name: str) -> list[nn.Parameter]:
        """Make ``name`` the only trainable thing and activate it; return its parameters."""
        self.record(name)
        if self.is_merged(name):
            raise StateError(f"adapter {name!r} is merged into the base; unmerge it before training")
        for p in self.parameters():
            p.requires_grad_(False)
        params = list(self.adapter_parameters(name).values())
        for p in params:
            p.requires_grad_(True)
        if name not in self.state.active:
            self.set_active(name)
        self.train()
        return params

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self, name: str | None = None) -> dict[str, int]:
        """Parameters of one adapter (or of all trainable ones) against the base's."""
        base = sum(p.numel() for n, p in self.model.named_parameters() if not _is_adapter_param(n))
        if name is None:
            own = sum(p.numel() for p in self.trainable_parameters())
        else:
            own = sum(p.numel() for p in self.adapter_parameters(name).values())
        return {"adapter": own, "base": base, "share": own / base if base else 0.0}

    def gradient_checkpointing_enable(self, use_reentrant: bool = False, gradient_checkpointing_kwargs=None,
                                      **options) -> None:
        """Turn on the base model's activation (gradient) checkpointing. Non-reentrant by
        default, so gradients reach the adapters although the frozen inputs need none.
        The active setup lives on this object, so the recomputed forward uses it too.
        Takes Hugging Face's keyword forms too, so Trainer can call it."""
        kwargs = {"use_reentrant": use_reentrant, **(gradient_checkpointing_kwargs or {})}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
        elif hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
        else:
            raise StateError(f"{type(self.model).__name__} has no built-in checkpointing; wrap its blocks "
                             f"with torch.utils.checkpoint yourself")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **options) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_enable` (Trainer calls it)."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        self.gradient_checkpointing_enable(use_reentrant=kwargs.pop("use_reentrant", False),
                                           gradient_checkpointing_kwargs=kwargs, **options)

    # ------------------------------------------------------------------ merging
    def is_merged(self, name: str) -> bool:
        record = self.record(name)
        sites = sites_of(self.model)
        return any(name in sites[s].merged for s in record.sites)

    def merge_adapter(self, *names: str, safe: bool = True) -> None:
        """Add one or several adapters' weight updates to the base weights; their parts
        then stop computing. All or nothing: every adapter is checked before any weight
        changes, the touched weights are kept aside while merging, and if any step fails
        or any resulting weight holds NaN or inf, they are put back and nothing is merged.
        (``safe`` is kept for compatibility; the check always runs.)"""
        if not names:
            raise StateError("merge_adapter needs at least one adapter name")
        _refuse_repeats("merge_adapter", names)
        sites = sites_of(self.model)
        plans = {name: self._merge_parts(name, sites) for name in names}
        touched = sorted({s for parts in plans.values() for s in parts})

        def apply():
            for name, parts in plans.items():
                for s, part in parts.items():
                    part.merge(sites[s].base)
                    sites[s].merged.append(name)
            bad = next((s for s in touched if not _finite_module(sites[s].base)), None)
            if bad is not None:
                raise StateError(f"merging {list(names)} gives non-finite weights at site {bad!r}; nothing merged")
            self.state.merged.update(names)

        self._weights_transaction(sites, touched, apply)

    def _weights_transaction(self, sites: dict, touched: list[str], change) -> None:
        """Run ``change()``; if it raises, restore the touched sites' base weights and
        merged lists exactly (from copies taken first) and re-raise."""
        saved = {s: ({k: v.detach().clone() for k, v in sites[s].base.state_dict().items()},
                     list(sites[s].merged)) for s in touched}
        merged = set(self.state.merged)
        try:
            change()
        except BaseException:
            with torch.no_grad():
                for s, (weights, merged_here) in saved.items():
                    for k, v in sites[s].base.state_dict().items():
                        v.copy_(weights[k])
                    sites[s].merged[:] = merged_here
            self.state.merged = merged
            raise

    def _merge_parts(self, name: str, sites: dict) -> dict:
        """Site -> part for merging ``name``, or a StateError saying why it cannot be."""
        record = self.record(name)
        if self.is_merged(name):
            raise StateError(f"adapter {name!r} is already merged")
        if name in self.input_parts:
            raise StateError(f"adapter {name!r} ({record.config.method}) has no weight-space form and cannot be merged")
        parts = {s: sites[s].adapters[name] for s in record.sites}
        for s, part in parts.items():
            if not hasattr(part, "merge"):
                raise StateError(f"adapter {name!r} ({record.config.method}) cannot be merged at site {s!r}")
        tied = _tied_weights(self.model, parts, sites)
        if tied:
            site, other = tied
            raise StateError(f"cannot merge adapter {name!r}: the weight of site {site!r} is tied to {other!r}, "
                             f"so merging would change both; keep it unmerged")
        return parts

    def unmerge_adapter(self, *names: str) -> None:
        """Take merged adapters back out of the base weights (in reverse order). All or
        nothing, as :meth:`merge_adapter`: names are checked first (each known, merged
        and given once), and a failure part-way restores every touched weight."""
        if not names:
            raise StateError("unmerge_adapter needs at least one adapter name")
        _refuse_repeats("unmerge_adapter", names)
        for name in names:
            if not self.is_merged(name):
                raise StateError(f"adapter {name!r} is not merged")
        sites = sites_of(self.model)
        touched = sorted({s for name in names for s in self.record(name).sites})

        def apply():
            for name in reversed(names):
                for s in self.record(name).sites:
                    sites[s].adapters[name].unmerge(sites[s].base)
                    sites[s].merged.remove(name)
                self.state.merged.discard(name)

        self._weights_transaction(sites, touched, apply)

    def merge_and_unload(self, *names: str, safe: bool = False) -> nn.Module:
        """Bake adapters into the base for good: merge ``names`` (all or nothing, as
        :meth:`merge_adapter`), copy their trained module copies (``modules_to_save``,
        e.g. a head) into the base modules, remove every adapter, and return the plain
        base model — e.g. to save it as an ordinary model folder."""
        heads: dict[str, str] = {}
        for name in names:
            for s in self.record(name).saved_modules:
                if s in heads:
                    raise StateError(f"adapters {heads[s]!r} and {name!r} both carry a copy of {s!r}; "
                                     f"bake at most one of them")
                heads[s] = name
        self.merge_adapter(*names, safe=safe)
        sites = sites_of(self.model)
        with torch.no_grad():
            for s, name in heads.items():
                sites[s].base.load_state_dict(sites[s].adapters[name].module.state_dict())
        for site in sites.values():
            site.merged.clear()  # the updates now belong to the base weights
        self.state.merged.clear()
        return self.unwrap()

    def unwrap(self) -> nn.Module:
        """Remove every adapter and return the base model with its original modules."""
        for name in reversed(self.adapters):  # dependants were added after what they use
            self.remove_adapter(name)
        return self.model

    # ------------------------------------------------------------------ files
    def save_adapter(self, name: str, path: str | Path, format: str = "native", overwrite: bool = False,
                     store: str | Path | None = None):
        """Save to a folder (``native`` or ``peft`` format), atomically; or, for
        ``"store:NAME"`` (``"store:NAME@ALIAS"``), as the next version of NAME in the
        adapter store (``store``: its folder, default ``$POLYADAPTER_HOME/store``).
        Returns the folder, or the stored :class:`~polyadapter.store.Version`."""
        from .store import is_store_ref, save_to_store
        if is_store_ref(path):
            return save_to_store(self, name, str(path), store=store)
        from .formats import save_adapter
        return save_adapter(self, name, Path(path), format=format, overwrite=overwrite)

    def load_adapter(self, path: str | Path, name: str | None = None, activate: bool = True,
                     store: str | Path | None = None) -> AdapterRecord:
        """Load a native or PEFT folder, or ``"store:NAME[@VERSION|@ALIAS]"`` from the
        adapter store, as a new adapter (all or nothing)."""
        from .store import is_store_ref, load_from_store
        if is_store_ref(path):
            return load_from_store(self, str(path), name=name, activate=activate, store=store)
        from .formats import load_adapter
        record = load_adapter(self, Path(path), name=name)
        if activate:
            self.set_active(record.name)
        return record


def _refuse_repeats(verb: str, names: tuple) -> None:
    seen = set()
    for n in names:
        if not isinstance(n, str):
            raise AdapterNameError(f"{verb}: adapter names must be strings; found {n!r}")
        if n in seen:
            raise StateError(f"{verb}: adapter {n!r} appears twice in {list(names)}; give each name once")
        seen.add(n)


def _finite_module(module: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.parameters() if t.is_floating_point())


def _tied_weights(model: nn.Module, parts: dict, sites: dict) -> tuple[str, str] | None:
    """(site, other module) for the first site whose weight another module shares."""
    owners: dict[int, list[str]] = {}
    for module_name, module in original_modules(model).items():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module_name)
    for s in parts:
        others = [n for n in owners.get(id(sites[s].base.weight), []) if n != s]
        if others:
            return s, others[0]
    return None


def _batch_size(args: tuple, kwargs: dict) -> int:
    """The call's batch size: the first dimension of its first tensor input."""
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ConfigError("a mixed batch needs tensor inputs to tell the batch size; found none")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _is_adapter_param(name: str) -> bool:
    return ".adapters." in name

