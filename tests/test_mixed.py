"""Mixed batches: every row runs its own setup, and the result equals running each row
alone with that setup — for every method, across model families, in forward passes,
generation (greedy and beam search), KV-cache decoding and training."""
from __future__ import annotations

import functools

import pytest
import torch
from conftest import MLP_TARGETS, make_inputs, make_model
from hypothesis import given, settings
from hypothesis import strategies as st

import polyadapter as pa
from polyadapter.compose import Average, Stack
from polyadapter.kernels import torch_ops

FAMILIES = ["llama", "bert", "gpt2", "vit", "mlp"]


def _configs(kind: str) -> dict:
    all_linear = ["all-linear"]
    if kind == "mlp":
        t = MLP_TARGETS
        return {"l8": pa.LoraConfig(r=8, targets=t), "l4": pa.LoraConfig(r=4, targets=["fc2"]),
                "ia": pa.IA3Config(targets=t), "ff": pa.IA3Config(targets=t, feedforward=["fc2"]),
                "bn": pa.BottleneckConfig(targets=["fc2"], hidden_size=4),
                "bp": pa.BottleneckConfig(mode="parallel", targets=["fc1"], hidden_size=4),
                "sp": pa.SparseConfig(targets=t, density=0.1),
                "hd": pa.LoraConfig(r=2, targets=["fc1"], modules_to_save=["head"]),
                "do": pa.LoraConfig(r=3, targets=t, use_dora=True),
                "d2": pa.LoraConfig(r=3, alpha=4, targets=t, use_dora=True)}
    head = {"bert": "classifier", "vit": "classifier", "llama": "lm_head", "gpt2": "lm_head"}[kind]
    out = {"l8": pa.LoraConfig(r=8, targets=all_linear if kind != "bert" else None),
           "l4": pa.LoraConfig(r=4), "ia": pa.IA3Config(), "bn": pa.BottleneckConfig(),
           "bp": pa.BottleneckConfig(mode="parallel"), "sp": pa.SparseConfig(density=0.05),
           "hd": pa.LoraConfig(r=2, modules_to_save=[head]),
           "do": pa.LoraConfig(r=3, use_dora=True), "d2": pa.LoraConfig(r=3, alpha=4, use_dora=True)}
    if kind in ("llama", "bert", "gpt2"):
        out["pr"] = pa.PromptConfig(num_virtual_tokens=3, seed=0)
        out["p5"] = pa.PromptConfig(num_virtual_tokens=5, seed=1)
    return out


