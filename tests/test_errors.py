"""Bad input gets a clear error naming what and where, and changes nothing."""
from __future__ import annotations

import json

import pytest
import torch

import polyadapter as pa
from conftest import make_inputs, make_model, output_of


def fingerprint_of(pm) -> tuple:
    """Everything a failed call must leave as it was."""
    return (
        tuple(pm.adapters), pm.active_adapters,
        {k: v.detach().clone() for k, v in pm.model.state_dict().items()},
        tuple((n, type(m).__name__) for n, m in pm.named_modules()),
    )


def assert_unchanged(pm, before) -> None:
    after = fingerprint_of(pm)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    assert after[2].keys() == before[2].keys()
    assert all(torch.equal(after[2][k], before[2][k]) for k in before[2])


@pytest.fixture
def pm():
    model = pa.AdapterModel(make_model("bert"))
    model.add_adapter("existing", {"method": "lora", "r": 2})
    return model


@pytest.fixture
def saved(pm, tmp_path):
    with torch.no_grad():
        for p in pm.adapter_parameters("existing").values():
            p.add_(0.1)
    return pm.save_adapter("existing", tmp_path / "saved")


def test_unknown_method(pm):
    before = fingerprint_of(pm)
    with pytest.raises(pa.ConfigError, match="unknown method 'lorax'.*known methods"):
        pm.add_adapter("x", {"method": "lorax"})
    assert_unchanged(pm, before)


def test_unknown_config_key_names_the_key(pm):
    with pytest.raises(pa.ConfigError, match=r"unknown key\(s\) \['rank'\].*allowed"):
        pm.add_adapter("x", {"method": "lora", "rank": 4})


@pytest.mark.parametrize("field,value", [("r", 0), ("r", 2.5), ("alpha", -1), ("dropout", 1.0), ("init", "svd")])
def test_bad_lora_values_name_the_field(field, value):
    with pytest.raises(pa.ConfigError, match=f"{field}="):
        pa.LoraConfig(**{field: value})


def test_pattern_matching_nothing_lists_existing_names(pm):
    before = fingerprint_of(pm)
    with pytest.raises(pa.TargetError, match=r"'q_proj' matches no module.*bert\.encoder\.layer"):
        pm.add_adapter("x", {"method": "lora", "targets": ["q_proj"]})
    assert_unchanged(pm, before)


def test_pattern_matching_wrong_kind_of_module(pm):
    with pytest.raises(pa.TargetError, match="none of a kind this method can act on.*BertLayer"):
        pm.add_adapter("x", {"method": "lora", "targets": ["re:bert\\.encoder\\.layer\\.\\d+"]})


def test_bad_regex_is_reported(pm):
    with pytest.raises(pa.ConfigError, match="not a valid regular expression"):
        pm.add_adapter("x", {"method": "lora", "targets": ["re:(unclosed"]})


def test_model_without_preset_asks_for_targets():
    model = pa.AdapterModel(make_model("mlp"))
    with pytest.raises(pa.ConfigError, match="no target preset.*pass targets"):
        model.add_adapter("x", {"method": "lora"})


def test_duplicate_and_invalid_names(pm):
    before = fingerprint_of(pm)
    with pytest.raises(pa.AdapterNameError, match="'existing' already exists"):
        pm.add_adapter("existing", {"method": "ia3"})
    with pytest.raises(pa.AdapterNameError, match="invalid"):
        pm.add_adapter("has.dot", {"method": "ia3"})
    with pytest.raises(pa.AdapterNameError, match="no adapter named 'nope'"):
        pm.set_active("nope")
    assert_unchanged(pm, before)


def test_wrong_shapes_on_load(pm, saved, tmp_path):
    meta = json.loads((saved / "polyadapter.json").read_text())
    meta["config"]["r"] = 4  # the file's tensors have rank 2
    (saved / "polyadapter.json").write_text(json.dumps(meta))
    before = fingerprint_of(pm)
    with pytest.raises(pa.ShapeMismatchError, match=r"lora_A.*shape \(2, 32\).*expects \(4, 32\)"):
        pm.load_adapter(saved, name="other")
    assert_unchanged(pm, before)


def test_truncated_safetensors(pm, saved):
    weights = saved / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = fingerprint_of(pm)
    with pytest.raises(pa.LoadError, match="adapter.safetensors: cannot read safetensors"):
        pm.load_adapter(saved, name="other")
    assert_unchanged(pm, before)


def test_nan_weights_are_refused(pm, saved):
    from safetensors.torch import load_file, save_file
    tensors = load_file(saved / "adapter.safetensors")
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, saved / "adapter.safetensors")
    with pytest.raises(pa.LoadError, match="NaN or inf"):
        pm.load_adapter(saved, name="other")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "huge"])
