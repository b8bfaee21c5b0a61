"""Compression: truncated SVD of LoRA updates (exactness at full rank, Eckart-Young at
rank k, per-site ranks by energy), ComPEFT (top-k positions, one magnitude per tensor,
signs), its packed storage (exact round trip, real size, refusal of malformed files
leaving the model unchanged) and PEFT export of a compressed LoRA."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import MLP_TARGETS, make_inputs, make_model, output_of
from polyadapter import AdapterModel, AdapterNameError, ConfigError, IA3Config, LoadError, LoraConfig
from polyadapter.formats import compeft as packed
from polyadapter.ops.compress import compeft, compeft_tensor, kept_count, storage_bytes, svd_compress
from polyadapter.ops.factors import delta_weights, lora_factors

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
PACKED_FILE, PLAIN_FILE, META = "adapter.compeft.safetensors", "adapter.safetensors", "polyadapter.json"


# ---------------------------------------------------------------- helpers
class Wide(nn.Module):
    """Layers wide enough (256) for file sizes to be dominated by data, not headers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def wide_model():
    torch.manual_seed(0)
    return AdapterModel(Wide().eval())


WIDE_INPUTS = {"x": torch.randn(3, 256, generator=torch.Generator().manual_seed(5))}


def perturb(pm, name, seed=0, std=0.2):
    """Stand-in for training: every adapter tensor moved, so updates are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_parameters(name).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def lora_model(kind, seed=0, **config):
    pm = AdapterModel(make_model(kind))
    if kind == "mlp":
        config.setdefault("targets", MLP_TARGETS)
    pm.add_adapter("src", LoraConfig(**config))
    perturb(pm, "src", seed)
    return pm


def run(pm, kind, adapter):
    pm.set_active(adapter)
    with torch.no_grad():
        return output_of(pm, make_inputs(kind))


def snapshot(pm, inputs):
    with torch.no_grad():
        out = output_of(pm, inputs)
    return list(pm.adapters), pm.active_adapters, {k: v.clone() for k, v in pm.model.state_dict().items()}, out


def assert_unchanged(pm, inputs, snap):
    adapters, active, state, out = snap
    assert pm.adapters == adapters and pm.active_adapters == active
    now = pm.model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(output_of(pm, inputs), out)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ====================================================================== SVD
SVD_CASES = {
    "bert-head": ("bert", dict(r=8, modules_to_save=["classifier"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, targets=["c_attn", "c_proj"])),
    "llama-embedding-rank_pattern": ("llama", dict(r=4, targets=["q_proj", "v_proj", "embed_tokens"],
                                                   rank_pattern={"v_proj": 6})),
    "llama-pissa": ("llama", dict(r=4, init="pissa", targets=["q_proj", "o_proj"])),
    "mlp-rslora": ("mlp", dict(r=4, alpha=8, use_rslora=True)),
}


@pytest.mark.parametrize("case", list(SVD_CASES))
def test_svd_at_full_rank_reproduces_outputs(case):
    kind, config = SVD_CASES[case]
    pm = lora_model(kind, **config)
    ref = run(pm, kind, "src")
    assert (ref - run(pm, kind, None)).abs().max() > 1e-3  # the adapter matters
    ranks = {s: f.rank for s, f in lora_factors(pm, "src").items()}
    record = svd_compress(pm, "src", "full", energy=1.0)
    assert (run(pm, kind, "full") - ref).abs().max() < 1e-5
    assert record.config.method == "lora" and record.config.init == "default"
    if "pissa" not in case:  # a PiSSA update is generically of rank min(2r, ...): energy 1 keeps it
        assert record.provenance["ranks"] == ranks
    if len(set(ranks.values())) == 1 and "pissa" not in case:
        svd_compress(pm, "src", "fixed", rank=min(ranks.values()))
        assert (run(pm, kind, "fixed") - ref).abs().max() < 1e-5


@pytest.mark.parametrize("k", [1, 3, 5])
def test_svd_rank_k_is_the_best_rank_k_approximation(k):
    pm = lora_model("llama", r=6, targets=["q_proj", "v_proj", "gate_proj", "embed_tokens"])
    record = svd_compress(pm, "src", "low", rank=k)
    source, result = delta_weights(pm, "src"), delta_weights(pm, "low")
    assert record.provenance["ranks"] == {s: k for s in source}
    for site, D in source.items():
        U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        got = result[site].double()
        assert torch.allclose(got, best, atol=1e-5 * float(S[0])), site
        # Eckart-Young: the error is exactly the tail of the spectrum
        err = torch.linalg.matrix_norm(D.double() - got) ** 2
        assert math.isclose(float(err), float((S[k:] ** 2).sum()), rel_tol=1e-4, abs_tol=1e-9)
        assert pm.parts("low")[site].lora_A.shape[0] == k


def _set_spectrum(pm, name, site, singular_values, seed):
    """Give ``site`` an update ``scaling * B @ A`` with these singular values."""
    part = pm.parts(name)[site]
    r = part.lora_A.shape[0]
    g = torch.Generator().manual_seed(seed)
    Qa, _ = torch.linalg.qr(torch.randn(part.lora_A.shape[1], r, generator=g))
    Qb, _ = torch.linalg.qr(torch.randn(part.lora_B.shape[0], r, generator=g))
    with torch.no_grad():
        part.lora_A.copy_(Qa.T)
        part.lora_B.copy_(Qb * torch.tensor(singular_values) / part.scaling)


def test_svd_energy_picks_the_smallest_rank_per_site():
    pm = lora_model("mlp", r=6)
    _set_spectrum(pm, "src", "fc1", [10.0, 1.0, 0.5, 0.2, 0.1, 0.05], seed=1)   # one dominant direction
    _set_spectrum(pm, "src", "fc2", [1.0, 1.0, 1.0, 1.0, 0.9, 0.8], seed=2)     # flat spectrum
    for energy in (0.5, 0.8, 0.95, 0.999):
        record = svd_compress(pm, "src", f"e{int(energy * 1000)}", energy=energy)
        ranks = record.provenance["ranks"]
        assert record.provenance["energy"] == energy
        for site, D in delta_weights(pm, "src").items():
            S2 = torch.linalg.svdvals(D.double()) ** 2
            share = torch.cumsum(S2, 0) / S2.sum()
            k = ranks[site]
            assert share[k - 1] >= energy - 1e-9
            assert k == 1 or share[k - 2] < energy
            assert pm.parts(record.name)[site].lora_A.shape[0] == k
            kept = torch.linalg.matrix_norm(delta_weights(pm, record.name)[site].double()) ** 2
            assert float(kept / S2.sum()) >= energy - 1e-6
    ranks = pm.record("e800").provenance["ranks"]
    assert ranks == {"fc1": 1, "fc2": 5}
    assert pm.record("e800").config.rank_pattern  # ranks differ per site
    assert pm.record("e800").provenance["storage_ratio"] > 1


def test_svd_result_exports_to_peft_with_the_same_logits(tmp_path):
    import peft
    pm = lora_model("bert", r=8, modules_to_save=["classifier"])
    svd_compress(pm, "src", "small", energy=0.7, activate=True)
    assert pm.record("small").config.rank_pattern  # per-site ranks (3 and 4): PEFT's rank_pattern
    ours = run(pm, "bert", "small")
    pm.save_adapter("small", tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(make_model("bert"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        ref = output_of(theirs, make_inputs("bert"))
    assert (ours - ref).abs().max() < 1e-5
    assert (ours - run(pm, "bert", None)).abs().max() > 1e-3


# ====================================================================== ComPEFT
def _check_compeft_tensor(orig, got, init, density, scale):
    tau = orig.double().reshape(-1) - init
    out = got.double().reshape(-1) - init
    k = kept_count(tau.numel(), density)
    top = torch.zeros_like(tau, dtype=torch.bool)
    top[tau.abs().topk(k).indices] = True
    assert torch.equal(out != 0, top & (tau != 0))                   # exactly the top-k positions
    mags = out[top].abs().unique()
    assert mags.numel() == 1                                          # one magnitude per tensor
    assert torch.equal(torch.sign(out[top]), torch.sign(tau[top]))   # signs kept
    want = float(tau.std(correction=0)) if scale == "std" else float(tau[top].abs().mean())
    assert math.isclose(float(mags[0]), want, rel_tol=1e-5)
    return float(mags[0])


@pytest.mark.parametrize("density", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("scale", ["std", "mean"])
def test_compeft_lora_keeps_top_k_signs_with_one_magnitude(density, scale):
    pm = lora_model("bert", r=4, modules_to_save=["classifier"])
    before = {k: v.clone() for k, v in pm.adapter_state_dict("src").items()}
    record = compeft(pm, "src", "c", density=density, scale=scale)
    assert record.config == pm.record("src").config
    prov = record.provenance
    assert {k: prov[k] for k in ("operation", "method", "source", "density", "scale")} == {
        "operation": "compress", "method": "compeft", "source": "src", "density": density, "scale": scale}
    assert prov["storage_ratio"] > 1
    src, out = pm.adapter_state_dict("src"), pm.adapter_state_dict("c")
    assert_same_tensors(src, before)  # the source is untouched
    for key, t in src.items():
        if key.startswith("classifier."):
            assert torch.equal(out[key], t)  # modules_to_save copies are carried, not compressed
        else:
            _check_compeft_tensor(t, out[key], 0.0, density, scale)
            if scale == "mean":  # L1 of the kept entries is preserved (all of it at density 1)
                k = kept_count(t.numel(), density)
                top = t.abs().reshape(-1).topk(k).values.double().sum()
                assert math.isclose(float(out[key].abs().double().sum()), float(top), rel_tol=1e-5)


def test_compeft_density_one_mean_preserves_l1_and_every_sign():
    pm = lora_model("gpt2", r=4)
    compeft(pm, "src", "c", density=1.0, scale="mean")
    for key, t in pm.adapter_state_dict("src").items():
        got = pm.adapter_state_dict("c")[key]
        assert torch.equal(torch.sign(got), torch.sign(t))
        assert math.isclose(float(got.abs().sum()), float(t.abs().sum()), rel_tol=1e-5)
        assert got.abs().unique().numel() == 1


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_compeft_ia3_is_relative_to_ones(density):
    pm = AdapterModel(make_model("llama"))
    pm.add_adapter("src", IA3Config())
    perturb(pm, "src", std=0.1)
    record = compeft(pm, "src", "c", density=density, multiplier=2.5, activate=True)
    assert pm.active_adapters == ("c",) and record.provenance["multiplier"] == 2.5
    for key, t in pm.adapter_state_dict("src").items():
        got = pm.adapter_state_dict("c")[key]
        tau = (t.double() - 1).reshape(-1)
        out = (got.double() - 1).reshape(-1)
        k = kept_count(tau.numel(), density)
        top = torch.zeros_like(tau, dtype=torch.bool)
        top[tau.abs().topk(k).indices] = True
        assert torch.equal(out != 0, top)
        assert torch.equal(torch.sign(out[top]), torch.sign(tau[top]))
        assert math.isclose(float(out[top].abs().max()), 2.5 * float(tau.std(correction=0)), rel_tol=1e-5)
        assert float(out[top].abs().max() - out[top].abs().min()) < 1e-6  # one magnitude (exact in float32 below)
        assert got[got != 1].abs().unique().numel() <= 2  # 1 + a and 1 - a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("init", [0.0, 1.0])
def test_pack_unpack_is_bit_exact(dtype, init):
    g = torch.Generator().manual_seed(3)
    for trial, (shape, mult) in enumerate([((7, 13), 1.0), ((64,), 4.0), ((3, 5, 2), 0.01), ((1,), 1.0),
                                           ((40, 1), 30.0)]):
        t = (torch.randn(shape, generator=g) * 0.3 + init).to(dtype)
        c = compeft_tensor(t, 0.2, multiplier=mult, init=init)
        assert c.dtype == dtype and c.shape == t.shape
        parts = packed.pack_tensor(c, init)
        assert parts is not None, (trial, dtype)
        back = packed.unpack({f"w{packed.SEP}{p}": v for p, v in parts.items()}, "x")["w"]
        assert back.dtype == dtype and torch.equal(back, c)
        assert packed.pack_tensor(t, init) is None or t.numel() <= 2  # a dense tensor is not ternary


def test_unpack_refuses_padding_bits_and_bad_inits():
    c = compeft_tensor(torch.randn(7, 13, generator=torch.Generator().manual_seed(0)), 0.1, init=1.0)
    good = {f"w{packed.SEP}{p}": v for p, v in packed.pack_tensor(c, 1.0).items()}
    assert torch.equal(packed.unpack(good, "f")["w"], c)
    bad = dict(good)
    bad["w#mask"] = bad["w#mask"].clone()
    bad["w#mask"][-1] |= 1  # 91 entries: the last 5 bits are padding
    with pytest.raises(LoadError, match="f: packed tensor 'w': w#mask has padding bits set"):
        packed.unpack(bad, "f")
    with pytest.raises(LoadError, match="w#init must be one finite value"):
        packed.unpack({**good, "w#init": torch.tensor([1.0], dtype=torch.float64)}, "f")
    with pytest.raises(LoadError, match="w#shape holds a negative size"):
        packed.unpack({**good, "w#shape": torch.tensor([-7, -13])}, "f")


# ====================================================================== storage
def test_packed_save_load_round_trip_is_exact_and_small(tmp_path):
    pm = wide_model()
    pm.add_adapter("src", LoraConfig(r=16, targets=["fc1", "fc2"], modules_to_save=["head"]))
    perturb(pm, "src", std=0.05)
    record = compeft(pm, "src", "c", density=0.1)
    pm.save_adapter("src", tmp_path / "src")
    pm.save_adapter("c", tmp_path / "c")
    folder = tmp_path / "c"
    assert sorted(p.name for p in folder.iterdir()) == sorted([META, PACKED_FILE])
    meta = json.loads((folder / META).read_text())
    assert meta["packing"] == packed.PACKING and meta["format_version"] == 2
    assert json.loads((tmp_path / "src" / META).read_text())["format_version"] == 1  # plain stays v1
    src_bytes = (tmp_path / "src" / PLAIN_FILE).stat().st_size
    c_bytes = (folder / PACKED_FILE).stat().st_size
    assert storage_bytes(pm, "src") == src_bytes and storage_bytes(pm, "c") == c_bytes
    assert record.provenance["storage_ratio"] == src_bytes / c_bytes
    # LoRA factors: 32 bits an entry dense, 1 + 0.1 packed; the head (1028 floats) stays dense.
    n_lora = 2 * (16 * 256 + 256 * 16)
    expected = (4 * (n_lora + 1028)) / (n_lora * 1.1 / 8 + 4 * 1028)
    assert 0.8 * expected < src_bytes / c_bytes < 1.05 * expected
    assert src_bytes / c_bytes > 8

    pm2 = wide_model()
    loaded = pm2.load_adapter(folder, name="c2")
    assert loaded.provenance == record.provenance
    assert_same_tensors(pm2.adapter_state_dict("c2"), pm.adapter_state_dict("c"))
    pm.set_active("c")
    with torch.no_grad():
        assert torch.equal(output_of(pm2, WIDE_INPUTS), output_of(pm, WIDE_INPUTS))
    pm2.save_adapter("c2", tmp_path / "again")  # saving what was loaded gives the same bytes
    assert (tmp_path / "again" / PACKED_FILE).read_bytes() == (folder / PACKED_FILE).read_bytes()


def test_packed_ia3_round_trip(tmp_path):
    pm = wide_model()
    pm.add_adapter("src", IA3Config(targets=["fc1", "fc2"], feedforward=["fc2"]))
    perturb(pm, "src", std=0.1)
    compeft(pm, "src", "c", density=0.2, multiplier=3.0)
    pm.save_adapter("c", tmp_path / "c")
    files = load_file(str(tmp_path / "c" / PACKED_FILE))
    assert "fc1.ia3_l#init" in files and files["fc1.ia3_l#mask"].dtype == torch.uint8
    pm2 = wide_model()
    pm2.load_adapter(tmp_path / "c", name="c")
    assert_same_tensors(pm2.adapter_state_dict("c"), pm.adapter_state_dict("c"))
    assert pm.record("c").provenance["storage_ratio"] > 2  # 256-entry vectors: headers weigh


def test_tiny_tensors_stay_dense_and_changed_tensors_are_saved_unpacked(tmp_path):
    # (IA)^3 vectors of 32 entries are smaller dense than packed: the folder is a plain one.
    pm = AdapterModel(make_model("llama"))
    pm.add_adapter("src", IA3Config())
    perturb(pm, "src")
    compeft(pm, "src", "c")
    pm.save_adapter("c", tmp_path / "tiny")
    assert (tmp_path / "tiny" / PLAIN_FILE).is_file() and not (tmp_path / "tiny" / PACKED_FILE).exists()
    # A ComPEFT LoRA trained after compression: the changed tensor is stored dense, with a warning.
    pm = wide_model()
    pm.add_adapter("src", LoraConfig(r=8, targets=["fc1", "fc2"]))
    perturb(pm, "src")
    compeft(pm, "src", "c")
    with torch.no_grad():
        pm.parts("c")["fc1"].lora_A.add_(0.01)
    with pytest.warns(UserWarning, match="no longer ternary"):
        pm.save_adapter("c", tmp_path / "edited")
    files = load_file(str(tmp_path / "edited" / PACKED_FILE))
    assert "fc1.lora_A" in files and "fc2.lora_A#mask" in files
    pm2 = wide_model()
    pm2.load_adapter(tmp_path / "edited", name="c")
    assert_same_tensors(pm2.adapter_state_dict("c"), pm.adapter_state_dict("c"))


def _corrupt_bytes(t, key):
    t[key] = t[key][:-1]


def _set_padding_bit(t, key):
    t[key] = t[key].clone()
    t[key][-1] |= 1


CORRUPTIONS = {
    "short mask": (lambda t: _corrupt_bytes(t, "fc1.lora_A#mask"), "fc1.lora_A#mask"),
    "short sign": (lambda t: _corrupt_bytes(t, "fc2.lora_B#sign"), "fc2.lora_B#sign"),
    "float mask": (lambda t: t.update({"fc1.lora_B#mask": t["fc1.lora_B#mask"].float()}), "fc1.lora_B#mask"),
    "sign padding": (lambda t: _set_padding_bit(t, "fc1.lora_A#sign"), "fc1.lora_A#sign"),  # 205 kept
    "nan scale": (lambda t: t.update({"fc1.lora_A#scale": torch.tensor([float("nan")])}), "fc1.lora_A#scale"),
    "negative scale": (lambda t: t.update({"fc1.lora_A#scale": torch.tensor([-1.0])}), "fc1.lora_A#scale"),
    "two scales": (lambda t: t.update({"fc1.lora_A#scale": torch.ones(2)}), "fc1.lora_A#scale"),
    "missing scale": (lambda t: t.pop("fc2.lora_B#scale"), "fc2.lora_B"),
    "unknown part": (lambda t: t.update({"fc2.lora_B#extra": torch.zeros(1)}), "fc2.lora_B#extra"),
    "float shape": (lambda t: t.update({"fc1.lora_A#shape": t["fc1.lora_A#shape"].float()}), "fc1.lora_A#shape"),
    "both dense and packed": (lambda t: t.update({"fc1.lora_A": torch.zeros(8, 256)}), "fc1.lora_A"),
    # consistent in itself but not the model's shape: the usual tensor checks refuse it
    "other shape": (lambda t: t.update({"fc1.lora_A#shape": torch.tensor([256, 8]),
                                        }), "fc1.lora_A"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_malformed_packed_file_is_refused_and_model_unchanged(tmp_path, case):
    pm = wide_model()
    pm.add_adapter("src", LoraConfig(r=8, targets=["fc1", "fc2"]))
    perturb(pm, "src")
    compeft(pm, "src", "c")
    pm.save_adapter("c", tmp_path / "c")
    file = tmp_path / "c" / PACKED_FILE
    tensors = load_file(str(file))
    change, tensor_name = CORRUPTIONS[case]
    change(tensors)
    save_file(tensors, str(file))
    target = wide_model()
    target.add_adapter("keep", LoraConfig(r=2, targets=["fc1"]))
    perturb(target, "keep")
    snap = snapshot(target, WIDE_INPUTS)
    with pytest.raises(LoadError) as err:
        target.load_adapter(tmp_path / "c", name="x")
    assert PACKED_FILE in str(err.value) and tensor_name in str(err.value)
    assert_unchanged(target, WIDE_INPUTS, snap)


def test_unknown_packing_and_truncated_file_are_refused(tmp_path):
    pm = wide_model()
    pm.add_adapter("src", LoraConfig(r=8, targets=["fc1", "fc2"]))
    perturb(pm, "src")
    compeft(pm, "src", "c")
    pm.save_adapter("c", tmp_path / "c")
    meta = json.loads((tmp_path / "c" / META).read_text())
    (tmp_path / "c" / META).write_text(json.dumps({**meta, "packing": "zip-bomb-v9"}))
    snap = snapshot(pm, WIDE_INPUTS)
    with pytest.raises(LoadError, match="unknown packing 'zip-bomb-v9'"):
        pm.load_adapter(tmp_path / "c", name="x")
    (tmp_path / "c" / META).write_text(json.dumps(meta))
    data = (tmp_path / "c" / PACKED_FILE).read_bytes()
    (tmp_path / "c" / PACKED_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="cannot read safetensors"):
        pm.load_adapter(tmp_path / "c", name="x")
    assert_unchanged(pm, WIDE_INPUTS, snap)


# ====================================================================== refusals
def test_bad_inputs_are_refused_and_model_unchanged():
    pm = lora_model("mlp", r=4)
    pm.add_adapter("ia3", IA3Config(targets=MLP_TARGETS), activate=False)
    pm.add_adapter("bottle", {"method": "bottleneck", "targets": MLP_TARGETS}, activate=False)
    pm.set_active("src")
    inputs = make_inputs("mlp")
    snap = snapshot(pm, inputs)
    cases = [
        (lambda: svd_compress(pm, "ia3", "n", rank=1), ConfigError, "ia3 adapter; it needs a LoRA"),
        (lambda: svd_compress(pm, "src", "n"), ConfigError, "exactly one of rank= or energy="),
        (lambda: svd_compress(pm, "src", "n", rank=2, energy=0.5), ConfigError, "exactly one"),
        (lambda: svd_compress(pm, "src", "n", rank=5), ConfigError, "rank=5 exceeds the rank"),
        (lambda: svd_compress(pm, "src", "n", rank=0), ConfigError, "positive integer"),
        (lambda: svd_compress(pm, "src", "n", rank=2.0), ConfigError, "positive integer"),
        (lambda: svd_compress(pm, "src", "n", energy=0.0), ConfigError, r"in \(0, 1\]"),
        (lambda: svd_compress(pm, "src", "n", energy=1.5), ConfigError, r"in \(0, 1\]"),
        (lambda: svd_compress(pm, "src", "ia3", rank=1), AdapterNameError, "already exists"),
        (lambda: svd_compress(pm, "src", "bad name", rank=1), AdapterNameError, "invalid"),
        (lambda: compeft(pm, "bottle", "n"), ConfigError, "bottleneck adapter; compeft works on"),
        (lambda: compeft(pm, "src", "n", density=0), ConfigError, r"density=0 is invalid"),
        (lambda: compeft(pm, "src", "n", density=1.5), ConfigError, r"density=1.5 is invalid"),
        (lambda: compeft(pm, "src", "n", density=True), ConfigError, "density=True is invalid"),
        (lambda: compeft(pm, "src", "n", scale="max"), ConfigError, "scale='max' is invalid"),
        (lambda: compeft(pm, "src", "n", multiplier=-1), ConfigError, "multiplier=-1 is invalid"),
        (lambda: compeft(pm, "src", "src"), AdapterNameError, "already exists"),
        (lambda: compeft(pm, "missing", "n"), AdapterNameError, "no adapter named 'missing'"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(pm, inputs, snap)
    pissa = lora_model("llama", r=2, init="pissa", targets=["q_proj"])
    with pytest.raises(ConfigError, match="PiSSA"):
        compeft(pissa, "src", "n")
    assert pissa.adapters == ["src"]
