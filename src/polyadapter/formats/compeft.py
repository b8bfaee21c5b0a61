"""Packed storage of ComPEFT adapters: ternary tensors as bits, not floats.

A ComPEFT tensor (see ``polyadapter.ops.compress.compeft``) takes at most three values:
its init ``c`` (0 for LoRA factors, 1 for (IA)^3 vectors) where an entry was dropped,
and ``c + scale`` / ``c - scale`` where it was kept. It is stored as

    <key>#mask   uint8, 1-D: the kept positions (entries != c), one bit each, row-major,
                 numpy ``packbits`` order (first entry in the high bit), zero padding bits
    <key>#sign   uint8, 1-D: one bit per kept entry in the same order, 1 = negative
    <key>#scale  one float in the tensor's own dtype (>= 0); the unpacked tensor has that dtype
    <key>#shape  int64, 1-D: the tensor's shape
    <key>#init   one float, same dtype as the scale; only where ``c`` is not 0

so a float32 tensor at density ``d`` costs ``1 + d`` bits an entry instead of 32.
Tensors that are not ternary (a ``modules_to_save`` head, or a factor trained after
compression) stay dense under their own key. Site names never hold ``#``, so the two
kinds of key cannot clash.

``pack`` is exact: it verifies bit for bit that unpacking gives the tensor back, and
keeps a tensor dense otherwise. ``unpack`` validates every packed tensor (names,
dtypes, lengths, padding bits, finite scales) and raises ``LoadError`` naming the file
and the tensor before anything is built.
"""
from __future__ import annotations

import math

import torch

from ..errors import LoadError

WEIGHTS_FILE = "adapter.compeft.safetensors"
PACKING = "compeft-ternary-v1"
SEP = "#"
PARTS = ("mask", "sign", "scale", "shape")  # required; "init" is optional
_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
MAX_DIMS = 8


# The parameters ComPEFT compresses, by method, with the init its update is taken from.
INITS = {"lora": {"lora_A": 0.0, "lora_B": 0.0}, "ia3": {"ia3_l": 1.0}}


def inits_for(method: str, sites: list[str]) -> dict[str, float]:
    """File key -> init value of every tensor ComPEFT compresses in an adapter of
    ``method`` on ``sites`` (``modules_to_save`` copies are not among them)."""
    return {f"{s}.{p}": v for s in sites for p, v in INITS.get(method, {}).items()}


# ---------------------------------------------------------------- bits
def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool 1-D -> uint8 1-D of ``ceil(n / 8)`` bytes (first bit in the high bit)."""
    bits = bits.reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.reshape(-1, 8) * _WEIGHTS.to(bits.device)).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 1-D -> the first ``n`` bits as bool."""
    bits = (packed.reshape(-1, 1) & _WEIGHTS.to(packed.device)) != 0
    return bits.reshape(-1)[:n]


# ---------------------------------------------------------------- tensors
def ternary(mask: torch.Tensor, negative: torch.Tensor, scale: torch.Tensor, init: torch.Tensor,
            shape: tuple[int, ...]) -> torch.Tensor:
    """The dense tensor: ``init`` where ``mask`` is off, ``init +/- scale`` where on
    (``negative`` holds one bool per kept entry). ``scale`` and ``init`` are 0-dim
    tensors of the result's dtype; compression builds its tensors with this same
    function, so packing and unpacking reproduce them bit for bit."""
    hi, lo = init + scale, init - scale
    out = init.expand(mask.numel()).clone()
    out[mask.reshape(-1)] = torch.where(negative, lo, hi)
    return out.reshape(shape)


