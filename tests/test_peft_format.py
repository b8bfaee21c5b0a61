"""PEFT's folder format: parity with peft itself on the same base weights, in both
directions, file-level conversion, and refusals that leave the model unchanged."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_inputs, make_model, output_of
from polyadapter import (
    AdapterModel, ConfigError, IA3Config, LoadError, LoraConfig, PolyAdapterError, ShapeMismatchError,
    UnsafeFileError,
)
from polyadapter.formats import convert

import peft  # noqa: E402  the peer we check parity against (a test dependency)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TOL = 1e-5
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# ---------------------------------------------------------------- helpers
def peft_folder(path, kind, config, seed=0):
    """A PEFT-trained-style adapter: peft's own model with every adapter tensor perturbed,
    saved by peft. Returns (folder, the PeftModel's logits)."""
    pm = peft.get_peft_model(make_model(kind), config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(s in n for s in ("lora_", "ia3_l", "modules_to_save")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        ref = output_of(pm, make_inputs(kind))
    pm.save_pretrained(str(path))
    return path, ref


def perturb(model, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def edit(folder, config_changes=None, tensors_fn=None):
    if config_changes:
        cfg = json.loads((folder / CONFIG).read_text())
        cfg.update(config_changes)
        (folder / CONFIG).write_text(json.dumps(cfg))
    if tensors_fn:
        tensors = load_file(str(folder / WEIGHTS))
        save_file(tensors_fn(tensors), str(folder / WEIGHTS))


def with_kept_adapter(kind):
    """A model that already holds an active adapter, to show a failed load changes nothing."""
    m = AdapterModel(make_model(kind))
    m.add_adapter("keep", LoraConfig(r=2))
    perturb(m, "keep")
    return m


def snapshot(m, kind):
    with torch.no_grad():
        out = output_of(m, make_inputs(kind))
    return list(m.adapters), m.active_adapters, {k: v.clone() for k, v in m.model.state_dict().items()}, out


def assert_unchanged(m, kind, snap):
    adapters, active, state, out = snap
    assert m.adapters == adapters and m.active_adapters == active
    now = m.model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(output_of(m, make_inputs(kind)), out)


def ours_output(model, kind):
    with torch.no_grad():
        return output_of(model, make_inputs(kind))


def assert_nontrivial(out, kind):
    """The adapter really changes the output (so matching logits mean something)."""
    assert (out - ours_output(make_model(kind), kind)).abs().max() > 1e-3


# ---------------------------------------------------------------- PEFT -> polyadapter
LORA_FROM_PEFT = {
    "bert-modules_to_save": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                          modules_to_save=["classifier"])),
    # SEQ_CLS makes peft write modules_to_save ["classifier", "classifier", "score"]; BERT has no "score".
    "bert-seq_cls": ("bert", dict(r=2, target_modules=["query"], task_type="SEQ_CLS")),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    "llama-rslora": ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                   lora_dropout=0.1)),
    "llama-regex": ("llama", dict(r=2, target_modules=r".*\.(q|v)_proj")),
    "llama-layers_to_transform": ("llama", dict(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "bert-exclude": ("bert", dict(r=2, target_modules=["query", "value"],
                                  exclude_modules=["bert.encoder.layer.0.attention.self.value"])),
    "bert-uniform-rank_pattern": ("bert", dict(r=4, target_modules=["query", "value"], rank_pattern={"query": 4},
                                               alpha_pattern={"query": 8}, lora_alpha=8)),
    "bert-per-site-rank_pattern": ("bert", dict(r=4, target_modules=["query", "value"], rank_pattern={"value": 2},
                                                alpha_pattern={"query": 16}, lora_alpha=8)),
    "llama-regex-rank_pattern": ("llama", dict(r=2, target_modules="all-linear",
                                               rank_pattern={r"layers\.1\..*_proj": 6})),
}


@pytest.mark.parametrize("case", list(LORA_FROM_PEFT))
def test_peft_lora_loads_with_peft_logits(tmp_path, case):
    kind, kwargs = LORA_FROM_PEFT[case]
    folder, ref = peft_folder(tmp_path / "a", kind, peft.LoraConfig(**kwargs))
    m = AdapterModel(make_model(kind))
    record = m.load_adapter(folder)
    assert record.name == "a" and m.active_adapters == ("a",)
    assert record.config.method == "lora" and record.config.r == kwargs["r"]
    assert record.provenance["source_format"] == "peft"
    assert_nontrivial(ref, kind)
    assert (ours_output(m, kind) - ref).abs().max() <= TOL


def test_peft_bare_suffix_modules_to_save_follows_the_tensors(tmp_path):
    """PEFT up to 0.21 matched a modules_to_save entry as a bare suffix ("lassifier" saved
    "classifier"); 0.22 wants the whole name or a dotted suffix. A file written the old way
    holds the classifier's tensors under an entry our dotted rule would not match: the
    tensors decide, so it loads with PEFT's logits whichever PEFT reads this test."""
    folder, ref = peft_folder(tmp_path / "a", "bert", peft.LoraConfig(
        r=2, target_modules=["query"], modules_to_save=["classifier"]))
    edit(folder, {"modules_to_save": ["lassifier"]})     # as PEFT <= 0.21 wrote it
    m = AdapterModel(make_model("bert"))
    record = m.load_adapter(folder)
    assert record.config.modules_to_save
    assert_nontrivial(ref, "bert")
    assert (ours_output(m, "bert") - ref).abs().max() <= TOL


IA3_FROM_PEFT = {
    "bert": dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                 modules_to_save=["classifier"]),
    "llama": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "gpt2": dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
}


@pytest.mark.parametrize("kind", list(IA3_FROM_PEFT))
def test_peft_ia3_loads_with_peft_logits(tmp_path, kind):
    folder, ref = peft_folder(tmp_path / "ia3", kind, peft.IA3Config(**IA3_FROM_PEFT[kind]))
    m = AdapterModel(make_model(kind))
    record = m.load_adapter(folder, name="x")
    assert record.config.method == "ia3" and record.config.feedforward
    assert_nontrivial(ref, kind)
    assert (ours_output(m, kind) - ref).abs().max() <= TOL


def test_peft_keys_with_adapter_name_are_read(tmp_path):
    """A file keyed like peft's in-memory state dict (adapter name, base_layer copies)."""
    pm = peft.get_peft_model(make_model("bert"), peft.LoraConfig(
        r=4, target_modules=["query", "value"], modules_to_save=["classifier"])).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.2)
        ref = output_of(pm, make_inputs("bert"))
    pm.save_pretrained(str(tmp_path / "a"))
    raw = {k: v.contiguous() for k, v in pm.state_dict().items()
           if ".default" in k or "base_layer" in k or "original_module" in k}
    assert any(".lora_A.default.weight" in k for k in raw) and any("modules_to_save.default" in k for k in raw)
    save_file(raw, str(tmp_path / "a" / WEIGHTS))
    m = AdapterModel(make_model("bert"))
    m.load_adapter(tmp_path / "a")
    assert (ours_output(m, "bert") - ref).abs().max() <= TOL


