"""Gathered (per-row adapter) kernels: ``torch_ops`` against a naive per-row loop, and
``triton_ops`` against ``torch_ops``: on CPU through Triton's interpreter (in a
subprocess: TRITON_INTERPRET must be set before the kernels are decorated), and
compiled on a GPU when there is one.

Run as a script (``TRITON_INTERPRET=1 python tests/test_kernels.py``), this file does
the interpreter parity checks and exits non-zero on any mismatch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from polyadapter import kernels
from polyadapter.kernels import torch_ops

# Error allowed, relative to the largest magnitude of the reference (at least 1).
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).abs().max()) / max(1.0, float(ref.abs().max())) if ref.numel() else 0.0


def naive_linear(x, weight, slot, bias=None, scale=None, out=None):
    """Plain loop over rows, in float64."""
    rows = []
    for i in range(x.shape[0]):
        s = int(slot[i])
        y = x[i].double() @ weight[s].double().T
        if bias is not None:
            y = y + bias[s].double()
        if scale is not None:
            y = y * float(scale[s])
        rows.append(y if out is None else out[i].double() + y)
    return torch.stack(rows)


def naive_lora(x, A, B, slot, scale, out=None):
    rows = []
    for i in range(x.shape[0]):
        s = int(slot[i])
        y = float(scale[s]) * (x[i].double() @ A[s].double().T @ B[s].double().T)
        rows.append(y if out is None else out[i].double() + y)
    return torch.stack(rows)


def make(n, L, k, m, r, S, dtype, seed=0):
    """Inputs with outputs of order one: x, weight bank, bias, scale, A, B, out."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    return dict(x=rnd(n, L, k), weight=rnd(S, m, k, std=k ** -0.5), bias=rnd(S, m),
                scale=torch.rand(S, generator=g) + 0.5, A=rnd(S, r, k, std=k ** -0.5),
                B=rnd(S, m, r, std=r ** -0.5), out=rnd(n, L, m))


# (n, L, k, m, r, slots): mixed and repeated slots, one row, one token per row, long rows.
CASES = {
    "bgmv-mixed": (5, 1, 24, 20, 4, [2, 0, 1, 2, 0]),
    "sgmv-repeated": (3, 9, 33, 17, 8, [1, 1, 1]),
    "single-row": (1, 6, 16, 40, 16, [3]),
    "single-token-row": (1, 1, 12, 10, 64, [0]),
    "rank64-mixed": (4, 5, 70, 48, 64, [3, 1, 0, 1]),
}
SLOTS = 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias,with_scale,with_out",
                         [(False, False, False), (True, False, False), (False, True, True), (True, True, True)])
