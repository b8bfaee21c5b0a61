"""Parity with AdapterHub's `adapters` library, from fixtures it wrote itself.

`tests/adapterhub/make_fixtures.py` (run in its own venv with adapters 1.3.0 and
transformers 4.57.6) saved the base weights, inputs, every adapter's folder and the
outputs `adapters` computed. Here the same weights go into our transformers' models,
polyadapter loads the AdapterHub folders, and must give the same outputs (fp32, 1e-5).
No `adapters` import: the fixtures are plain safetensors and JSON.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_same_snapshot, make_model, snapshot
from safetensors.torch import load_file, save_file

import polyadapter as pa
from polyadapter import Parallel, Stack
from polyadapter.errors import ConfigError, LoadError, UnsafeFileError
from polyadapter.formats import convert, detect_format

FIXTURES = Path(__file__).parent / "adapterhub" / "fixtures"
TOL = 1e-5
ADAPTERS = ["seq_bn", "seq_bn_b", "seq_bn_var", "double_seq_bn", "double_seq_bn_b", "par_bn", "lora", "ia3"]
FUSIONS = {"fuse_seq_bn": ("seq_bn", "seq_bn_b"), "fuse_double_seq_bn": ("double_seq_bn", "double_seq_bn_b")}
SETUPS = {
    **{n: n for n in ADAPTERS},
    "stack_seq_bn": Stack("seq_bn", "seq_bn_b"),
    "stack_double_seq_bn": Stack("double_seq_bn", "double_seq_bn_b"),
    "stack_lora_seq_bn": Stack("lora", "seq_bn"),
    **{case: "fuse_" + "_".join(names) for case, names in FUSIONS.items()},
    "parallel": Parallel("seq_bn", "seq_bn_b"),
}
# adapters 1.3 has no faithful par_bn site on Llama (see test_par_bn_refused_on_llama)
SKIP = {("llama", "par_bn")}


def base_model(kind: str):
    model = make_model(kind)
    missing, unexpected = model.load_state_dict(load_file(str(FIXTURES / kind / "base.safetensors")), strict=False)
    assert not missing and not unexpected, (missing, unexpected)  # transformers 4.57 and 5.x keys agree
    return model


def load_all(kind: str) -> pa.AdapterModel:
    pm = pa.AdapterModel(base_model(kind))
    pm.eval()
    for name in ADAPTERS:
        if (kind, name) not in SKIP:
            pm.load_adapter(FIXTURES / kind / "adapters" / name, name=name, activate=False)
    for names in FUSIONS.values():
        pm.load_adapter(FIXTURES / kind / "fusion" / "_".join(names), name="fuse_" + "_".join(names), activate=False)
    return pm


def export_all(dst) -> None:
    """Save every fixture adapter and fusion again with format="adapters" under ``dst``,
    for ``tests/adapterhub/check_export.py`` to load in `adapters` itself (not a test: it
    needs the other venv)."""
    for kind in ("bert", "llama"):
        pm = load_all(kind)
        for name in ADAPTERS:
            if (kind, name) not in SKIP:
                pm.save_adapter(name, Path(dst) / kind / "adapters" / name, format="adapters", overwrite=True)
        for names in FUSIONS.values():
            fusion = "fuse_" + "_".join(names)
            pm.save_adapter(fusion, Path(dst) / kind / "fusion" / fusion, format="adapters", overwrite=True)


def outputs(pm, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = pm(**inputs, output_hidden_states=True)
    if isinstance(out, tuple):  # Parallel: one output per child, AdapterHub concatenates them
        return torch.cat([o.logits for o in out]), torch.cat([o.hidden_states[-1] for o in out])
    return out.logits, out.hidden_states[-1]


@pytest.fixture(scope="module", params=["bert", "llama"])
def loaded(request):
    kind = request.param
    return kind, load_all(kind), load_file(str(FIXTURES / kind / "inputs.safetensors")), \
        load_file(str(FIXTURES / kind / "reference.safetensors"))


def test_parity_with_adapters(loaded):
    kind, pm, inputs, ref = loaded
    pm.set_active(None)
    # the same weights and inputs: equal up to fp32 rounding (MKL's results depend on the
    # buffers' alignment, so even one process gave 7e-9 once its imports changed)
    assert (outputs(pm, inputs)[0] - ref["base"]).abs().max() <= 1e-6
    worst = {}
    for case, setup in SETUPS.items():
        if (kind, case) in SKIP:
            continue
        pm.set_active(setup)
        logits, hidden = outputs(pm, inputs)
        assert (ref[case + ".hidden"][:2] - ref["base.hidden"]).abs().max() > 1e-3, case  # the adapter acts
        worst[case] = max((logits - ref[case]).abs().max().item(), (hidden - ref[case + ".hidden"]).abs().max().item())
    pm.set_active(None)
    assert max(worst.values()) < TOL, worst


def test_mixed_batch_rows_match_adapters(loaded):
    kind, pm, inputs, ref = loaded
    rows = ["seq_bn", Stack("seq_bn", "seq_bn_b"), None, "double_seq_bn", "lora", "fuse_seq_bn_seq_bn_b",
            Stack("lora", "seq_bn"), "ia3"] + ([] if kind == "llama" else ["par_bn", "seq_bn_var"])
    cases = ["seq_bn", "stack_seq_bn", "base", "double_seq_bn", "lora", "fuse_seq_bn", "stack_lora_seq_bn",
             "ia3", "par_bn", "seq_bn_var"]
    n = len(rows)
    batch = {k: v.repeat(n, 1) for k, v in inputs.items()}   # row 2i+j is input row j under setup i
    with torch.no_grad():  # (with the KV cache on: Fuse rows at a whole-layer site must not re-run the layer)
        logits = pm(**batch, adapter_names=[r for r in rows for _ in range(2)]).logits
    for i, case in enumerate(cases[:n]):
        diff = (logits[2 * i: 2 * i + 2] - ref[case]).abs().max().item()
        assert diff < TOL, (case, diff)


def test_round_trip_adapters_format(loaded, tmp_path):
    kind, pm, inputs, _ = loaded
    for name in [n for n in ADAPTERS if (kind, n) not in SKIP] + ["fuse_seq_bn_seq_bn_b"]:
        pm.save_adapter(name, tmp_path / name, format="adapters")
        assert detect_format(tmp_path / name) == "adapters"
    fresh = pa.AdapterModel(base_model(kind))
    fresh.eval()
    for name in [n for n in ADAPTERS if (kind, n) not in SKIP] + ["fuse_seq_bn_seq_bn_b"]:
        fresh.load_adapter(tmp_path / name, name=name, activate=False)
    for setup in [n for n in ADAPTERS if (kind, n) not in SKIP] + [Stack("seq_bn", "seq_bn_b"),
                                                                   "fuse_seq_bn_seq_bn_b"]:
        pm.set_active(setup)
        fresh.set_active(setup)
        assert torch.equal(outputs(pm, inputs)[0], outputs(fresh, inputs)[0]), setup
    pm.set_active(None)
    config = json.loads((tmp_path / "seq_bn" / "adapter_config.json").read_text())
    assert config["version"].startswith("adapters.") and config["config"]["original_ln_before"] is True
    assert json.loads((tmp_path / "seq_bn_var" / "adapter_config.json").read_text())["config"]["leave_out"] == [0]


def test_par_bn_refused_on_llama():
    pm = pa.AdapterModel(base_model("llama"))
    before = snapshot(pm)
    with pytest.raises(LoadError, match="is_parallel=true"):
        pm.load_adapter(FIXTURES / "llama" / "adapters" / "par_bn")
    assert_same_snapshot(before, snapshot(pm))
    with pytest.raises(ConfigError, match="par_bn"):
        pm.add_adapter("p", pa.BottleneckConfig(placement="par_bn"))


def _copy(name: str, tmp_path: Path, kind: str = "bert") -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / kind / "adapters" / name, dst)
    return dst


@pytest.mark.parametrize("field, value", [
    ("phm_layer", True), ("use_gating", True), ("inv_adapter", "nice"), ("original_ln_after", False),
    ("scaling", "learned"), ("residual_before_ln", "post_add"), ("non_linearity", "gelu_new"),
    ("cross_adapter", True), ("stochastic_depth", 0.1), ("some_future_field", 3),
])
def test_refused_bottleneck_fields_leave_model_unchanged(tmp_path, field, value):
    folder = _copy("seq_bn", tmp_path)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["config"][field] = value
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    pm = pa.AdapterModel(base_model("bert"))
    pm.load_adapter(FIXTURES / "bert" / "adapters" / "lora", name="lora")
    before = snapshot(pm)
    with pytest.raises(LoadError, match=field):
        pm.load_adapter(folder)
    assert_same_snapshot(before, snapshot(pm))


def test_refused_architectures_and_pickles(tmp_path):
    pm = pa.AdapterModel(base_model("bert"))
    folder = _copy("seq_bn", tmp_path)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["config"] = {"architecture": "prefix_tuning", "prefix_length": 10}
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="architecture='prefix_tuning'"):
        pm.load_adapter(folder)
    pickled = _copy("lora", tmp_path)
    (pickled / "adapter.safetensors").rename(pickled / "pytorch_adapter.bin")
    with pytest.raises(UnsafeFileError, match="pickle"):
        pm.load_adapter(pickled)
    gated = _copy("lora", tmp_path / "g")
    meta = json.loads((gated / "adapter_config.json").read_text())
    meta["config"]["use_gating"] = True
    (gated / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="use_gating"):
        pm.load_adapter(gated)
    assert pm.adapters == []


def test_wrong_shapes_and_missing_fused_adapters_refused(tmp_path):
    folder = _copy("seq_bn", tmp_path)
    tensors = load_file(str(folder / "adapter.safetensors"))
    key = next(k for k in tensors if k.endswith("adapter_up.weight"))
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, str(folder / "adapter.safetensors"))
    pm = pa.AdapterModel(base_model("bert"))
    before = snapshot(pm)
    with pytest.raises(pa.PolyAdapterError, match="adapter_up|up.weight|shape"):
        pm.load_adapter(folder)
    with pytest.raises(LoadError, match="load those adapters first"):
        pm.load_adapter(FIXTURES / "bert" / "fusion" / "seq_bn_seq_bn_b")
    assert_same_snapshot(before, snapshot(pm))


def test_head_becomes_module_copy(tmp_path):
    folder = _copy("lora", tmp_path)
    head = load_file(str(folder / "model_head.safetensors"))
    head["classifier.weight"] = head["classifier.weight"] + 0.5
    save_file(head, str(folder / "model_head.safetensors"))
    pm = pa.AdapterModel(base_model("bert"))
    record = pm.load_adapter(folder, name="withhead")
    assert record.saved_modules == ["classifier"]
    inputs = load_file(str(FIXTURES / "bert" / "inputs.safetensors"))
    expected = base_model("bert")
    with torch.no_grad():
        expected.classifier.weight.copy_(head["classifier.weight"])
    plain = pa.AdapterModel(expected)
    headless = _copy("lora", tmp_path / "headless")  # (its own head equals the *original* classifier)
    for f in ("head_config.json", "model_head.safetensors"):
        (headless / f).unlink()
    plain.load_adapter(headless, name="lora")
    with torch.no_grad():
        assert (pm(**inputs).logits - plain(**inputs).logits).abs().max() < TOL
    pm.save_adapter("withhead", tmp_path / "out", format="adapters")
    assert torch.equal(load_file(str(tmp_path / "out" / "model_head.safetensors"))["classifier.weight"],
                       head["classifier.weight"])
    flex = tmp_path / "flex"
    shutil.copytree(folder, flex)
    (flex / "head_config.json").write_text(json.dumps({"config": {"head_type": "classification", "layers": 2},
                                                       "name": "x", "version": "adapters.1.3.0"}))
    with pytest.raises(LoadError, match="flex prediction head"):
        pm.load_adapter(flex, name="flex")


def test_convert_and_info(tmp_path):
    from polyadapter.cli import main
    from polyadapter.cli.describe import describe
    pm = pa.AdapterModel(base_model("bert"))
    pm.load_adapter(FIXTURES / "bert" / "adapters" / "seq_bn", name="seq_bn")
    pm.save_adapter("seq_bn", tmp_path / "native")
    assert main(["convert", "--to", "adapters", str(tmp_path / "native"), str(tmp_path / "ah")]) == 0
    convert(tmp_path / "ah", tmp_path / "back", to="native")
    info = describe(tmp_path / "ah")
    assert info["format"] == "adapters" and info["method"] == "bottleneck" and info["sites"] == 2
    assert describe(FIXTURES / "bert" / "fusion" / "seq_bn_seq_bn_b")["method"] == "fusion"
    fresh = pa.AdapterModel(base_model("bert"))
    fresh.load_adapter(tmp_path / "back", name="seq_bn")
    inputs = load_file(str(FIXTURES / "bert" / "inputs.safetensors"))
    with torch.no_grad():
        assert torch.equal(pm(**inputs).logits, fresh(**inputs).logits)
    with pytest.raises(ConfigError, match="native first"):
        convert(tmp_path / "ah", tmp_path / "peft", to="peft")


def test_new_placements_from_python():
    """The AdapterHub placements as plain configs: they start at the base, take the
    AdapterHub fields, and their mixed batches equal each row alone."""
    pm = pa.AdapterModel(make_model("bert"))
    pm.eval()
    inputs = load_file(str(FIXTURES / "bert" / "inputs.safetensors"))
    with torch.no_grad():
        base = pm(**inputs).logits
    pm.add_adapter("s", pa.BottleneckConfig(placement="seq_bn", leave_out=[1], ln_before=True))
    pm.add_adapter("h", pa.BottleneckConfig(placement="double_seq_bn", ln_after=True, activation="swish"))
    pm.add_adapter("p", pa.BottleneckConfig(placement="par_bn", scale=4.0, reduction_factor=2))
    pm.add_adapter("i", pa.IA3Config(placement="adapterhub"))
    assert pm.record("s").sites == ["bert.encoder.layer.0.output.LayerNorm"]
    assert "bert.encoder.layer.0.intermediate.dense" in pm.record("i").sites
    pm.set_active("s")
    with torch.no_grad():
        assert (pm(**inputs).logits - base).abs().max() < 1e-6   # zero up-projection: starts at the base
        for p in pm.trainable_parameters() + [q for n in ("s", "h", "p", "i")
                                             for q in pm.adapter_parameters(n).values()]:
            p.add_(torch.randn_like(p) * 0.1)
    rows = ["s", "h", "p", "i", Stack("s", "h"), None]
    batch = {k: v.repeat(len(rows), 1) for k, v in inputs.items()}
    with torch.no_grad():
        mixed = pm(**batch, adapter_names=[r for r in rows for _ in range(2)]).logits
        for i, setup in enumerate(rows):
            pm.set_active(setup)
            alone = pm(**inputs).logits
            assert (mixed[2 * i: 2 * i + 2] - alone).abs().max() < 1e-6, setup


def test_generate_mixed_rows_with_adapterhub_adapters():
    """Greedy decoding with the KV cache, every row its own AdapterHub setup (a Fuse of
    layer-site seq_bn adapters included), equals each row decoded alone."""
    pm = load_all("llama")
    ids = load_file(str(FIXTURES / "llama" / "inputs.safetensors"))["input_ids"][1:].repeat(4, 1)
    setups = ["seq_bn", "fuse_seq_bn_seq_bn_b", Stack("lora", "seq_bn"), None]
    kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=setups, **kw)
        for i, setup in enumerate(setups):
            pm.set_active(setup)
            alone = pm.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw)
            assert torch.equal(mixed[i:i + 1], alone), setup


def test_adapter_layer_norms_round_trip(tmp_path):
    """ln_before / ln_after (adapters cannot save ln_before as safetensors itself, so this
    checks our writer and reader agree, with both of AdapterHub's names for that LN)."""
    pm = pa.AdapterModel(make_model("bert"))
    pm.eval()
    pm.add_adapter("s", pa.BottleneckConfig(placement="seq_bn", ln_before=True, reduction_factor=4))
    pm.add_adapter("h", pa.BottleneckConfig(placement="double_seq_bn", ln_after=True,
                                            adapter_residual_before_ln=True, activation="swish"))
    with torch.no_grad():
        for n in ("s", "h"):
            for p in pm.adapter_parameters(n).values():
                p.add_(torch.randn_like(p) * 0.2)
    for n in ("s", "h"):
        pm.save_adapter(n, tmp_path / n, format="adapters")
    keys = load_file(str(tmp_path / "s" / "adapter.safetensors"))
    assert any(k.endswith("adapter_norm_before.weight") for k in keys)
    assert any(k.endswith("adapter_down.0.weight") for k in keys) and any(k.endswith("adapter_down.1.weight")
                                                                          for k in keys)
    fresh = pa.AdapterModel(make_model("bert"))
    fresh.eval()
    inputs = load_file(str(FIXTURES / "bert" / "inputs.safetensors"))
    for n in ("s", "h"):
        fresh.load_adapter(tmp_path / n, name=n)
    for setup in ("s", "h", Stack("h", "s")):
        pm.set_active(setup)
        fresh.set_active(setup)
        with torch.no_grad():
            assert torch.equal(pm(**inputs).logits, fresh(**inputs).logits), setup
