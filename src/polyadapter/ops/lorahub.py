"""LoraHub: a gradient-free search for the weights of a LoRA composition.

    record = lorahub(pm, "hub", ["qa", "nli", "summ"], examples, budget=40)
    record.provenance["weights"]        # the best weights found, one per source

Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition": given a few examples of a new task, find weights ``w`` (one per source
LoRA) for the element-wise composition of the sources' factors, at every site

    A = sum_i w_i A_i,    B = sum_i w_i B_i,    delta = B @ A,

by minimising, without gradients (nevergrad),

    mean loss over the examples  +  regularization * sum_i |w_i|.

The search starts at ``w = 0`` (the base model), as in the paper, inside ``bounds``.

Details:

- Every source must be a LoRA with the same sites and, at each site, the same rank
  (ranks may differ between sites). PiSSA sources are read as the rank-2r LoRA they
  are equivalent to (``lora_factors``), so a PiSSA source of rank r composes with plain
  LoRAs of rank 2r.
- Scalings: each source's factors carry the square root of its scaling on both A and B
  (``sqrt(s_i) A_i``, ``sqrt(s_i) B_i``) and the result has scaling 1, so a one-hot
  ``w`` gives that source exactly, whatever its ``alpha`` and rank; with equal scalings
  this is the paper's composition up to that common factor.
- Candidates run fast: one scratch LoRA is installed once, and every candidate's factors
  are copied into its parameters in place (no re-planning), in eval mode and without
  gradients, with only the scratch adapter active. The scratch adapter is removed and
  the model's active setup and train/eval mode are restored afterwards, also on error.
- ``modules_from`` names an adapter whose ``modules_to_save`` (e.g. a task's
  classification head) the result copies; the search runs with that copy too, so the
  weights are found for the modules the result will have.
- The result is the best *evaluated* candidate (the objective is deterministic), not
  the optimizer's own recommendation.
- Seeding: ``seed`` seeds the parametrization's random state, which nevergrad's
  optimizers draw from, so a run repeats exactly on the same model and examples.
"""
from __future__ import annotations

import difflib
import math
import numbers
import warnings
from collections.abc import Mapping

import torch

from ..errors import ConfigError
from .factors import _temporary_name, install_lora, lora_factors, source_names

SCRATCH = "lorahub-scratch"


def lorahub(pm, name: str, adapters, examples, *, loss_fn=None, budget: int = 40, regularization: float = 0.05,
            seed: int = 0, optimizer: str = "NGOpt", bounds=(-1.5, 1.5), modules_from: str | None = None,
            progress: bool = True, activate: bool = False):
    """Install adapter ``name`` on ``pm``: the composition of the LoRA ``adapters`` with
    the weights a gradient-free search finds best on ``examples``. Returns its record.

    ``examples``: a list of input dicts, each run as ``pm(**batch)`` (tensors are moved
    to the model's device). ``loss_fn``: None to use the model output's ``.loss`` (the
    examples then carry ``labels``), or ``loss_fn(output, batch) -> tensor`` (a scalar).
    The objective is the mean loss over the examples plus ``regularization * sum |w_i|``.
    ``budget``: how many candidates are evaluated (each one pass over the examples).
    ``optimizer``: a name in nevergrad's registry (``NGOpt`` chooses by itself).
    ``bounds``: (low, high) for every weight; must contain 0, where the search starts.
    ``modules_from``: an adapter whose ``modules_to_save`` the result (and the search)
    uses. ``progress``: a progress bar. ``activate``: make the result the active setup.

    Provenance: operation, adapters, weights (best), loss (``objective`` and plain
    ``loss`` of the best), budget, optimizer, seed, regularization, bounds, history (the
    objective of every evaluated candidate, in order; None where it was not finite).
    Raises ConfigError (AdapterNameError for the new name) before anything changes for
    bad inputs; an error during the search leaves the model's adapters as they were."""
    import nevergrad as ng
    import numpy as np
    from tqdm.auto import tqdm

    where = f"lorahub {name!r}"
    adapters = _check_inputs(pm, name, adapters, modules_from, budget, regularization, seed, bounds, loss_fn, where)
    budget, seed = int(budget), int(seed)
    examples = _check_examples(examples, where)
    if optimizer not in ng.optimizers.registry:
        close = difflib.get_close_matches(str(optimizer), list(ng.optimizers.registry), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else " (e.g. 'NGOpt', 'OnePlusOne', 'CMA')"
        raise ConfigError(f"{where}: unknown nevergrad optimizer {optimizer!r}{hint}")
    stacks = lorahub_stacks(pm, adapters, where=where)
    if modules_from is None:
        with_saved = [a for a in adapters if pm.record(a).saved_modules]
        if with_saved:
            warnings.warn(f"{where}: sources {with_saved} have modules_to_save (e.g. a head) but modules_from is "
                          f"None, so the search and the result use the base model's modules there",
                          stacklevel=2)

    device = _device(pm)
    examples = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in examples]
    low, high = float(bounds[0]), float(bounds[1])
    parametrization = ng.p.Array(init=np.zeros(len(adapters))).set_bounds(low, high)
    parametrization.random_state = np.random.RandomState(seed)
    search = ng.optimizers.registry[optimizer](parametrization=parametrization, budget=budget, num_workers=1)

    history: list[float] = []
    best = (math.inf, math.inf, None)  # objective, loss, weights
    previous_setup, was_training = pm.state.setup, pm.training
    scratch = _temporary_name(pm, SCRATCH)
    zeros = {s: (torch.zeros_like(A[0]), torch.zeros_like(B[0])) for s, (A, B) in stacks.items()}
    install_lora(pm, scratch, zeros, modules_from=modules_from, provenance={"operation": "lorahub-scratch"})
    bar = tqdm(total=budget, desc=f"lorahub {name}", disable=not progress, unit="candidate", dynamic_ncols=True)
    try:
        parts = pm.parts(scratch)
        pm.set_active(scratch)
        pm.eval()
        with warnings.catch_warnings(), torch.no_grad():
            _quiet_optimizer_warnings(ng)
            for _ in range(budget):
                candidate = search.ask()
                w = np.asarray(candidate.value, dtype=np.float64)
                _load_candidate(parts, stacks, w)
                loss = _mean_loss(pm, examples, loss_fn, where)
                objective = loss + regularization * float(np.abs(w).sum())
                if not math.isfinite(objective):
                    objective = math.inf
                search.tell(candidate, objective)
                history.append(objective)
                if objective < best[0]:
                    best = (objective, loss, [float(v) for v in w])
                bar.update(1)
                if math.isfinite(best[0]):
                    bar.set_postfix(best=f"{best[0]:.4f}")
    finally:
        bar.close()
        _stop_background_threads(search)
        del search
        pm.remove_adapter(scratch)
        if previous_setup is None:
            pm.set_active()
        else:
            pm.set_active(previous_setup)
        pm.train(was_training)

    objective, loss, weights = best
    if weights is None:
        raise ConfigError(f"{where}: every one of the {budget} candidates gave a non-finite loss; check the "
                          f"examples, the loss and the bounds {bounds}")
    provenance = {
        "operation": "lorahub", "adapters": list(adapters), "weights": weights,
        "loss": {"objective": objective, "loss": loss},
        "budget": budget, "optimizer": optimizer, "seed": seed, "regularization": float(regularization),
        "bounds": [low, high],
        "history": [v if math.isfinite(v) else None for v in history],
    }
    if modules_from is not None:
        provenance["modules_from"] = modules_from
    factors = lorahub_factors(stacks, weights)
    return install_lora(pm, name, factors, modules_from=modules_from, provenance=provenance, activate=activate)