def test_torch_gathered_linear_matches_loop(case, dtype, with_bias, with_scale, with_out):
    n, L, k, m, r, slots = CASES[case]
    t = make(n, L, k, m, r, SLOTS, dtype)
    slot = torch.tensor(slots)
    bias = t["bias"] if with_bias else None
    scale = t["scale"] if with_scale else None
    out = t["out"] if with_out else None
    ref = naive_linear(t["x"], t["weight"], slot, bias, scale, out)
    got = torch_ops.gathered_linear(t["x"], t["weight"], slot, bias=bias, scale=scale,
                                    out=None if out is None else out.clone())
    assert got.shape == (n, L, m) and got.dtype == dtype
    assert rel_err(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_out", [False, True])
def test_torch_lora_delta_matches_loop(case, dtype, with_out):
    n, L, k, m, r, slots = CASES[case]
    t = make(n, L, k, m, r, SLOTS, dtype)
    slot = torch.tensor(slots)
    out = t["out"] if with_out else None
    ref = naive_lora(t["x"], t["A"], t["B"], slot, t["scale"], out)
    got = torch_ops.lora_delta(t["x"], t["A"], t["B"], slot, t["scale"],
                               out=None if out is None else out.clone())
    assert got.shape == (n, L, m) and got.dtype == dtype
    assert rel_err(got, ref) <= TOL[dtype]


def test_torch_out_in_place_only_without_grad():
    t = make(3, 2, 8, 6, 4, 2, torch.float32)
    slot = torch.tensor([1, 0, 1])
    out = t["out"].clone()
    with torch.no_grad():
        got = torch_ops.lora_delta(t["x"], t["A"], t["B"], slot, t["scale"], out=out)
    assert got.data_ptr() == out.data_ptr()
    out = t["out"].clone()
    got = torch_ops.gathered_linear(t["x"], t["weight"], slot, out=out)
    assert got.data_ptr() != out.data_ptr() and torch.equal(out, t["out"])


def test_torch_gradients_match_loop():
    t = make(3, 4, 10, 7, 4, 3, torch.float64)
    slot = torch.tensor([2, 0, 2])
    A, B = t["A"].requires_grad_(), t["B"].requires_grad_()
    torch_ops.lora_delta(t["x"], A, B, slot, t["scale"]).square().sum().backward()
    got = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    naive_lora(t["x"], A, B, slot, t["scale"]).square().sum().backward()
    assert torch.allclose(got[0], A.grad) and torch.allclose(got[1], B.grad)
    assert torch.all(got[0][1] == 0)  # slot 1 unused: no gradient


# --- Triton ---------------------------------------------------------------------------

def _compare(triton_ops, x, weight, A, B, slot, bias, scale, out, dtype, label, failures):
    """triton_ops vs torch_ops (both without grad) for both functions, with and without out."""
    with torch.no_grad():
        for name, args in (("gathered_linear", (x, weight, slot)), ("lora_delta", (x, A, B, slot))):
            if name == "gathered_linear":
                kw = dict(bias=bias, scale=scale)
            else:  # lora_delta always scales
                kw = dict(scale=torch.ones(A.shape[0], device=A.device) if scale is None else scale)
            for target in (None, out):
                ref = getattr(torch_ops, name)(*args, **kw, out=None if target is None else target.clone())
                dst = None if target is None else target.clone()
                got = getattr(triton_ops, name)(*args, **kw, out=dst)
                err = rel_err(got, ref)
                bad = got.shape != ref.shape or got.dtype != ref.dtype or not err <= TOL[dtype]
                if dst is not None and got.data_ptr() != dst.data_ptr():
                    bad = True  # without grad, out is updated in place and returned
                if bad:
                    failures.append(f"{label} {name} out={target is not None}: err {err:.3g} "
                                    f"shape {tuple(got.shape)} dtype {got.dtype}")


def _interpreter_parity() -> int:
    """Interpreter parity checks (needs TRITON_INTERPRET=1); returns the exit status."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from polyadapter.kernels import triton_ops

    failures: list[str] = []
    # (n, L, k, m, r, S): k, m not multiples of the blocks; L=1 (BGMV) and L past one
    # 64-token tile (SGMV); ranks 4, 8, 16, 64.
    shapes = [(5, 1, 40, 24, 4, 3), (3, 70, 70, 130, 8, 2), (2, 7, 16, 16, 16, 2), (2, 3, 96, 20, 64, 3)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, L, k, m, r, S in shapes:
            t = make(n, L, k, m, r, S, dtype, seed=n + L)
            slot = torch.arange(n) % S
            slot = slot[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
            for bias, scale in ((None, None), (t["bias"], t["scale"])):
                label = f"{dtype} {(n, L, k, m, r)} bias/scale={bias is not None}"
                _compare(triton_ops, t["x"], t["weight"], t["A"], t["B"], slot, bias, scale,
                         t["out"], dtype, label, failures)

    # Strided views everywhere, an fp32 bank under fp16 activations, int32 slots.
    t = make(4, 5, 36, 20, 8, 3, torch.float32, seed=7)
    x = t["x"].half().transpose(0, 1).contiguous().transpose(0, 1)        # (n, L, k), row stride small
    weight = torch.cat([t["weight"], t["weight"]], dim=2)[:, :, ::2]      # last stride 2
    A = t["A"].transpose(1, 2).contiguous().transpose(1, 2)               # column-major per slot
    out = t["out"].half().transpose(1, 2).contiguous().transpose(1, 2)
    bias = torch.stack([t["bias"], t["bias"]], dim=2)[..., 0]             # bias stride (.., 2)
    _compare(triton_ops, x, weight, A, t["B"], torch.tensor([2, 0, 2, 1], dtype=torch.int32),
             bias, t["scale"], out, torch.float16, "strided", failures)

    # One-token rows take the packed-segment kernel: runs of one slot longer than a token
    # tile (40 > 16 and > 64 with the rest), rows sorted by slot or not, unused slots in and
    # out of the used range, a single slot, and B laid out as banks lay it (B[s].T contiguous).
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        n, k, m, r, S = 83, 40, 72, 8, 7
        t = make(n, 1, k, m, r, S, dtype, seed=5)
        B = t["B"].transpose(1, 2).contiguous().transpose(1, 2)
        for label, slot in (("sorted", torch.sort(torch.tensor([0] * 40 + [2] * 30 + [3] * 12 + [6]))[0]),
                            ("unsorted", torch.randint(0, S, (n,), generator=g)),
                            ("far slots", torch.tensor([1, 6] * 41 + [1])),
                            ("one slot", torch.full((n,), 4))):
            ref = naive_lora(t["x"], t["A"], B, slot, t["scale"], t["out"])
            for target in (None, t["out"]):
                dst = None if target is None else target.clone()
                with torch.no_grad():
                    got = triton_ops.lora_delta(t["x"], t["A"], B, slot, t["scale"], out=dst)
                want = ref if target is not None else ref - t["out"]
                err = rel_err(got, want)
                if got.shape != (n, 1, m) or not err <= TOL[dtype] or (dst is not None and got.data_ptr() != dst.data_ptr()):
                    failures.append(f"segments {dtype} {label} out={target is not None}: err {err:.3g}")

    # An empty batch launches nothing.
    t = make(0, 3, 8, 8, 4, 2, torch.float32)
    _compare(triton_ops, t["x"], t["weight"], t["A"], t["B"], torch.zeros(0, dtype=torch.long),
             t["bias"], t["scale"], t["out"], torch.float32, "empty", failures)

    # Autograd: with grad mode on and an input requiring grad, the torch path runs.
    t = make(2, 3, 8, 6, 4, 2, torch.float32)
    A = t["A"].requires_grad_()
    y = triton_ops.lora_delta(t["x"], A, t["B"], torch.tensor([1, 0]), t["scale"], out=t["out"])
    y.sum().backward()
    if y.grad_fn is None or A.grad is None:
        failures.append("autograd fallback: no graph")

    for f in failures:
        print("MISMATCH", f, file=sys.stderr)
    return 1 if failures else 0


def test_triton_matches_torch_in_interpreter():
    import triton  # a test dependency: missing Triton fails this test

    assert triton.__version__
    proc = subprocess.run([sys.executable, __file__], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("L", [1, 128])
@pytest.mark.parametrize("m", [2048, 5632])
def test_triton_matches_torch_on_gpu(dtype, L, m, monkeypatch):
    from polyadapter.kernels import triton_ops

    monkeypatch.delenv("POLYADAPTER_KERNELS", raising=False)
    n, k, r, S = 64, 2048, 16, 6
    t = {key: v.cuda() for key, v in make(n, L, k, m, r, S, dtype).items()}
    assert kernels.backend_for(t["x"]) is triton_ops
    slot = torch.randint(0, S, (n,), generator=torch.Generator().manual_seed(0)).cuda()
    failures: list[str] = []
    _compare(triton_ops, t["x"], t["weight"], t["A"], t["B"], slot, t["bias"], t["scale"],
             t["out"], dtype, f"cuda {dtype} L={L} m={m}", failures)
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    sys.exit(_interpreter_parity())


@pytest.mark.parametrize("L", [1, 3, 16])
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("loop_rows", [0, 10**9])   # per-slot matmuls for every run, or grouped_mm always
@pytest.mark.parametrize("slots", ["mixed", "sorted", "one"])
@pytest.mark.parametrize("padded", [0, 10**12])     # the padded batched-matmul path never, or whenever it can
def test_torch_segment_strategy_matches_gather_strategy(L, with_out, loop_rows, slots, padded, monkeypatch):
    """The torch strategies (per-row gather + bmm; sorted segments through grouped_mm,
    through one matmul per run of a slot, or through the padded block of every used
    slot's rows) give the same LoRA update, including empty slots, unsorted rows and a batch of
    one adapter. B is laid out as the banks lay it out (each slot's B.T contiguous)."""
    monkeypatch.setattr(torch_ops, "_LOOP_ROWS", loop_rows)
    monkeypatch.setattr(torch_ops, "_FAST_ROWS", loop_rows)
    monkeypatch.setattr(torch_ops, "_PADDED_WASTE", padded)
    calls = []
    real_padded = torch_ops._padded_into
    monkeypatch.setattr(torch_ops, "_padded_into", lambda *a: calls.append(1) or real_padded(*a))
    g = torch.Generator().manual_seed(11)
    n, k, r, m, S = 9, 32, 8, 24, 6
    x = torch.randn(n, L, k, generator=g)
    A, B = torch.randn(S, r, k, generator=g), torch.randn(S, r, m, generator=g).transpose(1, 2)
    slot = {"mixed": torch.tensor([5, 0, 5, 2, 2, 0, 5, 3, 0]),  # slots 1 and 4 unused
            "sorted": torch.tensor([0, 0, 2, 2, 3, 5, 5, 5, 5]),
            "one": torch.full((n,), 4)}[slots]
    scale = torch.rand(S, generator=g) + 0.5
    out = torch.randn(n, L, m, generator=g)
    results = {}
    with torch.no_grad():
        for strategy in (True, False):
            monkeypatch.setattr(torch_ops, "_segments_pay", lambda *a, _s=strategy: _s)
            results[strategy] = torch_ops.lora_delta(x, A, B, slot, scale, out=out.clone() if with_out else None)
    assert torch.allclose(results[True], results[False], atol=1e-4)
    loop = torch.stack([scale[s] * x[i] @ A[s].T @ B[s].T for i, s in enumerate(slot.tolist())])
    assert torch.allclose(results[True], loop + (out if with_out else 0), atol=1e-4)
    # the padded path runs exactly where it should: an output to add into, several slots, short rows
    assert bool(calls) == (padded > 0 and with_out and slots != "one" and L <= torch_ops._SHORT_ROWS), calls


def test_segment_host_work_runs_once_per_call_not_once_per_site(monkeypatch):
    """Sites of one structure share their row plan's slot tensor, so the sort and count
    of the segment path (unique / argsort / bincount) run once per call."""
    import polyadapter as pa
    from conftest import make_model
    pm = pa.AdapterModel(make_model("llama"))
    for name in ("a", "b", "c"):
        pm.add_adapter(name, pa.LoraConfig(r=4, targets=["all-linear"]), activate=False)
    sites = len(pm.record("a").sites)
    ids = torch.randint(0, 100, (6, 1))  # one token per row: the segment path
    calls = []
    real = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        mixed = pm(input_ids=ids, adapter_names=["a", "b", "c", "a", None, "b"]).logits
    assert sites == 14 and 1 <= len(calls) <= 2, len(calls)  # one per distinct slot tensor, not 14
    monkeypatch.setattr(torch, "unique", real)
    with torch.no_grad():
        for i, setup in enumerate(["a", "b", "c", "a", None, "b"]):
            pm.set_active(setup)
            assert torch.allclose(mixed[i:i + 1], pm(input_ids=ids[i:i + 1]).logits, atol=1e-5)


@pytest.mark.parametrize("slots", ["sorted", "mixed", "one"])
def test_torch_in_place_lora_add(slots):
    """``lora_add_`` adds the update in place where the per-run or padded path can run
    (one-token rows, inference, one dtype, slots in a slice of the bank), and elsewhere
    returns False with ``out`` untouched, for the caller's general path."""
    g = torch.Generator().manual_seed(5)
    n, k, r, m, S = 10, 32, 8, 24, 16
    A, B = torch.randn(S, r, k, generator=g), torch.randn(S, r, m, generator=g).transpose(1, 2)
    scale = torch.rand(S, generator=g) + 0.5
    slot = {"sorted": torch.tensor([2, 2, 2, 3, 3, 5, 5, 5, 5, 5]), "mixed": torch.tensor([5, 2, 3, 2, 5, 5, 3, 2, 5, 2]),
            "one": torch.full((n,), 7)}[slots]
    x, out = torch.randn(n, k, generator=g), torch.randn(n, m, generator=g)
    ref = out + torch.stack([scale[s] * x[i] @ A[s].T @ B[s].T for i, s in enumerate(slot.tolist())])
    with torch.no_grad():
        got = out.clone()
        assert kernels.lora_add_(x, got, A, B, slot, scale, {"A": A, "B": B, "scale": scale})
        assert torch.allclose(got, ref, atol=1e-4)
        refused = {"long rows": (torch.randn(n * 5, k, generator=g), torch.randn(n * 5, m, generator=g), slot),
                   "dtype": (x.double(), out.double(), slot),
                   "scattered": (x, out.clone(), torch.tensor([0, 15] * 5))}
        for why, (xi, oi, si) in refused.items():
            before = oi.clone()
            assert not kernels.lora_add_(xi, oi, A, B, si, scale), why
            assert torch.equal(oi, before), why
    before = out.clone()
    assert not kernels.lora_add_(x, out, A, B, slot, scale) and torch.equal(out, before)  # gradients on
