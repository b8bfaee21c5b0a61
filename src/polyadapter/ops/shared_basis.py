"""Joint compression of many LoRAs into one shared basis ("Compress then Serve",
Gabrielsson et al. 2024).

At every site LoRA ``i``'s update ``delta_i = s_i B_i A_i`` (out x in) becomes
``U Sigma_i V^T`` with ``U`` (out x k), ``V`` (in x k) shared by the collection and a
per-adapter ``Sigma_i`` (k x k). Stored: one basis (``(out + in) k`` numbers per site)
plus ``k^2`` per adapter and site, instead of ``(out + in) r_i`` per adapter and site.

Fitting, per site, never forming an out x in (or out x out) matrix:

1. Stack the factors: ``B = [B_1 .. B_N]`` (out x R) and ``A = [A_1; ..; A_N]``
   (R x in), ``R = sum r_i``. Thin QR: ``B = Q_b R_b``, ``A^T = Q_a R_a``. Then every
   update lives in the same small coordinates:
   ``delta_i = Q_b D_i Q_a^T`` with ``D_i = s_i R_b[:, i] R_a[:, i]^T`` (at most R x R).
2. ``U = Q_b U_c``, ``U_c`` = top-k eigenvectors of ``sum_i D_i D_i^T`` — the top-k
   eigenvectors of ``sum_i delta_i delta_i^T = sum_i s_i^2 B_i (A_i A_i^T) B_i^T``;
   ``V = Q_a V_c``, ``V_c`` = top-k eigenvectors of ``sum_i D_i^T D_i``.
3. ``refine_steps`` alternating steps (default 2): ``U_c`` = top-k eigenvectors of
   ``sum_i D_i V_c V_c^T D_i^T`` (the best U for the current V), then ``V_c`` likewise
   for the new U. Each step maximises the captured energy ``sum_i ||U^T delta_i V||^2``
   over one side exactly, so the total squared error never increases.
4. ``Sigma_i = U^T delta_i V = U_c^T D_i V_c`` (the least-squares optimum for fixed U, V).

All of this runs in float64 on R x R matrices (R = the sum of the source ranks), so it
is cheap even for large layers; only ``U = Q_b U_c`` and ``V = Q_a V_c`` touch the
layer width. The width actually used at a site is ``k_site = min(rank, in, out, R)``:
beyond ``R`` the extra directions would only carry zeros in every ``Sigma_i``, so with
``rank >= R`` the compression is exact up to float rounding.
"""
from __future__ import annotations

import hashlib
from collections import Counter

import torch

from ..errors import AdapterNameError, ConfigError
from ..methods.basis import BasisConfig, BasisLoraConfig
from .factors import lora_factors


def _top_eigvecs(sym: torch.Tensor, k: int) -> torch.Tensor:
    """The k eigenvectors of a symmetric PSD matrix with the largest eigenvalues (columns)."""
    _, vecs = torch.linalg.eigh((sym + sym.T) / 2)
    return vecs[:, -k:].flip(-1)


def fit_shared_basis(factors: list, rank: int, refine_steps: int = 2):
    """Fit one site. ``factors``: each source's :class:`~polyadapter.ops.factors.LoraFactors`.

    Returns ``(U (out, k), V (in, k), sigmas (N, k, k), err2 (N,), norm2 (N,))`` in float64,
    where ``err2[i] = ||delta_i - U Sigma_i V^T||_F^2`` and ``norm2[i] = ||delta_i||_F^2``."""
    dev = factors[0].A.device
    dev = torch.device("cpu") if dev.type == "mps" else dev   # no float64 on MPS
    As = [f.A.to(dev, torch.float64) for f in factors]
    Bs = [f.B.to(dev, torch.float64) for f in factors]
    Qb, Rb = torch.linalg.qr(torch.cat(Bs, dim=1))            # (out, p), (p, R)
    Qa, Ra = torch.linalg.qr(torch.cat(As, dim=0).T)          # (in, q), (q, R)
    D, start = [], 0
    for f, A in zip(factors, As):
        r = A.shape[0]
        D.append(f.scaling * Rb[:, start:start + r] @ Ra[:, start:start + r].T)
        start += r
    D = torch.stack(D)                                        # (N, p, q)
    k = min(rank, D.shape[1], D.shape[2])
    Uc = _top_eigvecs(torch.einsum("npq,nsq->ps", D, D), k)
    Vc = _top_eigvecs(torch.einsum("npq,nps->qs", D, D), k)
    for _ in range(refine_steps):
        DV = D @ Vc                                           # (N, p, k)
        Uc = _top_eigvecs(torch.einsum("npk,nsk->ps", DV, DV), k)
        UD = Uc.T @ D                                         # (N, k, q)
        Vc = _top_eigvecs(torch.einsum("nkq,nks->qs", UD, UD), k)
    sigmas = Uc.T @ D @ Vc                                    # (N, k, k)
    err2 = (D - Uc @ sigmas @ Vc.T).pow(2).sum((1, 2))
    return Qb @ Uc, Qa @ Vc, sigmas, err2, D.pow(2).sum((1, 2))