def lorahub_stacks(pm, adapters, where: str = "lorahub") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Site -> (A stack (n, r, in), B stack (n, out, r)): the sources' factors with the
    square root of each source's scaling on both, float32, in the order of ``adapters``.
    Raises ConfigError naming the offenders unless every source is a LoRA with the same
    sites and the same rank at each site."""
    adapters = list(adapters)
    if not adapters:
        raise ConfigError(f"{where}: give at least one LoRA adapter to compose")
    sources = {a: lora_factors(pm, a) for a in adapters}
    first = adapters[0]
    ref = sources[first]
    for a in adapters[1:]:
        missing = [s for s in ref if s not in sources[a]]
        extra = [s for s in sources[a] if s not in ref]
        if missing or extra:
            what = []
            if missing:
                what.append(f"lacks {len(missing)} site(s) of {first!r} (e.g. {missing[0]!r})")
            if extra:
                what.append(f"has {len(extra)} site(s) {first!r} lacks (e.g. {extra[0]!r})")
            raise ConfigError(f"{where}: every source must act at the same sites; adapter {a!r} "
                              f"{' and '.join(what)}")
        for s, f in ref.items():
            g = sources[a][s]
            if g.A.shape != f.A.shape or g.B.shape != f.B.shape:
                raise ConfigError(f"{where}: every source must have the same rank at each site; at site {s!r} "
                                  f"adapter {a!r} has rank {g.rank} but {first!r} has rank {f.rank}"
                                  f"{_pissa_note(pm, [first, a])}")
    stacks = {}
    for s in ref:
        fs = [sources[a][s] for a in adapters]
        roots = [math.sqrt(f.scaling) for f in fs]
        stacks[s] = (torch.stack([f.A * r for f, r in zip(fs, roots)]),
                     torch.stack([f.B * r for f, r in zip(fs, roots)]))
    return stacks


def lorahub_factors(stacks: dict, weights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Site -> (A, B) = (sum_i w_i A_i, sum_i w_i B_i) over :func:`lorahub_stacks`."""
    out = {}
    for s, (A, B) in stacks.items():
        w = torch.as_tensor(weights, dtype=A.dtype, device=A.device)
        out[s] = (torch.tensordot(w, A, dims=1), torch.tensordot(w, B, dims=1))
    return out


