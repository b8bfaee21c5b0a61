"""Compressing adapters: truncated SVD of LoRA updates, and ComPEFT.

    svd_compress(pm, "task", "task-r4", rank=4)        # best rank-4 LoRA, site by site
    svd_compress(pm, "task", "task-e", energy=0.9)     # smallest rank per site holding 90%
    compeft(pm, "task", "task-c", density=0.1)         # top 10% signs x one scale per tensor
    storage_bytes(pm, "task-c")                        # bytes of its weights file as saved

Every result is an ordinary adapter installed on the same model, with its provenance
(``operation: "compress"``, the method, the source, the settings, the per-site ranks
for SVD and ``storage_ratio``). A ComPEFT result holds dense tensors in memory and is
saved packed by the native format (``formats.compeft``: bits for the kept positions and
their signs, one scale per tensor).

``storage_ratio`` = ``storage_bytes(source) / storage_bytes(result)``: the exact sizes
of the two safetensors weights files the native format writes (header included),
computed by serialising the tensors in memory, with nothing written to disk.

Inputs are checked before anything is built, and results are installed last, so an
error leaves the model as it was.
"""
from __future__ import annotations

import copy
import math

import torch
from safetensors.torch import save as safetensors_bytes

from ..errors import ConfigError
from ..formats import compeft as packed
from ..formats import native
from .factors import LoraFactors, install_lora, lora_factors

SCALES = ("std", "mean")


# ====================================================================== sizes
def storage_bytes(pm, name: str) -> int:
    """Bytes of adapter ``name``'s weights file as the native format saves it
    (``adapter.safetensors``, or ``adapter.compeft.safetensors`` for ComPEFT results):
    its exact size, header included, computed in memory."""
    _, tensors = native.weights_for(pm, name)
    return len(safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def _with_ratio(pm, source: str, result: str) -> None:
    record = pm.record(result)
    record.provenance["storage_ratio"] = storage_bytes(pm, source) / storage_bytes(pm, result)


def _check_new_name(pm, new_name) -> None:
    pm.check_new_name(new_name, "compress")


# ====================================================================== SVD
def svd_compress(pm, name: str, new_name: str, *, rank: int | None = None, energy: float | None = None,
                 activate: bool = False):
    """A new LoRA ``new_name`` whose update at every site is the truncated SVD of LoRA
    ``name``'s update ``delta_W = scaling * B @ A``.

    ``rank``: keep the top ``rank`` singular triplets at every site (at most the source
    rank there; a layer narrower than ``rank`` keeps all it has). By Eckart-Young this is
    the best rank-``rank`` approximation of each site's update, in Frobenius and spectral
    norm. ``energy`` in (0, 1]: at each site keep the smallest rank whose singular values
    hold at least that share of ``||delta_W||_F^2`` (at least 1), so ranks may differ per
    site (written as ``rank_pattern``). Pass exactly one of the two.

    The SVD is computed from the factors, never from the dense ``out x in`` matrix:
    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (reduced QR), then the SVD of the small core
    ``scaling * R_B R_A^T = U S V^T`` gives ``delta_W = (Q_B U) S (Q_A V)^T`` (float64).
    The new factors split the singular values evenly (``B' = Q_B U_k sqrt(S_k)``,
    ``A' = sqrt(S_k) V_k^T Q_A^T``) with scaling 1. PiSSA sources are read as the plain
    rank-2r LoRA they equal, so the result is a plain LoRA. ``modules_to_save`` copies
    are carried over; dropout and rsLoRA settings are not (the result has scaling 1).

    Provenance: ``{"operation": "compress", "method": "svd", "source", "rank" | "energy",
    "ranks": {site: r}, "storage_ratio"}``. Returns the new adapter's record."""
    record = pm.record(name)
    if record.config.method != "lora":
        raise ConfigError(f"svd_compress: adapter {name!r} is a {record.config.method} adapter; "
                          f"it needs a LoRA adapter")
    if (rank is None) == (energy is None):
        raise ConfigError(f"svd_compress: pass exactly one of rank= or energy= (got rank={rank!r}, energy={energy!r})")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"svd_compress: rank={rank!r} is invalid; expected a positive integer")
    if energy is not None and (not isinstance(energy, (int, float)) or isinstance(energy, bool)
                               or not 0 < energy <= 1):
        raise ConfigError(f"svd_compress: energy={energy!r} is invalid; expected a number in (0, 1]")
    _check_new_name(pm, new_name)
    factors = lora_factors(pm, name)
    if rank is not None:
        for site, f in factors.items():
            if rank > f.rank:
                raise ConfigError(f"svd_compress: rank={rank} exceeds the rank of adapter {name!r} at site "
                                  f"{site!r} ({f.rank}); use rank <= {min(g.rank for g in factors.values())}")
    new, ranks = {}, {}
    for site, f in factors.items():
        U, S, Vh = factored_svd(f)
        k = rank if rank is not None else energy_rank(S, energy)
        k = max(1, min(k, S.numel()))
        root = S[:k].sqrt()
        new[site] = ((root[:, None] * Vh[:k]).float(), (U[:, :k] * root[None, :]).float())
        ranks[site] = k
    provenance = {"operation": "compress", "method": "svd", "source": name}
    provenance.update({"rank": rank} if rank is not None else {"energy": float(energy)})
    provenance["ranks"] = ranks
    result = install_lora(pm, new_name, new, modules_from=name if record.saved_modules else None,
                          provenance=provenance, activate=activate)
    _with_ratio(pm, name, new_name)
    return result