def stored_error2(f, U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor) -> float:
    """``||s B A - U sigma V^T||_F^2`` for the tensors as stored (any dtype), from factors:
    with ``P = [s B, -U sigma]`` and ``Q = [A^T, V]`` the difference is ``P Q^T``, whose
    squared norm is ``sum((P^T P) * (Q^T Q))`` — (r + k)-sized products, no out x in matrix."""
    dev = f.A.device if f.A.device.type != "mps" else torch.device("cpu")
    U, sigma, V = (t.detach().to(dev, torch.float64) for t in (U, sigma, V))
    P = torch.cat([f.scaling * f.B.to(dev, torch.float64), -U @ sigma], dim=1)
    Q = torch.cat([f.A.to(dev, torch.float64).T, V], dim=1)
    return max(float(((P.T @ P) * (Q.T @ Q)).sum()), 0.0)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def compress_to_shared_basis(pm, adapters: list[str], basis_name: str, rank: int, *, suffix: str = "-jd",
                             activate: bool = False, refine_steps: int = 2) -> dict:
    """Compress the LoRA adapters ``adapters`` into one shared basis.

    Installs a ``basis`` adapter ``basis_name`` (U, V at every site) and, per source,
    a ``basis_lora`` adapter ``<source><suffix>`` (its Sigma at every site, plus copies
    of the source's ``modules_to_save``); the sources stay untouched. Every source must
    be a LoRA on the same sites. ``rank`` bounds the basis width per site (see the
    module docstring). ``activate``: make the first compressed adapter active.
    All or nothing: on any error the model is left as it was.

    Returns ``{"basis", "adapters": {source: new name}, "ranks": {site: k},
    "storage_ratio", "source_bytes", "compressed_bytes", "relative_errors": {source: e},
    "fit_relative_errors": {source: e}}`` where ``e = ||delta - U Sigma V^T||_F / ||delta||_F``
    over all sites of the source — for ``relative_errors`` with U, V, Sigma as stored (in
    the base's dtype: what is served), for ``fit_relative_errors`` as fitted (float64) — and
    ``storage_ratio`` = source factor bytes / (basis bytes + all sigma bytes)."""
    if isinstance(adapters, str) or not adapters:
        raise ConfigError(f"compress: adapters must be a non-empty list of LoRA adapter names; found {adapters!r}")
    adapters = list(adapters)
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"compress: an adapter is listed twice in {adapters}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"compress: rank={rank!r} is invalid; expected a positive integer")
    if not isinstance(refine_steps, int) or refine_steps < 0:
        raise ConfigError(f"compress: refine_steps={refine_steps!r} is invalid; expected an integer >= 0")
    factors = {n: lora_factors(pm, n) for n in adapters}      # refuses non-LoRA adapters
    sites = list(factors[adapters[0]])
    for n in adapters[1:]:
        if set(factors[n]) != set(sites):
            only_here = sorted(set(factors[n]) - set(sites))
            only_first = sorted(set(sites) - set(factors[n]))
            raise ConfigError(
                f"compress: the LoRAs must act on the same sites to share a basis; {n!r} differs from "
                f"{adapters[0]!r} (sites only in {n!r}: {only_here[:3]}, only in {adapters[0]!r}: {only_first[:3]})")
    new_names = {n: n + suffix for n in adapters}
    for name in [basis_name, *new_names.values()]:
        pm.check_new_name(name, "compress")
    if basis_name in new_names.values() or len(set(new_names.values())) != len(new_names):
        raise AdapterNameError(f"compress: the basis name {basis_name!r} and the new names "
                               f"{list(new_names.values())} must all differ")

    # ---- fit every site
    U, V, sigma, ranks = {}, {}, {n: {} for n in adapters}, {}
    err2, norm2 = dict.fromkeys(adapters, 0.0), dict.fromkeys(adapters, 0.0)
    for site in sites:
        u, v, s, e2, d2 = fit_shared_basis([factors[n][site] for n in adapters], rank, refine_steps)
        U[site], V[site], ranks[site] = u, v, u.shape[1]
        for i, n in enumerate(adapters):
            sigma[n][site] = s[i]
            err2[n] += float(e2[i])
            norm2[n] += float(d2[i])
    fit_errors = {n: (err2[n] / norm2[n]) ** 0.5 if norm2[n] > 0 else 0.0 for n in adapters}

    # ---- plan the basis
    k = Counter(ranks.values()).most_common(1)[0][0]
    config = BasisConfig(rank=k, rank_pattern={s: v for s, v in ranks.items() if v != k} or None,
                         targets=sites)
    plan = pm.plan_adapter(basis_name, config)
    plan.load_tensors({f"{s}.{t}": (U if t == "U" else V)[s] for s in sites for t in ("U", "V")})
    basis_state = plan.state_dict()
    digest = hashlib.sha256()
    for key in sorted(basis_state):
        digest.update(key.encode())
        digest.update(basis_state[key].detach().float().cpu().numpy().tobytes())
    basis_id = digest.hexdigest()[:16]
    plan.record.config = plan.record.config.replace(basis_id=basis_id)

    source_bytes = sum(_nbytes(v for key, v in pm.adapter_state_dict(n).items() if key.rsplit(".", 1)[0] in sites)
                       for n in adapters)
    basis_bytes = _nbytes(basis_state.values())
    provenance = {"operation": "compress", "method": "shared_basis", "sources": list(adapters), "rank": rank,
                  "refine_steps": refine_steps, "basis_id": basis_id}

    installed: list[str] = []
    try:
        pm.install(plan)
        installed.append(basis_name)
        lora_plans = {}
        for n in adapters:
            saved = list(pm.record(n).saved_modules)
            cfg = BasisLoraConfig(basis=basis_name, basis_id=basis_id, targets=sites, modules_to_save=saved)
            lp = pm.plan_adapter(new_names[n], cfg)
            tensors = {f"{s}.sigma": sigma[n][s] for s in sites}
            for s, copy in pm.parts(n).items():
                if s in saved:
                    tensors.update({f"{s}.{key}": v for key, v in copy.state_dict().items()})
            lp.load_tensors(tensors)
            lora_plans[n] = lp
        errors = {}
        for n, lp in lora_plans.items():   # the error of what is served: the stored tensors, in their dtype
            e2 = sum(stored_error2(factors[n][s], basis_state[f"{s}.U"], lp.parts[s].sigma, basis_state[f"{s}.V"])
                     for s in sites)
            errors[n] = (e2 / norm2[n]) ** 0.5 if norm2[n] > 0 else 0.0
        sigma_bytes = sum(_nbytes(lp.parts[s].sigma for s in sites) for lp in lora_plans.values())
        ratio = source_bytes / (basis_bytes + sigma_bytes)
        provenance["storage_ratio"] = ratio
        plan.record.provenance = dict(provenance)
        for n, lp in lora_plans.items():
            lp.record.provenance = {**provenance, "source": n, "relative_error": errors[n]}
            pm.install(lp)
            installed.append(new_names[n])
    except BaseException:
        for name in reversed(installed):
            pm.remove_adapter(name)
        raise
    if activate:
        pm.set_active(new_names[adapters[0]])
    return {"basis": basis_name, "adapters": dict(new_names), "ranks": ranks, "storage_ratio": ratio,
            "source_bytes": source_bytes, "compressed_bytes": basis_bytes + sigma_bytes,
            "relative_errors": errors, "fit_relative_errors": fit_errors}
