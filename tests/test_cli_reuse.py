"""The reuse verbs of the command line: combine, compress (svd, compeft, shared basis),
merge and lorahub, on two tiny BBC adapters trained through the CLI itself."""
from __future__ import annotations

import json

import pytest
import torch
from test_cli import TINY, assert_one_line_error, run_cli

from polyadapter import AdapterModel
from polyadapter.basemodels import load_classifier
from polyadapter.data import load_dataset, split


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two LoRA runs on BBC (same base and head init, different learning rates), shared
    by the tests of this module."""
    from polyadapter.cli import main
    root = tmp_path_factory.mktemp("runs")
    for i, lr in enumerate(("0.01", "0.03")):
        code = main(["train", "--data", "bbc", "--method", "lora", "--set", "r=4", "--lr", lr,
                     "--out", str(root / f"run{i}"), *TINY])
        assert code == 0
    return root / "run0", root / "run1"


def test_combine_writes_an_adapter_with_provenance(runs, tmp_path, capsys):
    out = tmp_path / "ties"
    code, stdout, err = run_cli(capsys, "combine", *runs, "--method", "ties", "--weights", "1", "1",
                                "--density", "0.5", "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["method"] == "ties"
    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    prov = json.loads(stdout)["provenance"]
    assert prov["operation"] == "combine" and prov["method"] == "ties" and prov["weights"] == [1.0, 1.0]
    assert prov["density"] == 0.5 and len(prov["adapters"]) == 2
    code, stdout, err = run_cli(capsys, "eval", "--adapter", out, "--data", "bbc", "--json", "--quiet")
    assert code == 0, err


def test_combine_errors_are_one_line(runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "combine", *runs, "--weights", "1", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "--weights has 1 values for 2 adapters")
    code, _, err = run_cli(capsys, "combine", *runs, "--method", "ties", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "density")


@pytest.mark.parametrize("args, check", [
    (["--method", "svd", "--rank", "2"], lambda p: p["method"] == "svd" and p["storage_ratio"] > 1.5),
    (["--method", "svd", "--energy", "0.9"], lambda p: p["method"] == "svd" and p["energy"] == 0.9),
    (["--method", "compeft", "--density", "0.1"], lambda p: p["method"] == "compeft" and p["storage_ratio"] > 5),
])
def test_compress_one_adapter(runs, tmp_path, capsys, args, check):
    out = tmp_path / "c"
    code, stdout, err = run_cli(capsys, "compress", runs[0], *args, "--out", out, "--json")
    assert code == 0, err
    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    prov = json.loads(stdout)["provenance"]
    assert prov["operation"] == "compress" and check(prov)


def test_compress_shared_basis_writes_basis_and_members(runs, tmp_path, capsys):
    out = tmp_path / "lib"
    code, stdout, err = run_cli(capsys, "compress", *runs, "--method", "shared-basis", "--rank", "4",
                                "--out", out, "--json")
    assert code == 0, err
    written = json.loads(stdout)["written"]
    assert len(written) == 3 and (out / "basis" / "polyadapter.json").is_file()


def test_compress_argument_errors(runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", runs[0], "--method", "svd", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "exactly one of --rank or --energy")
    code, _, err = run_cli(capsys, "compress", *runs, "--method", "svd", "--rank", "2", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "compresses one adapter")


def test_merge_saves_a_plain_model_with_the_adapter_inside(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", runs[0], "--out", out)
    assert code == 0, err
    merged, tokenizer = load_classifier(str(out), num_labels=5)
    base, _ = load_classifier("minilm", num_labels=5)
    pm = AdapterModel(base)
    pm.load_adapter(runs[0] / "adapter")
    pm.eval()
    _, test = split(load_dataset("bbc"), test_size=4, seed=3)
    enc = tokenizer(list(test.texts), padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged.eval()(**enc).logits, pm(**enc).logits, atol=1e-4)


def test_lorahub_finds_weights_and_saves_them(runs, tmp_path, capsys):
    out = tmp_path / "hub"
    code, stdout, err = run_cli(capsys, "lorahub", *runs, "--data", "bbc", "--shots", "8", "--budget", "6",
                                "--out", out, "--json", "--quiet")
    assert code == 0, err
    result = json.loads(stdout)
    assert len(result["weights"]) == 2 and result["operation"] == "lorahub"


def test_store_refs_through_every_verb(runs, tmp_path, capsys):
    """train --out store:, add, combine store: sources --out store:, lineage, eval,
    compress and merge from the store, load in Python: the README's store workflow."""
    from polyadapter.store import Store
    store = str(tmp_path / "store")
    code, _, err = run_cli(capsys, "store", "init", store)
    assert code == 0, err
    code, _, err = run_cli(capsys, "store", "add", runs[0], "--name", "bbc-a", "--tag", "bbc", "--store", store)
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "train", "--data", "bbc", "--method", "lora", "--set", "r=4",
                                "--out", "store:bbc-b", "--store", store, *TINY)
    assert code == 0 and "store:bbc-b@1" in stdout, err
    code, stdout, err = run_cli(capsys, "combine", "store:bbc-a", "store:bbc-b@1", "--method", "ties",
                                "--density", "0.5", "--weights", "1", "1", "--out", "store:bbc-ab", "--store", store,
                                "--json")
    assert code == 0, err
    assert json.loads(stdout)["path"] == "store:bbc-ab@1"
    with Store(store) as s:
        lineage = s.lineage("bbc-ab")
        assert {p["ref"] for p in lineage["parents"]} == {"bbc-a@1", "bbc-b@1"}
        assert s.resolve("bbc-b").provenance["metrics"]["test_accuracy"] >= 0
    code, stdout, err = run_cli(capsys, "store", "show", "bbc-ab", "--store", store)
    assert code == 0 and "bbc-a@1" in stdout and "bbc-b@1" in stdout, err
    code, same, err = run_cli(capsys, "info", "store:bbc-ab", "--store", store)
    assert code == 0 and same == stdout, err
    code, _, err = run_cli(capsys, "eval", "--adapter", "store:bbc-ab", "--data", "bbc", "--store", store, "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "compress", "store:bbc-ab", "--method", "svd", "--rank", "2",
                           "--out", "store:bbc-ab-r2", "--store", store)
    assert code == 0, err
    code, _, err = run_cli(capsys, "merge", "store:bbc-ab-r2", "--out", tmp_path / "merged", "--store", store)
    assert code == 0 and (tmp_path / "merged" / "config.json").is_file(), err
    code, _, err = run_cli(capsys, "store", "rm", "bbc-a@1", "--store", store)
    assert code == 2 and "bbc-ab@1" in err  # refused: a stored adapter derives from it
    # Refusals before any work: a version in --out, a missing store, a store --out for merge.
    for argv, fragment in [
        (["combine", "store:bbc-a", "--out", "store:x@3", "--store", store], "numbers versions itself"),
        (["combine", "store:bbc-a", "--out", "store:x", "--store", str(tmp_path / "none")], "store init"),
        (["combine", "store:nope", "--out", "store:x", "--store", store], "nope"),
        (["merge", "store:bbc-a", "--out", "store:x", "--store", store], "model folder"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, fragment)
    pm = AdapterModel(load_classifier("minilm", 5, seed=0)[0])
    record = pm.load_adapter("store:bbc-ab@1", store=store)
    assert record.provenance["store"]["name"] == "bbc-ab"
    version = pm.save_adapter(record.name, "store:bbc-ab-copy", store=store)
    assert version.ref == "bbc-ab-copy@1"