@functools.lru_cache(maxsize=None)
def zoo(kind: str) -> pa.AdapterModel:
    """A tiny model of ``kind`` carrying one adapter of every method, all with random
    (non-zero) updates so every adapter changes the output."""
    pm = pa.AdapterModel(make_model(kind))
    g = torch.Generator().manual_seed(7)
    for name, cfg in _configs(kind).items():
        pm.add_adapter(name, cfg, activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def full_inputs(kind: str, batch: int) -> dict:
    inputs = make_inputs(kind, batch=batch)
    if "attention_mask" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    return inputs


def assert_rows_match_alone(pm, kind, setups, inputs=None, atol=1e-5):
    inputs = inputs or full_inputs(kind, len(setups))
    with torch.no_grad():
        mixed = _logits(pm(**inputs, adapter_names=list(setups)))
        for i, setup in enumerate(setups):
            pm.set_active(setup)
            alone = _logits(pm(**{k: v[i:i + 1] for k, v in inputs.items()}))
            row = mixed[i:i + 1]
            if alone.dim() == 3 and row.shape[1] != alone.shape[1]:  # prompts of other rows widen the batch
                t = min(row.shape[1], alone.shape[1])
                row, alone = row[:, -t:], alone[:, -t:]
            assert torch.allclose(row, alone, atol=atol), (kind, i, setup, (row - alone).abs().max().item())
    pm.set_active(None)


def _setup_choices(kind: str) -> list:
    names = list(_configs(kind))
    choices = [None] + names + [Stack("l4", "bn"), Stack("ia", "l8"), Average("l8", "ia", weights=[0.3, 0.7]),
                                Stack("do", "bn"), Stack("ia", "d2")]
    if "pr" in names:
        choices += [Stack("pr", "l8"), Stack("p5", "pr")]
    return choices


@pytest.mark.parametrize("kind", FAMILIES)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_mixed_batch_equals_each_row_alone(kind, data):
    choices = _setup_choices(kind)
    setups = data.draw(st.lists(st.sampled_from(choices), min_size=1, max_size=6), label="row setups")
    assert_rows_match_alone(zoo(kind), kind, setups)


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_setup_in_one_batch(kind):
    assert_rows_match_alone(zoo(kind), kind, _setup_choices(kind))


def test_different_ranks_get_their_own_banks_without_padding():
    pm = zoo("llama")
    site = pm.model.model.layers[0].self_attn.q_proj
    layout = site.layout()
    lora = {n: b for b in layout.buckets for n in b.names if n in ("l4", "l8")}
    assert lora["l4"] is not lora["l8"]
    assert tuple(lora["l4"].get(site)["A"].shape) == (len(lora["l4"].names), 4, 32)
    assert tuple(lora["l8"].get(site)["A"].shape) == (len(lora["l8"].names), 8, 32)


def test_lora_rows_run_one_batched_call_per_site_whatever_the_adapter_count(monkeypatch):
    """No Python loop over adapters: the number of LoRA kernel calls is the number of
    sites, for 2 distinct adapters as for 12."""
    base = make_model("llama")
    pm = pa.AdapterModel(base)
    for i in range(12):
        pm.add_adapter(f"a{i}", pa.LoraConfig(r=4, targets=["all-linear"]), activate=False)
    n_sites = len(pm.record("a0").sites)
    calls = []
    real = torch_ops.lora_delta
    monkeypatch.setattr(torch_ops, "lora_delta", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = full_inputs("llama", 12)
    for distinct in (2, 12):
        calls.clear()
        with torch.no_grad():
            pm(**inputs, adapter_names=[f"a{i % distinct}" for i in range(12)])
        assert len(calls) == n_sites


def test_cached_banks_follow_in_place_weight_changes():
    pm = pa.AdapterModel(make_model("llama"))
    pm.add_adapter("a", pa.LoraConfig(r=4), activate=False)
    pm.add_adapter("b", pa.LoraConfig(r=4), activate=False)
    inputs = full_inputs("llama", 2)
    with torch.no_grad():
        before = _logits(pm(**inputs, adapter_names=["a", "b"]))
        for p in pm.adapter_parameters("b").values():
            p.add_(0.3)
    assert_rows_match_alone(pm, "llama", ["a", "b"], inputs)
    with torch.no_grad():
        after = _logits(pm(**inputs, adapter_names=["a", "b"]))
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_removing_and_adding_adapters_between_mixed_calls():
    pm = pa.AdapterModel(make_model("gpt2"))
    for n in ("a", "b", "c"):
        pm.add_adapter(n, pa.LoraConfig(r=4), activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(n).values():
                p.add_(0.1 * torch.randn_like(p))
    assert_rows_match_alone(pm, "gpt2", ["a", "b", "c"])
    pm.remove_adapter("b")
    pm.add_adapter("d", pa.LoraConfig(r=8), activate=False)
    assert_rows_match_alone(pm, "gpt2", ["c", "a", "d", None])


def test_bfloat16_base_mixed_batch():
    base = make_model("llama").to(torch.bfloat16)
    pm = pa.AdapterModel(base)
    for n, r in (("a", 4), ("b", 8)):
        pm.add_adapter(n, pa.LoraConfig(r=r, targets=["all-linear"]), activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(n).values():
                p.add_(0.1 * torch.randn_like(p))
    assert_rows_match_alone(pm, "llama", ["a", "b", None, "a"], atol=0.05)


# ---------------------------------------------------------------------- generation
def _decoder_with_adapters():
    pm = pa.AdapterModel(make_model("llama"))
    g = torch.Generator().manual_seed(3)
    for name, cfg in {"a": pa.LoraConfig(r=4, targets=["all-linear"]), "b": pa.LoraConfig(r=8),
                      "c": pa.IA3Config(), "n": pa.BottleneckConfig(),
                      "p": pa.PromptConfig(num_virtual_tokens=2, seed=3)}.items():
        pm.add_adapter(name, cfg, activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return pm


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_keeps_each_rows_adapter_across_steps(beams):
    pm = _decoder_with_adapters()
    setups = ["a", "b", None, "c", "n", Stack("a", "n")]
    ids = torch.randint(2, 100, (len(setups), 5), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad():
        mixed = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=setups, **kw)
        for i, s in enumerate(setups):
            pm.set_active(s)
            alone = pm.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw)
            assert torch.equal(mixed[i:i + 1, :alone.shape[1]], alone), (i, s)
    # the adapters really differ: not every row generated the same continuation as the base
    assert len({tuple(r.tolist()) for r in mixed[:, 5:]}) > 1


def test_generate_with_different_prompts_per_row():
    pm = _decoder_with_adapters()
    setups = ["p", None, Stack("p", "a")]
    ids = torch.randint(2, 100, (3, 4), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = pm.generate(input_ids=ids, adapter_names=setups, **kw)
        for i, s in enumerate(setups):
            pm.set_active(s)
            alone = pm.generate(input_ids=ids[i:i + 1], **kw)
            # with prompts, generation starts from embeddings and returns only the new tokens
            assert torch.equal(mixed[i:i + 1, -5:], alone[:, -5:]), (i, s)


def test_kv_cache_decoding_step_matches_rows_alone():
    pm = _decoder_with_adapters()
    setups = ["a", "b", "c", None]
    ids = torch.randint(2, 100, (4, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = pm(input_ids=ids[:, :5], use_cache=True, adapter_names=setups)
        step = pm(input_ids=ids[:, 5:], cache=first.cache, use_cache=True,
                  adapter_names=setups).logits
        for i, s in enumerate(setups):
            pm.set_active(s)
            alone = pm(input_ids=ids[i:i + 1]).logits[:, -1:]
            assert torch.allclose(step[i:i + 1], alone, atol=1e-5), (i, s)


# ---------------------------------------------------------------------- training
def test_mixed_batch_gradients_equal_the_sum_of_rows_alone():
    pm = pa.AdapterModel(make_model("bert"))
    for n, cfg in {"a": pa.LoraConfig(r=4), "b": pa.LoraConfig(r=8), "c": pa.BottleneckConfig(),
                   "d": pa.IA3Config()}.items():
        pm.add_adapter(n, cfg, activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(n).values():
                p.add_(0.1 * torch.randn_like(p))
    params = {n: pm.adapter_parameters(n) for n in pm.adapters}
    for ps in params.values():
        for p in ps.values():
            p.requires_grad_(True)
    setups = ["a", "b", "c", "d", "a", None]
    inputs = full_inputs("bert", len(setups))
    pm(**inputs, adapter_names=setups).logits.pow(2).sum().backward()
    mixed = {n: {k: p.grad.clone() for k, p in ps.items()} for n, ps in params.items()}
    pm.zero_grad(set_to_none=False)
    for i, s in enumerate(setups):
        if s is not None:  # the bare base row trains nothing
            pm.set_active(s)
            pm(**{k: v[i:i + 1] for k, v in inputs.items()}).logits.pow(2).sum().backward()
    for n, ps in params.items():
        for k, p in ps.items():
            assert torch.allclose(mixed[n][k], p.grad, atol=1e-5), (n, k)
        assert any(g.abs().sum() > 0 for g in mixed[n].values()), n


def test_mixed_batch_with_gradient_checkpointing():
    pm = pa.AdapterModel(make_model("llama"))
    pm.add_adapter("a", pa.LoraConfig(r=4), activate=False)
    pm.add_adapter("b", pa.LoraConfig(r=4), activate=False)
    params = [p for n in ("a", "b") for p in pm.adapter_parameters(n).values()]
    for p in params:
        p.requires_grad_(True)
    inputs = full_inputs("llama", 4)
    setups = ["a", "b", "b", None]

    def grads():
        for p in params:
            p.grad = None
        pm.train()
        pm(**inputs, labels=inputs["input_ids"], adapter_names=setups).loss.backward()
        return [p.grad.clone() for p in params]

    plain = grads()
    pm.gradient_checkpointing_enable()
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


# ---------------------------------------------------------------------- errors
def test_bad_row_setups_are_refused_clearly():
    pm = zoo("llama")
    inputs = full_inputs("llama", 2)
    with pytest.raises(pa.ConfigError, match="2 rows"):
        pm(**inputs, adapter_names=["l8"])
    with pytest.raises(pa.AdapterNameError, match="nope"):
        pm(**inputs, adapter_names=["l8", "nope"])
    with pytest.raises(pa.ConfigError, match="Parallel.*one row's setup"):
        pm(**inputs, adapter_names=["l8", pa.Parallel("l8", "l4")])
    with pytest.raises(pa.ConfigError, match="one setup per row"):
        pm(**inputs, adapter_names="l8")


def test_mixed_batch_refused_while_an_adapter_is_merged():
    pm = pa.AdapterModel(make_model("llama"))
    pm.add_adapter("a", pa.LoraConfig(r=4), activate=False)
    pm.add_adapter("b", pa.LoraConfig(r=4), activate=False)
    pm.merge_adapter("a")
    with pytest.raises(pa.StateError, match="'a' is merged"):
        pm(**full_inputs("llama", 2), adapter_names=["a", "b"])


def _lean_calls(monkeypatch) -> list:
    """Record, for every site call of a mixed batch, whether the short way ran it."""
    from polyadapter import mixed, sites
    taken, real = [], mixed.lean_rows

    def spy(*a):
        y = real(*a)
        taken.append(y is not None)
        return y
    monkeypatch.setattr(sites, "lean_rows", spy)
    return taken


def test_short_way_through_a_site_equals_the_general_path(monkeypatch):
    """Inference rows of plain adapter names whose adapters at a site only add a
    LoRA update take ``mixed.lean_rows`` (the serving engine's steps): its logits equal
    the general path's bit for bit, one-token rows (the in-place kernels) and long rows
    alike; it steps aside at sites with an (IA)^3 adapter or a Stack's second level,
    for an Average and while gradients flow."""
    from polyadapter import sites
    pm = zoo("llama")
    ids = torch.randint(0, 100, (6, 1), generator=torch.Generator().manual_seed(3))
    cases = {("l8", "l4", None, "l8", "l8", "l4"): "all", ("l8", "ia", "l8", None, "ia", "l8"): "some",
             (Stack("l4", "l8"), "l8", None, "l4", "l8", "l8"): "some",  # not where the Stack has two levels
             (Average("l8", "l4", weights=[0.5, 0.5]), "l8", "l8", "l4", None, "l8"): "none"}
    for setups, expect in cases.items():
        for inputs in ({"input_ids": ids}, full_inputs("llama", 6)):
            taken = _lean_calls(monkeypatch)
            with torch.no_grad():
                lean = _logits(pm(**inputs, adapter_names=list(setups)))
            monkeypatch.setattr(sites, "lean_rows", lambda *a: None)
            with torch.no_grad():
                general = _logits(pm(**inputs, adapter_names=list(setups)))
            assert torch.equal(lean, general), setups
            assert {"all": all(taken), "some": any(taken) and not all(taken), "none": not any(taken)}[expect], \
                (setups, taken)
    fresh = pa.AdapterModel(make_model("llama"))
    fresh.add_adapter("a", pa.LoraConfig(r=4, targets=["all-linear"]), activate=False)
    for p in fresh.adapter_parameters("a").values():
        p.requires_grad_(True)
    taken = _lean_calls(monkeypatch)
    fresh(input_ids=ids, adapter_names=["a", None, "a", "a", "a", None]).logits.sum().backward()
    assert taken and not any(taken)


def test_short_way_keeps_the_base_layers_hooks(monkeypatch):
    """The short way calls a plain ``nn.Linear`` base directly, but not one with a
    forward hook: the hook still runs and its change shows in the output."""
    pm = pa.AdapterModel(make_model("llama"))
    pm.add_adapter("a", pa.LoraConfig(r=4, targets=["all-linear"]), activate=False)
    ids = torch.randint(0, 100, (4, 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = pm(input_ids=ids, adapter_names=["a", None, "a", "a"]).logits
    base = pm.model.model.layers[0].self_attn.o_proj.base
    seen = []
    handle = base.register_forward_hook(lambda m, args, out: seen.append(1) or out * 2)
    taken = _lean_calls(monkeypatch)
    try:
        with torch.no_grad():
            hooked = pm(input_ids=ids, adapter_names=["a", None, "a", "a"]).logits
    finally:
        handle.remove()
    assert seen == [1] and all(taken) and not torch.allclose(before, hooked)


def test_mixed_batch_in_eval_mode_applies_no_dropout():
    """A site wrapped in an eval-mode model is in eval mode too: a mixed batch of LoRAs
    with dropout gives the same logits every time, equal to each row alone (a site
    left in train mode applied dropout to every mixed batch)."""
    model = make_model("llama")
    model.eval()
    pm = pa.AdapterModel(model)
    for name in ("a", "b"):
        pm.add_adapter(name, pa.LoraConfig(r=4, targets=["all-linear"], dropout=0.5), activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(name).values():
                p.add_(0.3 * torch.randn_like(p))
    assert not any(m.training for m in pm.model.modules())
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        first = pm(input_ids=ids, adapter_names=["a", "b", None]).logits
        again = pm(input_ids=ids, adapter_names=["a", "b", None]).logits
    assert torch.equal(first, again)
    assert_rows_match_alone(pm, "llama", ["a", "b", None], {"input_ids": ids})


def test_consecutive_rows_of_a_bank_run_on_views(monkeypatch):
    """Rows of one bank that sit next to each other (the serving engine orders a step's
    rows so) are read and updated through views: no gather, no scatter back, and the
    same logits bit for bit as the gathered rows, which equal each row alone."""
    from polyadapter import mixed
    pm = zoo("llama")
    setups = [None, "l8", "l8", "l8", "l4", "l4"]
    real_steps = mixed._make_steps
    for inputs in ({"input_ids": torch.randint(0, 100, (6, 1), generator=torch.Generator().manual_seed(8))},
                   full_inputs("llama", 6)):
        scatters = []
        real_copy = torch.Tensor.index_copy_
        monkeypatch.setattr(torch.Tensor, "index_copy_", lambda t, *a: scatters.append(1) or real_copy(t, *a))
        with torch.no_grad():
            views = _logits(pm(**inputs, adapter_names=setups))
        assert not scatters
        monkeypatch.setattr(mixed, "_make_steps",
                            lambda *a: [mixed.Step(s.role, s.ref, s.rows, s.slots) for s in real_steps(*a)])
        with torch.no_grad():
            gathered = _logits(pm(**inputs, adapter_names=setups))
        assert scatters and torch.equal(views, gathered)
        monkeypatch.setattr(mixed, "_make_steps", real_steps)
        monkeypatch.setattr(torch.Tensor, "index_copy_", real_copy)
        assert_rows_match_alone(pm, "llama", setups, inputs)
