"""LoraHub (polyadapter.ops.lorahub): a gradient-free search for composition weights finds a
planted combination, repeats with its seed, evaluates candidates in one scratch adapter that
never outlives the call, saves with its provenance, and refuses bad inputs without changes."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import make_model
from polyadapter import AdapterModel, AdapterNameError, ConfigError, IA3Config, LoraConfig
from polyadapter.ops.factors import install_lora
from polyadapter.ops.lorahub import lorahub, lorahub_factors, lorahub_stacks

TARGETS = ["dense"]  # attention output, intermediate, output and pooler Linear layers of tiny BERT


def base_model(seed: int = 0):
    net = make_model("bert", seed=seed)
    with torch.no_grad():  # a head with logits of size ~1, so the LoRAs move predictions
        net.classifier.weight.copy_(torch.randn(net.classifier.weight.shape,
                                                generator=torch.Generator().manual_seed(seed)))
    return net


def randomize(pm, name: str, g: torch.Generator) -> None:
    with torch.no_grad():
        for s in pm.record(name).sites:
            part = pm.parts(name)[s]
            part.lora_A.copy_(torch.randn(part.lora_A.shape, generator=g) / part.lora_A.shape[1] ** 0.5)
            part.lora_B.copy_(torch.randn(part.lora_B.shape, generator=g))


def build(configs: dict | None = None, seed: int = 0) -> AdapterModel:
    """Tiny BERT classifier with three random LoRAs a, b, c (rank 4 at the dense layers)."""
    pm = AdapterModel(base_model())
    configs = configs or {n: LoraConfig(r=4, alpha=4, targets=TARGETS) for n in "abc"}
    g = torch.Generator().manual_seed(seed)
    for n, config in configs.items():
        pm.add_adapter(n, config, activate=False)
        randomize(pm, n, g)
    return pm


def batches(n: int = 4, rows: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(100 + seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (rows, 7), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def label_with(pm, setup, examples) -> list[dict]:
    """The examples labelled by the model under ``setup``: a task that setup solves."""
    pm.set_active(setup)
    with torch.no_grad():
        out = [{**b, "labels": pm(**b).logits.argmax(-1)} for b in examples]
    pm.set_active()
    return out


def mean_loss(pm, setup, examples) -> float:
    previous = pm.state.setup
    pm.set_active(setup) if setup is not None else pm.set_active()
    with torch.no_grad():
        value = sum(pm(**b).loss.item() for b in examples) / len(examples)
    pm.set_active(previous) if previous is not None else pm.set_active()
    return value


def loss_at(pm, weights, examples, modules_from=None) -> float:
    """Plain loss of the composition of a, b, c with ``weights`` (installed, measured, removed)."""
    factors = lorahub_factors(lorahub_stacks(pm, ["a", "b", "c"]), weights)
    install_lora(pm, "probe", factors, modules_from=modules_from)
    try:
        return mean_loss(pm, "probe", examples)
    finally:
        pm.remove_adapter("probe")


def no_optimizer_threads() -> bool:
    """No nevergrad background (recast optimizer) thread is left running."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if not any(type(t).__name__ == "_MessagingThread" and t.is_alive() for t in threading.enumerate()):
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------- the search
def test_finds_the_planted_combination():
    pm = build()
    examples = label_with(pm, "a", batches())  # the best combination is [1, 0, 0]
    base = mean_loss(pm, None, examples)
    zero = loss_at(pm, [0, 0, 0], examples)
    known = loss_at(pm, [1, 0, 0], examples)
    assert zero == pytest.approx(base, abs=1e-6)  # w = 0 is the base model
    assert known < 0.4 * base

    record = lorahub(pm, "hub", ["a", "b", "c"], examples, budget=30, progress=False)
    prov = record.provenance
    found = prov["loss"]["loss"]
    assert found < 0.4 * base and found < 0.4 * zero
    assert found <= known + 0.05  # as good as the planted weights (up to the L1 term's pull)
    w = prov["weights"]
    assert abs(abs(w[0]) - 1) < 0.3 and abs(w[1]) < 0.2 and abs(w[2]) < 0.2  # (-w gives the same B A)
    assert prov["loss"]["objective"] == pytest.approx(found + 0.05 * sum(abs(v) for v in w))
    assert mean_loss(pm, "hub", examples) == pytest.approx(found, abs=1e-5)  # the installed result
    # provenance: everything needed to repeat the search
    assert prov["operation"] == "lorahub" and prov["adapters"] == ["a", "b", "c"]
    assert (prov["budget"], prov["optimizer"], prov["seed"], prov["regularization"]) == (30, "NGOpt", 0, 0.05)
    assert len(prov["history"]) == 30 and min(prov["history"]) == prov["loss"]["objective"]
    assert prov["history"][0] == pytest.approx(base)  # the search starts at w = 0
    # the result is an ordinary LoRA at the sources' sites, scaling 1, not activated
    assert pm.adapters == ["a", "b", "c", "hub"] and pm.active_adapters == ()
    assert record.sites == pm.record("a").sites and record.config.r == 4
    assert all(part.scaling == 1 for s, part in pm.parts("hub").items())