def test_non_finite_check_names_the_tensor_and_admits_huge_finite_values(pm, saved, value):
    """The load checks finiteness with one sum per tensor; finite values whose sum
    overflows must still load, and a bad value anywhere is found and named."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(saved / "adapter.safetensors")
    key = sorted(tensors)[-1]
    if value == "huge":  # every value finite, but their sum is inf in float32
        tensors[key].fill_(3e38)
    else:
        tensors[key][-1, -1] = float(value)
    save_file(tensors, saved / "adapter.safetensors")
    if value == "huge":
        pm.load_adapter(saved, name="other")
        assert torch.equal(pm.adapter_state_dict("other")[key], tensors[key])
    else:
        with pytest.raises(pa.LoadError, match=f"tensor {key!r} holds NaN or inf"):
            pm.load_adapter(saved, name="other")


def test_pickle_files_are_refused_with_a_hint(pm, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "adapter_model.bin")
    before = fingerprint_of(pm)
    with pytest.raises(pa.UnsafeFileError, match="never unpickles.*safetensors"):
        pm.load_adapter(folder)
    with pytest.raises(pa.UnsafeFileError, match="pickle-based"):
        pm.load_adapter(folder / "adapter_model.bin")
    assert_unchanged(pm, before)


def test_adapter_for_another_architecture(saved):
    llama = pa.AdapterModel(make_model("llama"))
    before = fingerprint_of(llama)
    with pytest.raises(pa.TargetError, match="saved"):
        llama.load_adapter(saved)
    assert_unchanged(llama, before)


def test_missing_or_non_adapter_folder(pm, tmp_path):
    with pytest.raises(pa.LoadError, match="no such file"):
        pm.load_adapter(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pa.LoadError, match="not an adapter folder"):
        pm.load_adapter(tmp_path / "empty")


def test_load_under_a_taken_name_changes_nothing(pm, saved):
    before = fingerprint_of(pm)
    with pytest.raises(pa.AdapterNameError, match="already exists"):
        pm.load_adapter(saved)
    assert_unchanged(pm, before)


def test_failed_save_leaves_existing_files(pm, saved):
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(FileExistsError, match="already exists"):
        pm.save_adapter("existing", saved)
    with pytest.raises(pa.AdapterNameError):
        pm.save_adapter("nope", saved, overwrite=True)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == files


def test_overwrite_replaces_atomically(pm, saved):
    pm.add_adapter("second", {"method": "ia3"})
    pm.save_adapter("second", saved, overwrite=True)
    assert json.loads((saved / "polyadapter.json").read_text())["config"]["method"] == "ia3"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["saved"]  # no temp folders left


def test_training_or_removing_a_merged_adapter(pm):
    pm.merge_adapter("existing")
    with pytest.raises(pa.StateError, match="merged"):
        pm.train_adapter("existing")
    with pytest.raises(pa.StateError, match="merged"):
        pm.remove_adapter("existing")
    with pytest.raises(pa.StateError, match="already merged"):
        pm.merge_adapter("existing")


def test_safe_merge_refuses_non_finite_weights(pm):
    inputs = make_inputs("bert")
    with torch.no_grad():
        pm.adapter_parameters("existing")["bert.encoder.layer.1.attention.self.value.lora_B"].fill_(float("inf"))
    before = fingerprint_of(pm)
    with pytest.raises(pa.StateError, match="non-finite.*layer.1.attention.self.value.*nothing merged"):
        pm.merge_adapter("existing", safe=True)
    assert_unchanged(pm, before)
    assert not pm.is_merged("existing")
    pm.set_active(None)
    assert torch.isfinite(output_of(pm, inputs)).all()


def test_wrapping_twice_is_refused(pm):
    with pytest.raises(pa.StateError, match="already"):
        pa.AdapterModel(pm)
    with pytest.raises(pa.StateError, match="already holds polyadapter sites"):
        pa.AdapterModel(pm.model)


def test_plan_load_tensors_refuses_a_shape_copy_would_broadcast(pm):
    plan = pm.plan_adapter("other", {"method": "lora", "r": 2})
    tensors = {k: v.clone() for k, v in plan.state_dict().items()}
    key = next(k for k in tensors if k.endswith("lora_A"))
    tensors[key] = tensors[key][:1]  # (1, in) would broadcast over (2, in)
    with pytest.raises(pa.ShapeMismatchError, match=r"lora_A.*shape \(1, 32\).*expects \(2, 32\)"):
        plan.load_tensors(tensors)
