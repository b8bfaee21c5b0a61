"""Hostile files: valid native and PEFT folders mutated field by field and tensor by
tensor. Every load either succeeds with a working adapter or raises a PolyAdapterError,
and a refused load leaves a full snapshot of the model bit-identical."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import assert_same_snapshot, make_inputs, make_model, output_of, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import polyadapter as pa
from polyadapter.formats import files as files_mod

# Values of every JSON kind and the extremes of each; most are wrong for any given field.
HOSTILE_VALUES = [
    None, True, False, 0, -1, 1.5, -1e308, 1e308, 10**18, "", "x", "NaN", [], [None], ["x"], [[]], {}, {"a": 1},
    {"re:(": 3}, "re:(", "y" * 10_000, list(range(1000)),
]
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=10)


@pytest.fixture(scope="module")
def base():
    return make_model("bert")


def fresh(base):
    """The same base each time (deep-copied), wrapped, with one adapter already there."""
    import copy
    pm = pa.AdapterModel(copy.deepcopy(base))
    pm.add_adapter("existing", pa.LoraConfig(r=2, targets=["query"]))
    pm.set_active("existing")
    return pm


@pytest.fixture(scope="module")
def native_folder(base, tmp_path_factory):
    pm = fresh(base)
    pm.add_adapter("src", pa.LoraConfig(r=2, alpha=4, targets=["query", "value"], modules_to_save=["classifier"],
                                        rank_pattern={"re:.*layer\\.1\\..*": 3}))
    with torch.no_grad():
        for p in pm.adapter_parameters("src").values():
            p.add_(0.05)
    return pm.save_adapter("src", tmp_path_factory.mktemp("native") / "src")


@pytest.fixture(scope="module")
def peft_folder(base, tmp_path_factory):
    pm = fresh(base)
    pm.add_adapter("src", pa.LoraConfig(r=2, targets=["query", "value"]))
    with torch.no_grad():
        for p in pm.adapter_parameters("src").values():
            p.add_(0.05)
    return pm.save_adapter("src", tmp_path_factory.mktemp("peft") / "src", format="peft")


def copy_folder(src, dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def try_load(base, folder):
    """Load ``folder`` into a fresh model. Returns None when it loaded (and runs), else the
    PolyAdapterError; any other exception fails the test. A refused load must change nothing."""
    pm = fresh(base)
    before = snapshot(pm)
    try:
        pm.load_adapter(folder, name="loaded")
    except pa.PolyAdapterError as e:
        assert_same_snapshot(before, snapshot(pm))
        assert str(e)
        return e
    out = output_of(pm, make_inputs("bert"))
    assert torch.isfinite(out).all()
    return None


def write_json(folder, name, data):
    (folder / name).write_text(json.dumps(data), encoding="utf-8")


# ---------------------------------------------------------------------- JSON fields, one at a time
NATIVE_FIELDS = ["format", "format_version", "library_version", "name", "config", "sites", "modules_to_save",
                 "num_parameters", "base_model", "provenance"]
LORA_FIELDS = ["method", "targets", "modules_to_save", "r", "alpha", "dropout", "use_rslora", "init",
               "rank_pattern", "alpha_pattern"]


@pytest.mark.parametrize("field", NATIVE_FIELDS + [f"config.{f}" for f in LORA_FIELDS] + ["unknown", "config.unknown"])
def test_native_json_mutated_field_by_field(base, native_folder, tmp_path, field):
    meta = json.loads((native_folder / "polyadapter.json").read_text())
    outcomes = []
    for i, value in enumerate(HOSTILE_VALUES + ["<deleted>"]):
        folder = copy_folder(native_folder, tmp_path / f"m{i}")
        data = json.loads(json.dumps(meta))
        holder, key = (data["config"], field[7:]) if field.startswith("config.") else (data, field)
        if value == "<deleted>":
            holder.pop(key, None)
        else:
            holder[key] = value
        write_json(folder, "polyadapter.json", data)
        outcomes.append(try_load(base, folder))
    # A field that may be absent or take some of these values still refuses most of them.
    assert sum(o is not None for o in outcomes) >= len(outcomes) // 2, field


@pytest.mark.parametrize("field", ["peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                                   "modules_to_save", "rank_pattern", "alpha_pattern", "init_lora_weights",
                                   "use_dora", "bias", "layers_to_transform", "exclude_modules", "fan_in_fan_out"])
def test_peft_json_mutated_field_by_field(base, peft_folder, tmp_path, field):
    config = json.loads((peft_folder / "adapter_config.json").read_text())
    refused = 0
    for i, value in enumerate(HOSTILE_VALUES):
        folder = copy_folder(peft_folder, tmp_path / f"m{i}")
        write_json(folder, "adapter_config.json", {**config, field: value})
        refused += try_load(base, folder) is not None
    assert refused >= len(HOSTILE_VALUES) // 2, field


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from([f"config.{f}" for f in LORA_FIELDS] + NATIVE_FIELDS), value=JSON_VALUES)
def test_native_json_any_value_is_loaded_or_refused_cleanly(base, native_folder, tmp_path_factory, field, value):
    folder = copy_folder(native_folder, tmp_path_factory.mktemp("h") / "a")
    meta = json.loads((native_folder / "polyadapter.json").read_text())
    holder, key = (meta["config"], field[7:]) if field.startswith("config.") else (meta, field)
    holder[key] = value
    write_json(folder, "polyadapter.json", meta)
    try_load(base, folder)  # asserts: PolyAdapterError with nothing changed, or a working adapter


@pytest.mark.parametrize("text,why", [
    ('{"format": "polyadapter-adapter", "format_version": 1, "format_version": 2}', "appears twice"),
    ('{"format": "polyadapter-adapter", "x": NaN}', "NaN"),
    ('{"format": "polyadapter-adapter", "x": Infinity}', "Infinity"),
    ('{"format": "polyadapter-adapter", "x": 1e999}', "beyond the range"),
    ('{"format": "polyadapter-adapter", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": ', "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
])
def test_strict_json_is_refused_with_the_reason(base, native_folder, tmp_path, text, why):
    folder = copy_folder(native_folder, tmp_path / "a")
    data = text if isinstance(text, bytes) else text.encode()
    (folder / "polyadapter.json").write_bytes(data)
    err = try_load(base, folder)
    assert isinstance(err, pa.LoadError) and why in str(err) and "polyadapter.json" in str(err)


def test_oversized_json_is_refused_before_parsing(base, native_folder, tmp_path, monkeypatch):
    folder = copy_folder(native_folder, tmp_path / "a")
    monkeypatch.setattr(files_mod, "MAX_JSON_BYTES", 100)
    err = try_load(base, folder)
    assert isinstance(err, pa.LoadError) and "too large" in str(err)


def test_infinite_alpha_and_absurd_rank_are_config_errors(base):
    pm = fresh(base)
    before = snapshot(pm)
    with pytest.raises(pa.ConfigError, match="alpha=inf is invalid: input should be a finite number"):
        pm.add_adapter("x", {"method": "lora", "alpha": float("inf")})
    with pytest.raises(pa.ConfigError, match="r='8' is invalid"):
        pm.add_adapter("x", {"method": "lora", "r": "8"})
    with pytest.raises(pa.ConfigError, match="would hold .* numbers .* more than the limit"):
        pm.add_adapter("x", {"method": "lora", "r": 10**12})  # petabytes: refused before allocating
    with pytest.raises(pa.ConfigError, match="would hold"):
        pm.add_adapter("x", {"method": "bottleneck", "hidden_size": 10**11})
    with pytest.raises(pa.ConfigError, match="would hold"):
        pm.add_adapter("x", {"method": "prompt", "num_virtual_tokens": 10**11})
    with pytest.raises(pa.ConfigError, match="not a valid regular expression"):
        pm.add_adapter("x", {"method": "lora", "rank_pattern": {"re:(": 2}})
    assert_same_snapshot(before, snapshot(pm))


# ---------------------------------------------------------------------- tensors
def mutate_tensors(folder, file, change):
    tensors = load_file(str(folder / file))
    change(tensors)
    save_file(tensors, str(folder / file))


def first_key(tensors, part="lora_A"):
    return next(k for k in sorted(tensors) if part in k)


TENSOR_MUTATIONS = {
    "float64 beyond float32": lambda t: t.__setitem__(first_key(t), t[first_key(t)].double() * 1e300),
    "nan": lambda t: t[first_key(t)].view(-1).__setitem__(0, float("nan")),
    "inf": lambda t: t[first_key(t)].view(-1).__setitem__(0, float("inf")),
    "int dtype": lambda t: t.__setitem__(first_key(t), t[first_key(t)].to(torch.int32)),
    "bool dtype": lambda t: t.__setitem__(first_key(t), t[first_key(t)] > 0),
    "transposed": lambda t: t.__setitem__(first_key(t), t[first_key(t)].t().contiguous()),
    "extra dim": lambda t: t.__setitem__(first_key(t), t[first_key(t)][None]),
    "scalar": lambda t: t.__setitem__(first_key(t), torch.tensor(1.0)),
    "empty": lambda t: t.__setitem__(first_key(t), torch.zeros(0)),
    "renamed": lambda t: t.__setitem__(first_key(t) + "x", t.pop(first_key(t))),
    "missing": lambda t: t.pop(first_key(t)),
    "extra": lambda t: t.__setitem__("bert.encoder.layer.0.attention.self.query.lora_C", torch.zeros(2, 2)),
    "empty file": lambda t: t.clear(),
}


@pytest.mark.parametrize("kind", ["native", "peft"])
@pytest.mark.parametrize("mutation", sorted(TENSOR_MUTATIONS))
def test_tensor_mutations_are_refused(base, native_folder, peft_folder, tmp_path, kind, mutation):
    src, file = (native_folder, "adapter.safetensors") if kind == "native" else \
        (peft_folder, "adapter_model.safetensors")
    folder = copy_folder(src, tmp_path / "a")
    mutate_tensors(folder, file, TENSOR_MUTATIONS[mutation])
    err = try_load(base, folder)
    assert err is not None, mutation


def test_float16_tensors_load_converted(base, native_folder, tmp_path):
    """Another float dtype whose values fit is fine: converted to the part's dtype."""
    folder = copy_folder(native_folder, tmp_path / "a")
    mutate_tensors(folder, "adapter.safetensors", lambda t: t.update({k: v.half() for k, v in t.items()}))
    assert try_load(base, folder) is None