def test_same_seed_same_weights_and_the_seed_matters():
    pm = build()
    examples = label_with(pm, "b", batches(n=2))
    runs = {}
    for key, (optimizer, seed) in {"ng0": ("NGOpt", 0), "ng0'": ("NGOpt", 0), "op0": ("OnePlusOne", 0),
                                   "op0'": ("OnePlusOne", 0), "op1": ("OnePlusOne", 1)}.items():
        name = "r" + str(len(runs))
        runs[key] = lorahub(pm, name, ["a", "b", "c"], examples, budget=12, seed=seed, optimizer=optimizer,
                            progress=False).provenance
    for a, b in (("ng0", "ng0'"), ("op0", "op0'")):
        assert runs[a]["weights"] == runs[b]["weights"] and runs[a]["history"] == runs[b]["history"]
    assert runs["op0"]["history"] != runs["op1"]["history"]  # the seed reaches the optimizer
    assert runs["op1"]["seed"] == 1 and runs["op1"]["optimizer"] == "OnePlusOne"


def test_one_hot_weights_give_each_source_exactly_whatever_its_scaling_or_pissa():
    configs = {"p": LoraConfig(r=2, alpha=3, targets=TARGETS, init="pissa"),  # read as rank 4
               "q": LoraConfig(r=4, alpha=8, targets=TARGETS)}              # scaling 2
    pm = build(configs)
    ids = batches(n=1)[0]
    stacks = lorahub_stacks(pm, ["p", "q"])
    for name, w in (("p", [1.0, 0.0]), ("q", [0.0, 1.0])):
        install_lora(pm, "one", lorahub_factors(stacks, w))
        outs = []
        for setup in (name, "one"):
            pm.set_active(setup)
            with torch.no_grad():
                outs.append(pm(**ids).logits)
        torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
        pm.remove_adapter("one")
    # and the search itself runs on such sources
    pm.set_active()
    record = lorahub(pm, "hub", ["p", "q"], label_with(pm, "q", [ids]), budget=6, progress=False)
    assert record.config.r == 4


def test_modules_from_head_is_used_in_the_search_and_copied():
    configs = {n: LoraConfig(r=4, alpha=4, targets=TARGETS, modules_to_save=["classifier"]) for n in "abc"}
    pm = build(configs)
    with torch.no_grad():  # every source has its own head
        for i, n in enumerate("abc"):
            pm.parts(n)["classifier"].module.weight.normal_(0, 1, generator=torch.Generator().manual_seed(i))
    examples = label_with(pm, "a", batches())
    zero = loss_at(pm, [0, 0, 0], examples, modules_from="a")  # a's head, no LoRA
    base = mean_loss(pm, None, examples)
    record = lorahub(pm, "hub", ["a", "b", "c"], examples, budget=30, modules_from="a", progress=False)
    prov = record.provenance
    assert prov["history"][0] == pytest.approx(zero)  # candidates ran with a's head
    assert prov["loss"]["loss"] < 0.5 * min(zero, base)
    assert record.saved_modules == ["classifier"] and prov["modules_from"] == "a"
    for k, v in pm.parts("a")["classifier"].state_dict().items():
        torch.testing.assert_close(pm.parts("hub")["classifier"].state_dict()[k], v)


def test_sources_with_heads_but_no_modules_from_warn():
    configs = {n: LoraConfig(r=4, alpha=4, targets=TARGETS, modules_to_save=["classifier"]) for n in "ab"}
    pm = build(configs)
    with pytest.warns(UserWarning, match="modules_from is None"):
        lorahub(pm, "hub", ["a", "b"], label_with(pm, "a", batches(n=1)), budget=3, progress=False)


def test_custom_loss_fn_progress_bar_and_activate(capsys):
    pm = build()
    examples = batches(n=2)
    pm.set_active("a")
    with torch.no_grad():  # distil source a's logits: the planted combination reaches loss 0
        targets = [(b["input_ids"], pm(**b).logits) for b in examples]
    pm.set_active()
    calls = []

    def distill(output, batch):
        calls.append(1)
        target = next(t for ids, t in targets if torch.equal(ids, batch["input_ids"]))
        return ((output.logits - target) ** 2).mean()

    record = lorahub(pm, "hub", ["a", "b", "c"], examples, budget=25, regularization=0.01, loss_fn=distill,
                     progress=True, activate=True)
    assert len(calls) == 25 * 2  # every candidate on every example
    prov = record.provenance
    assert prov["loss"]["loss"] < 0.02 * prov["history"][0]
    assert pm.active_adapters == ("hub",)
    assert "lorahub hub" in capsys.readouterr().err