def factored_svd(f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` (float64, thin) with ``U diag(S) Vh = scaling * B @ A``, from QRs of
    the factors and the SVD of an at most ``r x r`` core."""
    A, B = f.A.double(), f.B.double()
    Qb, Rb = torch.linalg.qr(B, mode="reduced")       # (out, p), (p, r)
    Qa, Ra = torch.linalg.qr(A.T, mode="reduced")     # (in, q), (q, r)
    U, S, Vh = torch.linalg.svd(f.scaling * (Rb @ Ra.T), full_matrices=False)
    return Qb @ U, S, Vh @ Qa.T


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest k with ``sum(S[:k]^2) >= energy * sum(S^2)`` (1 for a zero update).
    A relative slack of 1e-12 absorbs rounding, so ``energy=1`` gives the numerical rank."""
    cum = torch.cumsum(S.double() ** 2, dim=0)
    if cum.numel() == 0 or cum[-1] <= 0:
        return 1
    i = int(torch.searchsorted(cum, energy * float(cum[-1]) * (1 - 1e-12)))
    return min(i + 1, S.numel())


# ====================================================================== ComPEFT
def compeft(pm, name: str, new_name: str, *, density: float = 0.1, scale: str = "std", multiplier: float = 1.0,
            activate: bool = False):
    """ComPEFT (Yadav et al., 2023, "ComPEFT: Compression for Communicating Parameter
    Efficient Updates via Sparsification and Quantization") of a LoRA or (IA)^3 adapter.

    For every tensor of the adapter's update — LoRA: ``lora_A`` and ``lora_B`` (the task
    vector relative to zero); (IA)^3: ``tau = ia3_l - 1`` (relative to its init of ones) —
    keep the ``k = max(1, floor(density * n + 1/2))`` entries of largest magnitude
    (exactly k, ties broken by ``torch.topk``; see :func:`kept_count`), set each kept entry
    to ``sign * alpha`` with ONE scalar ``alpha`` per tensor, and zero the rest.

    ``scale="std"`` is the paper's choice: ``alpha = multiplier * sigma(tau)``, where
    ``sigma(tau)`` is the standard deviation of the original (dense, unsparsified) update
    and ``multiplier`` is the paper's constant ``alpha``, a hyperparameter the paper tunes
    on validation data (over values from about 0.5 to 10; it matters less for larger
    models). Here ``sigma`` is the population std (no Bessel correction) of each tensor, so
    the compression is per tensor rather than over the whole flattened task vector.
    ``scale="mean"``: ``alpha = multiplier * mean |kept value|``, which (with multiplier
    1) keeps each tensor's L1 norm over the kept entries, and so at ``density=1`` its whole
    L1 norm. Kept entries that are exactly 0 stay 0.

    ``alpha`` is rounded in the tensor's dtype so that ``init +/- alpha`` are exact and the
    packed form (``formats.compeft``) restores every tensor bit for bit. ``modules_to_save``
    copies are carried over uncompressed. The result has the source's config and holds
    dense tensors; ``pm.save_adapter`` (native format) stores it packed: float32 at
    density d costs about ``1 + d`` bits an entry instead of 32. PiSSA LoRAs are refused
    (their update is relative to the PiSSA init, not zero): ``svd_compress`` them first.

    Provenance: ``{"operation": "compress", "method": "compeft", "source", "density",
    "scale", "multiplier", "storage_ratio"}``. Returns the new adapter's record."""
    record = pm.record(name)
    method = record.config.method
    if method not in packed.INITS:
        raise ConfigError(f"compeft: adapter {name!r} is a {method} adapter; compeft works on "
                          f"{sorted(packed.INITS)} adapters")
    if method == "lora" and getattr(record.config, "init", "default") == "pissa":
        raise ConfigError(f"compeft: adapter {name!r} is a PiSSA LoRA, whose update is not relative to zero; "
                          f"svd_compress it to a plain LoRA first")
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
        raise ConfigError(f"compeft: density={density!r} is invalid; expected a number in (0, 1]")
    if scale not in SCALES:
        raise ConfigError(f"compeft: scale={scale!r} is invalid; expected one of {list(SCALES)}")
    if (not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool) or not math.isfinite(multiplier)
            or multiplier <= 0):
        raise ConfigError(f"compeft: multiplier={multiplier!r} is invalid; expected a positive number")
    _check_new_name(pm, new_name)
    plan = pm.plan_adapter(new_name, copy.deepcopy(record.config))
    inits = packed.inits_for(method, record.sites)
    tensors = {}
    for key, t in pm.adapter_state_dict(name).items():
        if key in inits:
            tensors[key] = compeft_tensor(t, density, scale=scale, multiplier=multiplier, init=inits[key])
        else:
            tensors[key] = t.detach().clone()
    for key, want in plan.state_dict().items():
        if key not in tensors or tuple(tensors[key].shape) != tuple(want.shape):
            raise ConfigError(f"compeft: adapter {name!r} does not fit its own config at {key!r}")
    plan.load_tensors(tensors)
    plan.record.provenance = {"operation": "compress", "method": "compeft", "source": name,
                              "density": float(density), "scale": scale, "multiplier": float(multiplier)}
    pm.install(plan)
    _with_ratio(pm, name, new_name)
    if activate:
        pm.set_active(new_name)
    return plan.record


def kept_count(n: int, density: float) -> int:
    """How many of ``n`` entries ComPEFT keeps: ``density * n`` rounded half up, at least 1."""
    return 0 if n == 0 else min(n, max(1, math.floor(density * n + 0.5)))


def compeft_tensor(t: torch.Tensor, density: float, *, scale: str = "std", multiplier: float = 1.0,
                   init: float = 0.0) -> torch.Tensor:
    """One tensor compressed: ``init`` where dropped, ``init + sign(tau) * alpha`` on the
    top-k entries of ``|tau|``, ``tau = t - init`` (see :func:`compeft`). Same dtype."""
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    tau = t.detach().to(work).reshape(-1) - init
    n = tau.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
    if n:
        mask[tau.abs().topk(kept_count(n, density)).indices] = True
    mask &= tau != 0
    kept = tau[mask]
    if scale == "std":
        alpha = float(tau.std(correction=0)) if n else 0.0
    else:
        alpha = float(kept.abs().mean()) if kept.numel() else 0.0
    alpha *= multiplier
    s = packed.exact_scale(alpha, init, t.dtype).to(t.device)
    c = torch.tensor(init, dtype=t.dtype, device=t.device)
    return packed.ternary(mask, kept < 0, s, c, tuple(t.shape))