def exact_scale(scale: float, init: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded (in ``dtype``) so that ``init + s`` and ``init - s`` are exact:
    then ``s`` is recovered exactly from either value when packing."""
    c = torch.tensor(init, dtype=dtype)
    return ((c + torch.tensor(abs(scale), dtype=dtype)) - c).abs()


def pack_tensor(t: torch.Tensor, init: float = 0.0) -> dict[str, torch.Tensor] | None:
    """The packed parts of ``t`` (suffix -> tensor), or None when ``t`` is not ternary
    around ``init`` (or not floating point)."""
    if not t.is_floating_point():
        return None
    t = t.detach()
    c = torch.tensor(init, dtype=t.dtype, device=t.device)
    flat = t.reshape(-1)
    mask = flat != c
    kept = flat[mask]
    negative = kept < c
    if kept.numel() == 0:
        scale = torch.zeros((), dtype=t.dtype, device=t.device)
    elif bool((~negative).any()):
        scale = kept[~negative][0] - c
    else:
        scale = c - kept[0]
    if not bool(torch.isfinite(scale)) or bool(scale < 0):
        return None
    if not torch.equal(ternary(mask, negative, scale, c, tuple(t.shape)), t):
        return None
    out = {
        "mask": pack_bits(mask).cpu(),
        "sign": pack_bits(negative).cpu(),
        "scale": scale.reshape(1).cpu(),
        "shape": torch.tensor(list(t.shape), dtype=torch.int64),
    }
    if init != 0:
        out["init"] = c.reshape(1).cpu()
    return out


def pack(tensors: dict[str, torch.Tensor], inits: dict[str, float]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pack every tensor named in ``inits`` (key -> its init value) that is ternary and
    smaller packed than dense (a tiny vector is not: each packed part has its own header
    entry); the rest stay dense. Returns (the file's tensors, keys that should have
    packed but were not ternary)."""
    out, dense = {}, []
    for key, t in tensors.items():
        if SEP in key:
            raise ValueError(f"tensor name {key!r} holds {SEP!r}, which the packed format reserves")
        parts = pack_tensor(t, inits[key]) if key in inits else None
        if parts is None and key in inits:
            dense.append(key)
        if parts is None or _cost({f"{key}{SEP}{p}": v for p, v in parts.items()}) >= _cost({key: t}):
            out[key] = t
        else:
            out.update({f"{key}{SEP}{p}": v for p, v in parts.items()})
    return out, dense


def _cost(tensors: dict[str, torch.Tensor]) -> int:
    """About the bytes these tensors take in a safetensors file: data plus a header entry
    (name, dtype, shape, offsets) of roughly the name's length and 64 characters."""
    return sum(t.numel() * t.element_size() + len(k) + 64 + 8 * t.dim() for k, t in tensors.items())


def unpack(found: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Dense tensors from a packed file's tensors, every packed group validated first."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for key, t in found.items():
        if SEP not in key:
            out[key] = t
            continue
        base, _, part = key.rpartition(SEP)
        if not base or SEP in base or part not in PARTS + ("init",):
            raise LoadError(f"{where}: tensor {key!r} is not a packed part (<name>{SEP}mask|sign|scale|shape|init)")
        groups.setdefault(base, {})[part] = t
    for base, parts in groups.items():
        if base in out:
            raise LoadError(f"{where}: tensor {base!r} is stored both dense and packed")
        out[base] = _unpack_one(base, parts, where)
    return out


def _unpack_one(key: str, parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    def bad(part: str, why: str):
        return LoadError(f"{where}: packed tensor {key!r}: {key}{SEP}{part} {why}")

    missing = [p for p in PARTS if p not in parts]
    if missing:
        raise LoadError(f"{where}: packed tensor {key!r} lacks {[f'{key}{SEP}{p}' for p in missing]}")
    shape_t, mask_b, sign_b, scale = parts["shape"], parts["mask"], parts["sign"], parts["scale"]
    if shape_t.dtype != torch.int64 or shape_t.dim() != 1 or shape_t.numel() > MAX_DIMS:
        raise bad("shape", f"must be int64 of at most {MAX_DIMS} entries; found {shape_t.dtype} "
                           f"{tuple(shape_t.shape)}")
    shape = tuple(int(v) for v in shape_t.tolist())
    if any(v < 0 for v in shape):
        raise bad("shape", f"holds a negative size: {shape}")
    n = math.prod(shape)
    for part, t in (("mask", mask_b), ("sign", sign_b)):
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise bad(part, f"must be a 1-D uint8 tensor; found {t.dtype} {tuple(t.shape)}")
    if mask_b.numel() != (n + 7) // 8:
        raise bad("mask", f"has {mask_b.numel()} bytes; shape {shape} needs {(n + 7) // 8}")
    mask = unpack_bits(mask_b, mask_b.numel() * 8)
    if mask[n:].any():
        raise bad("mask", "has padding bits set")
    mask = mask[:n]
    kept = int(mask.sum())
    if sign_b.numel() != (kept + 7) // 8:
        raise bad("sign", f"has {sign_b.numel()} bytes; {kept} kept entries need {(kept + 7) // 8}")
    negative = unpack_bits(sign_b, sign_b.numel() * 8)
    if negative[kept:].any():
        raise bad("sign", "has padding bits set")
    negative = negative[:kept]
    if not scale.is_floating_point() or scale.numel() != 1:
        raise bad("scale", f"must be one floating-point value; found {scale.dtype} {tuple(scale.shape)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise bad("scale", f"must be finite and >= 0; found {scale.reshape(-1)[0].item()}")
    init = parts.get("init")
    if init is None:
        init = torch.zeros(1, dtype=scale.dtype)
    elif init.dtype != scale.dtype or init.numel() != 1 or not bool(torch.isfinite(init).all()):
        raise bad("init", f"must be one finite value of the scale's dtype {scale.dtype}; "
                          f"found {init.dtype} {tuple(init.shape)}")
    return ternary(mask, negative, scale.reshape(()), init.reshape(()), shape)