def test_candidates_share_one_scratch_adapter(monkeypatch):
    pm = build()
    planned = []
    original = pm.plan_adapter

    def counting(name, config):
        planned.append(name)
        return original(name, config)

    examples = label_with(pm, "a", batches(n=1))
    monkeypatch.setattr(pm, "plan_adapter", counting)
    pm.set_active("b")
    pm.train()
    lorahub(pm, "hub", ["a", "b", "c"], examples, budget=10, progress=False)
    assert len(planned) == 2 and planned[-1] == "hub"  # the scratch once, then the result
    assert pm.adapters == ["a", "b", "c", "hub"]
    assert pm.active_adapters == ("b",) and pm.training  # setup and mode restored


# ---------------------------------------------------------------- cleanup and refusals
def test_error_in_loss_fn_removes_the_scratch_adapter():
    pm = build()
    pm.set_active("c")
    calls = []

    def failing(output, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("loss exploded")
        return output.logits.pow(2).mean()

    with pytest.raises(RuntimeError, match="loss exploded"):
        lorahub(pm, "hub", ["a", "b", "c"], batches(n=1), loss_fn=failing, budget=10, progress=False)
    assert pm.adapters == ["a", "b", "c"] and pm.active_adapters == ("c",)
    assert not pm.training
    assert no_optimizer_threads()
    # the model still works, and a search can run afterwards
    lorahub(pm, "hub", ["a", "b"], label_with(pm, "a", batches(n=1)), budget=4, progress=False)
    assert pm.adapters == ["a", "b", "c", "hub"]


def test_examples_without_labels_refused_during_the_search():
    pm = build()
    with pytest.raises(ConfigError, match="no .loss"):
        lorahub(pm, "hub", ["a", "b"], batches(n=1), budget=5, progress=False)
    assert pm.adapters == ["a", "b", "c"]
    assert no_optimizer_threads()


def test_result_saves_and_loads_with_its_provenance(tmp_path):
    pm = build()
    examples = label_with(pm, "a", batches(n=2))
    record = lorahub(pm, "hub", ["a", "b", "c"], examples, budget=10, progress=False)
    pm.save_adapter("hub", tmp_path / "hub")
    fresh = AdapterModel(base_model())
    loaded = fresh.load_adapter(tmp_path / "hub", name="hub")
    assert loaded.provenance == record.provenance
    pm.set_active("hub")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**examples[0]).logits, pm(**examples[0]).logits)


def _bad_cases():
    ok = {"name": "hub", "adapters": ["a", "b", "c"], "budget": 5}
    return {
        "ranks differ": ({**ok, "adapters": ["a", "r2"]}, ConfigError, r"same rank.*'r2' has rank 2"),
        "sites differ": ({**ok, "adapters": ["a", "qv"]}, ConfigError, r"same sites; adapter 'qv'"),
        "non-LoRA source": ({**ok, "adapters": ["a", "ia3"]}, ConfigError, r"'ia3' is a ia3 adapter"),
        "unknown source": ({**ok, "adapters": ["a", "zz"]}, ConfigError, r"no adapter named 'zz'"),
        "no sources": ({**ok, "adapters": []}, ConfigError, r"at least one"),
        "duplicate source": ({**ok, "adapters": ["a", "a"]}, ConfigError, r"more than once"),
        "empty examples": ({**ok, "examples": []}, ConfigError, r"examples is empty"),
        "one dict as examples": ({**ok, "examples": "one"}, ConfigError, r"wrap it in a list"),
        "unknown optimizer": ({**ok, "optimizer": "NGOptt"}, ConfigError, r"unknown nevergrad optimizer.*'NGOpt'"),
        "name taken": ({**ok, "name": "a"}, AdapterNameError, r"already exists"),
        "bad name": ({**ok, "name": "a.b"}, AdapterNameError, r"invalid"),
        "zero budget": ({**ok, "budget": 0}, ConfigError, r"budget"),
        "bounds without 0": ({**ok, "bounds": (0.5, 1.5)}, ConfigError, r"low <= 0 <= high"),
        "negative regularization": ({**ok, "regularization": -1}, ConfigError, r"regularization"),
        "unknown modules_from": ({**ok, "modules_from": "zz"}, ConfigError, r"modules_from='zz'"),
        "loss_fn not callable": ({**ok, "loss_fn": 3}, ConfigError, r"loss_fn"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs_refused_and_model_unchanged(case):
    kwargs, error, match = _bad_cases()[case]
    pm = build()
    pm.add_adapter("r2", LoraConfig(r=2, targets=TARGETS), activate=False)
    pm.add_adapter("qv", LoraConfig(r=4, targets=["query", "value"]), activate=False)
    pm.add_adapter("ia3", IA3Config(), activate=False)
    pm.set_active("a")
    before = (pm.adapters, pm.active_adapters)
    examples = label_with(pm, "a", batches(n=1))
    pm.set_active("a")
    if kwargs.get("examples") == "one":
        kwargs = {**kwargs, "examples": examples[0]}
    kwargs = {"examples": examples, **kwargs, "progress": False}
    with pytest.raises(error, match=match):
        lorahub(pm, kwargs.pop("name"), kwargs.pop("adapters"), kwargs.pop("examples"), **kwargs)
    assert (pm.adapters, pm.active_adapters) == before