# ---------------------------------------------------------------- search helpers
def _load_candidate(parts: dict, stacks: dict, weights) -> None:
    """Copy a candidate's factors into the scratch adapter's parameters, in place."""
    for s, (A, B) in lorahub_factors(stacks, weights).items():
        parts[s].lora_A.copy_(A)
        parts[s].lora_B.copy_(B)


def _mean_loss(pm, examples: list[dict], loss_fn, where: str) -> float:
    total = 0.0
    for i, batch in enumerate(examples):
        output = pm(**batch)
        if loss_fn is None:
            loss = getattr(output, "loss", None)
            if loss is None:
                raise ConfigError(f"{where}: the model's output for examples[{i}] has no .loss; give every example "
                                  f"'labels', or pass loss_fn(output, batch)")
        else:
            loss = loss_fn(output, batch)
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ConfigError(f"{where}: the loss for examples[{i}] has shape {tuple(loss.shape)}; "
                                  f"expected a scalar")
            loss = loss.item()
        try:
            total += float(loss)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: the loss for examples[{i}] is {loss!r}; expected a number") from None
    return total / len(examples)


def _quiet_optimizer_warnings(ng) -> None:
    """Hide nevergrad's and scipy's notes about internal settings (COBYLA's RHOEND,
    an underlying optimizer finishing before the budget) during the search."""
    warnings.filterwarnings("ignore", message=r"COBYLA: Invalid", category=UserWarning)
    warnings.filterwarnings("ignore", category=ng.errors.FinishedUnderlyingOptimizerWarning)


def _stop_background_threads(search) -> None:
    """Stop the threads of nevergrad's recast (scipy-based) optimizers, which NGOpt may
    pick: one left waiting after an interrupted search would block interpreter exit."""
    todo, seen = [search], set()
    while todo:
        opt = todo.pop()
        if id(opt) in seen or not hasattr(opt, "__dict__"):
            continue
        seen.add(id(opt))
        thread = getattr(opt, "_messaging_thread", None)
        if thread is not None:
            thread.stop()  # only posts a stop message to the thread's queue
        for value in vars(opt).values():
            items = value if isinstance(value, (list, tuple)) else [value]
            todo.extend(v for v in items if hasattr(v, "ask") and hasattr(v, "tell"))


# ---------------------------------------------------------------- checks
def _check_inputs(pm, name, adapters, modules_from, budget, regularization, seed, bounds, loss_fn,
                  where) -> list[str]:
    pm.check_new_name(name)
    adapters = source_names(pm, adapters, where, kind="LoRA adapter", purpose="to compose")
    duplicates = sorted({a for a in adapters if adapters.count(a) > 1})
    if duplicates:
        raise ConfigError(f"{where}: adapters {duplicates} are listed more than once")
    for a in adapters:
        method = pm.record(a).config.method
        if method != "lora":
            raise ConfigError(f"{where}: adapter {a!r} is a {method} adapter; LoraHub composes LoRA adapters only")
    if modules_from is not None and modules_from not in pm.adapters:
        raise ConfigError(f"{where}: modules_from={modules_from!r} names no adapter; adapters: {pm.adapters}")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ConfigError(f"{where}: budget must be a positive integer (candidates to evaluate); found {budget!r}")
    if isinstance(regularization, bool) or not isinstance(regularization, (int, float)) \
            or not math.isfinite(regularization) or regularization < 0:
        raise ConfigError(f"{where}: regularization must be a finite number >= 0; found {regularization!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 32:
        raise ConfigError(f"{where}: seed must be an integer in [0, 2**32); found {seed!r}")
    try:
        low, high = (float(v) for v in bounds)
        if isinstance(bounds, (str, bytes)) or any(isinstance(v, bool) for v in bounds):
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: bounds must be two numbers (low, high); found {bounds!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= 0 <= high and low < high):
        raise ConfigError(f"{where}: bounds must be finite with low <= 0 <= high and low < high (the search "
                          f"starts at 0); found {bounds!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"{where}: loss_fn must be None or a callable loss_fn(output, batch); found {loss_fn!r}")
    return adapters


def _check_examples(examples, where: str) -> list[dict]:
    if isinstance(examples, Mapping):
        raise ConfigError(f"{where}: examples must be a list of input dicts (batches); found one dict — "
                          f"wrap it in a list")
    try:
        examples = list(examples)
    except TypeError:
        raise ConfigError(f"{where}: examples must be a list of input dicts; found {type(examples).__name__}") \
            from None
    if not examples:
        raise ConfigError(f"{where}: examples is empty; give at least one batch of the new task")
    for i, batch in enumerate(examples):
        if not isinstance(batch, Mapping) or not batch:
            raise ConfigError(f"{where}: examples[{i}] must be a non-empty dict of model inputs; "
                              f"found {type(batch).__name__}")
    return examples


def _pissa_note(pm, names: list[str]) -> str:
    pissa = [a for a in names if getattr(pm.record(a).config, "init", None) == "pissa"]
    return f" (PiSSA adapters {pissa} count as rank 2r)" if pissa else ""


def _device(pm) -> torch.device:
    p = next(pm.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