# ---------------------------------------------------------------- polyadapter -> PEFT
EXPORTS = {
    "bert-lora-modules_to_save": ("bert", LoraConfig(r=4, modules_to_save=["classifier"])),
    "llama-lora-embedding": ("llama", LoraConfig(r=4, targets=["q_proj", "v_proj", "embed_tokens"])),
    "gpt2-lora-conv1d": ("gpt2", LoraConfig(r=4)),
    "llama-rslora": ("llama", LoraConfig(r=4, alpha=8, use_rslora=True)),
    "llama-regex": ("llama", LoraConfig(r=2, targets=[r"re:.*\.(q|k)_proj"])),
    "llama-all-linear": ("llama", LoraConfig(r=2, targets=["all-linear"])),
    "bert-ia3": ("bert", IA3Config(modules_to_save=["classifier"])),
    "llama-ia3": ("llama", IA3Config()),
    "gpt2-ia3": ("gpt2", IA3Config()),
    "bert-pissa": ("bert", LoraConfig(r=4, init="pissa", modules_to_save=["classifier"])),
    "llama-pissa-rslora": ("llama", LoraConfig(r=4, alpha=8, init="pissa", use_rslora=True)),
    "llama-rank-and-alpha-patterns": ("llama", LoraConfig(r=4, alpha=8, targets=["all-linear"],
                                                          rank_pattern={"mlp.down_proj": 2, "re:.*layers\\.1\\..*": 6},
                                                          alpha_pattern={"q_proj": 3.0})),
    "bert-pissa-rank_pattern": ("bert", LoraConfig(r=4, init="pissa", rank_pattern={"value": 2})),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_peft_with_our_logits(tmp_path, case):
    kind, config = EXPORTS[case]
    m = AdapterModel(make_model(kind))
    m.add_adapter("mine", config)
    perturb(m, "mine")
    ours = ours_output(m, kind)
    assert_nontrivial(ours, kind)
    path = m.save_adapter("mine", tmp_path / "p", format="peft")
    written = json.loads((path / CONFIG).read_text())
    pm = peft.PeftModel.from_pretrained(make_model(kind), str(path)).eval()
    with torch.no_grad():
        theirs = output_of(pm, make_inputs(kind))
    assert (ours - theirs).abs().max() <= TOL
    if getattr(config, "init", None) == "pissa":
        assert written["r"] == 2 * config.r  # [A; A0], [B, -B0]
    # and back: PEFT's folder read by us gives the same function again
    m.load_adapter(path, name="back")
    assert (ours_output(m, kind) - ours).abs().max() <= TOL


@pytest.mark.parametrize("method", ["bottleneck", "prompt", "sparse"])
def test_export_refuses_methods_peft_cannot_hold(tmp_path, method):
    m = AdapterModel(make_model("bert"))
    m.add_adapter("x", {"method": method})
    with pytest.raises(ConfigError, match=f"PEFT's format cannot hold method '{method}'"):
        m.save_adapter("x", tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------- file-level conversion
NATIVE_CASES = {
    "bert-lora": ("bert", LoraConfig(r=4, modules_to_save=["classifier"], init="gaussian")),
    "llama-lora-embedding": ("llama", LoraConfig(r=2, targets=["q_proj", "v_proj", "embed_tokens"])),
    "bert-ia3": ("bert", IA3Config()),
    "llama-all-linear": ("llama", LoraConfig(r=2, targets=["all-linear"])),
}


@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_convert_native_peft_native_keeps_tensors(tmp_path, case):
    kind, config = NATIVE_CASES[case]
    m = AdapterModel(make_model(kind))
    m.add_adapter("a", config)
    perturb(m, "a")
    ours = ours_output(m, kind)
    native = m.save_adapter("a", tmp_path / "native")
    convert(native, tmp_path / "peft", to="peft")
    back = convert(tmp_path / "peft", tmp_path / "again", to="native")
    t0, t1 = load_file(str(native / "adapter.safetensors")), load_file(str(back / "adapter.safetensors"))
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    meta0 = json.loads((native / "polyadapter.json").read_text())
    meta1 = json.loads((back / "polyadapter.json").read_text())
    assert meta1["sites"] == meta0["sites"] and meta1["modules_to_save"] == meta0["modules_to_save"]
    assert meta1["base_model"] == {}
    if case != "bert-ia3" and case != "llama-all-linear":  # those need exact site names to keep the order
        assert meta1["config"] == meta0["config"]
    # the converted native folder loads (native loader) and computes the same function
    fresh = AdapterModel(make_model(kind))
    fresh.load_adapter(back, name="b")
    assert (ours_output(fresh, kind) - ours).abs().max() <= TOL
    # and the PEFT folder written from files alone loads in peft
    pm = peft.PeftModel.from_pretrained(make_model(kind), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert (output_of(pm, make_inputs(kind)) - ours).abs().max() <= TOL


def test_convert_peft_native_peft_keeps_tensors(tmp_path):
    kind, kwargs = LORA_FROM_PEFT["llama-embedding"]
    folder, ref = peft_folder(tmp_path / "p", kind, peft.LoraConfig(**kwargs))
    with pytest.warns(UserWarning, match="copies of base weights"):
        convert(folder, tmp_path / "n", to="native")
    convert(tmp_path / "n", tmp_path / "p2", to="peft")
    t0, t1 = load_file(str(folder / WEIGHTS)), load_file(str(tmp_path / "p2" / WEIGHTS))
    t0 = {k: v for k, v in t0.items() if ".base_layer." not in k}  # peft's copy of the base embedding
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    c0, c1 = json.loads((folder / CONFIG).read_text()), json.loads((tmp_path / "p2" / CONFIG).read_text())
    for key in ("r", "lora_alpha", "use_rslora", "target_modules", "lora_dropout"):
        assert c0[key] == c1[key], key
    pm = peft.PeftModel.from_pretrained(make_model(kind), str(tmp_path / "p2")).eval()
    with torch.no_grad():
        assert (output_of(pm, make_inputs(kind)) - ref).abs().max() <= TOL


def test_convert_pissa_becomes_plain_lora_of_twice_the_rank(tmp_path):
    m = AdapterModel(make_model("bert"))
    m.add_adapter("p", LoraConfig(r=4, init="pissa"))
    perturb(m, "p")
    ours = ours_output(m, "bert")
    native = m.save_adapter("p", tmp_path / "n")
    convert(native, tmp_path / "peft", to="peft")
    back = convert(tmp_path / "peft", tmp_path / "n2", to="native")
    meta = json.loads((back / "polyadapter.json").read_text())
    assert meta["config"]["r"] == 8 and meta["config"]["init"] == "default" and meta["config"]["alpha"] == 32
    fresh = AdapterModel(make_model("bert"))
    fresh.load_adapter(back)
    assert (ours_output(fresh, "bert") - ours).abs().max() <= TOL


def test_convert_refuses_same_format_and_keeps_existing_dst(tmp_path):
    folder, _ = peft_folder(tmp_path / "p", "bert", peft.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="already in the peft format"):
        convert(folder, tmp_path / "x", to="peft")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        convert(folder, tmp_path / "taken", to="native")
    convert(folder, tmp_path / "taken", to="native", overwrite=True)
    assert (tmp_path / "taken" / "polyadapter.json").is_file()


# ---------------------------------------------------------------- refusals: clear errors, model unchanged
def _lora_folder(tmp_path, **kwargs):
    kwargs = {"r": 4, "target_modules": ["query", "value"], **kwargs}
    return peft_folder(tmp_path / "bad", "bert", peft.LoraConfig(**kwargs))[0]


REFUSALS = {
    "bias-all": (dict(bias="all"), None, LoadError, "bias='all'"),
    "pissa-init": ({}, {"init_lora_weights": "pissa"}, LoadError, "init_lora_weights='pissa'.*rewrites the base"),
    "other-peft-type": ({}, {"peft_type": "PROMPT_TUNING"}, LoadError, "PROMPT_TUNING.*LORA and IA3"),
    "unknown-field": ({}, {"trainable_token_indices": [1, 2]}, LoadError, r"trainable_token_indices=\[1, 2\]"),
    "layer_replication": ({}, {"layer_replication": [[0, 2]]}, LoadError, "layer_replication"),
    "rank-differs": ({}, {"r": 8}, ShapeMismatchError, r"r=8"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_leave_model_unchanged(tmp_path, case):
    kwargs, json_changes, error, message = REFUSALS[case]
    folder = _lora_folder(tmp_path, **kwargs)
    edit(folder, json_changes)
    m = with_kept_adapter("bert")
    snap = snapshot(m, "bert")
    with pytest.raises(error, match=message):
        m.load_adapter(folder)
    assert_unchanged(m, "bert", snap)


def test_pickle_only_folder_is_refused(tmp_path):
    pm = peft.get_peft_model(make_model("bert"), peft.LoraConfig(r=2, target_modules=["query"]))
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    m = with_kept_adapter("bert")
    snap = snapshot(m, "bert")
    with pytest.raises(UnsafeFileError, match="pickle.*convert"):
        m.load_adapter(tmp_path / "bin")
    with pytest.raises(UnsafeFileError):
        convert(tmp_path / "bin", tmp_path / "n", to="native")
    assert_unchanged(m, "bert", snap)


def test_wrong_tensor_shape_and_changed_base_copy_are_refused(tmp_path):
    folder = _lora_folder(tmp_path)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    edit(folder, tensors_fn=lambda t: {**t, key: torch.zeros(16, 4)})
    m = with_kept_adapter("bert")
    snap = snapshot(m, "bert")
    with pytest.raises(LoadError, match="query"):
        m.load_adapter(folder)
    assert_unchanged(m, "bert", snap)

    kind, kwargs = LORA_FROM_PEFT["llama-embedding"]
    folder, _ = peft_folder(tmp_path / "emb", kind, peft.LoraConfig(**kwargs))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    edit(folder, tensors_fn=lambda t: {**t, key: t[key] + 1})
    m = with_kept_adapter(kind)
    snap = snapshot(m, kind)
    with pytest.raises(LoadError, match="embed_tokens.*differs from this model"):
        m.load_adapter(folder)
    assert_unchanged(m, kind, snap)


def test_adapter_for_another_model_or_a_taken_name_is_refused(tmp_path):
    folder = _lora_folder(tmp_path)  # BERT's query/value
    m = with_kept_adapter("llama")
    snap = snapshot(m, "llama")
    with pytest.raises(PolyAdapterError, match="matches no module"):
        m.load_adapter(folder)
    assert_unchanged(m, "llama", snap)
    m = with_kept_adapter("bert")
    snap = snapshot(m, "bert")
    with pytest.raises(PolyAdapterError, match="already exists"):
        m.load_adapter(folder, name="keep")
    assert_unchanged(m, "bert", snap)