def raw_safetensors(header: str, payload: bytes = b"") -> bytes:
    data = header.encode()
    return struct.pack("<Q", len(data)) + data + payload


@pytest.mark.parametrize("content,why", [
    (raw_safetensors('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                     '"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "appears twice"),
    (struct.pack("<Q", 10**12) + b"{}", "does not fit"),
    (b"\x01\x02", "shorter than"),
    (raw_safetensors("not json"), "not valid JSON"),
    (raw_safetensors('{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 3), "cannot read"),
    (raw_safetensors('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": NaN}', b"\0" * 4), "NaN"),
])
def test_corrupt_safetensors_headers_are_refused(base, native_folder, tmp_path, content, why):
    folder = copy_folder(native_folder, tmp_path / "a")
    (folder / "adapter.safetensors").write_bytes(content)
    err = try_load(base, folder)
    assert isinstance(err, pa.LoadError) and why in str(err) and "adapter.safetensors" in str(err)


def test_peft_file_with_two_tensors_for_one_weight_is_ambiguous(base, peft_folder, tmp_path):
    folder = copy_folder(peft_folder, tmp_path / "a")

    def duplicate(t):
        key = first_key(t)
        t[key.replace(".lora_A.weight", ".lora_A.default.weight")] = t[key] * 2

    mutate_tensors(folder, "adapter_model.safetensors", duplicate)
    err = try_load(base, folder)
    assert isinstance(err, pa.LoadError) and "ambiguous" in str(err)


def test_peft_head_saved_twice_is_ambiguous(base, tmp_path):
    pm = fresh(base)
    pm.add_adapter("src", pa.LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"]))
    folder = pm.save_adapter("src", tmp_path / "p", format="peft")

    def duplicate(t):
        key = next(k for k in t if "classifier" in k and k.endswith("weight"))
        t[key.replace("classifier.", "classifier.modules_to_save.default.")] = t[key].clone()

    mutate_tensors(folder, "adapter_model.safetensors", duplicate)
    err = try_load(base, folder)
    assert isinstance(err, pa.LoadError) and "ambiguous" in str(err)


def test_invalid_regex_in_peft_patterns(base, peft_folder, tmp_path):
    for key in ("rank_pattern", "alpha_pattern"):
        folder = copy_folder(peft_folder, tmp_path / key)
        config = json.loads((folder / "adapter_config.json").read_text())
        write_json(folder, "adapter_config.json", {**config, key: {"query(": 4}})
        err = try_load(base, folder)
        assert isinstance(err, pa.LoadError) and "not a valid regular expression" in str(err) and key in str(err)


def test_info_and_convert_refuse_hostile_files_in_one_line(native_folder, tmp_path, capsys):
    from polyadapter.cli import main
    folder = copy_folder(native_folder, tmp_path / "a")
    meta = json.loads((folder / "polyadapter.json").read_text())
    meta["config"]["r"] = "eight"
    write_json(folder, "polyadapter.json", meta)
    for argv in (["info", folder], ["convert", "--to", "peft", folder, tmp_path / "out"]):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "r='eight' is invalid" in err
    assert not (tmp_path / "out").exists()


def test_info_on_a_mistyped_peft_config_is_one_line(peft_folder, tmp_path, capsys):
    from polyadapter.cli import main
    folder = copy_folder(peft_folder, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    write_json(folder, "adapter_config.json", {**config, "target_modules": [1, 2], "modules_to_save": {"a": 1}})
    code = main(["info", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "target_modules.list[str].0=1 is invalid" in err, err


def test_paths_with_nul_bytes(base, native_folder):
    pm = fresh(base)
    before = snapshot(pm)
    with pytest.raises(pa.LoadError, match="NUL"):
        pm.load_adapter(str(native_folder) + "\0x")
    with pytest.raises(pa.PolyAdapterError, match="NUL"):
        pm.save_adapter("existing", str(native_folder) + "\0x", overwrite=True)
    assert_same_snapshot(before, snapshot(pm))
