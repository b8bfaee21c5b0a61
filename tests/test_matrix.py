"""The promises every method makes, checked on every model family.

Each case is (method config, families it applies to, whether the model starts exactly
at the base, whether it merges). The same checks run for all of them, the way PEFT's
test matrix does: init equals base, merge/unmerge, save/load, training touches only
what it trains, gradient checkpointing.
"""
from __future__ import annotations

import copy

import pytest
import torch

import polyadapter as pa
from conftest import MLP_TARGETS, make_inputs, make_model, output_of

HF = ("bert", "llama", "vit", "gpt2")
TEXT = ("bert", "llama", "gpt2")
ALL = HF + ("mlp",)

# name -> (config dict, families, starts at base: "exact" | "close" | None, mergeable)
CASES = {
    "lora": ({"method": "lora", "r": 4}, ALL, "exact", True),
    "lora-rslora-gaussian": ({"method": "lora", "r": 4, "alpha": 8, "use_rslora": True, "init": "gaussian"},
                             ALL, "exact", True),
    "lora-pissa": ({"method": "lora", "r": 4, "init": "pissa"}, ALL, "close", True),
    "lora-all-linear": ({"method": "lora", "r": 2, "targets": ["all-linear"]}, HF, "exact", True),
    "ia3": ({"method": "ia3"}, ALL, "exact", True),
    "bottleneck-pfeiffer": ({"method": "bottleneck", "placement": "pfeiffer"}, ALL, "exact", False),
    "bottleneck-houlsby": ({"method": "bottleneck", "placement": "houlsby"}, HF, "exact", False),
    "bottleneck-parallel": ({"method": "bottleneck", "mode": "parallel"}, ALL, "exact", False),
    "sparse": ({"method": "sparse", "density": 0.05}, ALL, "exact", True),
    "prompt": ({"method": "prompt", "num_virtual_tokens": 3}, TEXT, None, False),
}

PARAMS = [pytest.param(case, family, id=f"{case}-{family}")
          for case, (_, families, _, _) in CASES.items() for family in families]


def config_for(case: str, family: str) -> dict:
    config = dict(CASES[case][0])
    if family == "mlp" and "targets" not in config:
        config["targets"] = ["fc2"] if config["method"] == "bottleneck" and config.get("mode") != "parallel" \
            else MLP_TARGETS
    return config


def wrapped(family: str, case: str, name: str = "a", seed: int = 0):
    base = make_model(family, seed=seed)
    pm = pa.AdapterModel(base)
    pm.add_adapter(name, config_for(case, family))
    return pm


@torch.no_grad()
def perturb(pm, name: str, seed: int = 3) -> None:
    """Move an adapter away from its initialisation, as training would."""
    g = torch.Generator().manual_seed(seed)
    for key, p in pm.adapter_parameters(name).items():
        if key.endswith("ia3_l"):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        else:
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def snapshot(pm) -> dict:
    return {k: v.detach().clone() for k, v in pm.model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case,family", PARAMS)
def test_output_equals_base_at_init(case, family):
    start = CASES[case][2]
    base = make_model(family)
    inputs = make_inputs(family)
    ref = output_of(base, inputs)
    pm = pa.AdapterModel(base)
    pm.add_adapter("a", config_for(case, family))
    out = output_of(pm, inputs)
    if start == "exact":
        assert torch.equal(out, ref)
    elif start == "close":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:  # prompt tuning changes the input by design
        assert not torch.equal(out[..., :1], ref[..., :1]) or out.shape != ref.shape
    pm.set_active(None)
    assert torch.equal(output_of(pm, inputs), ref)


@pytest.mark.parametrize("case,family", PARAMS)
def test_merge_then_unmerge(case, family):
    pm = wrapped(family, case)
    perturb(pm, "a")
    inputs = make_inputs(family)
    before = snapshot(pm)
    out = output_of(pm, inputs)
    if not CASES[case][3]:
        with pytest.raises(pa.StateError, match="'a'"):
            pm.merge_adapter("a")
        assert_same_tensors(before, snapshot(pm))
        return
    pm.merge_adapter("a", safe=True)
    assert pm.is_merged("a")
    torch.testing.assert_close(output_of(pm, inputs), out, atol=1e-4, rtol=1e-4)
    pm.unmerge_adapter("a")
    torch.testing.assert_close(output_of(pm, inputs), out, atol=1e-5, rtol=1e-5)
    for k, v in snapshot(pm).items():
        torch.testing.assert_close(v, before[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case,family", PARAMS)
def test_save_then_load_reproduces_outputs(case, family, tmp_path):
    pm = wrapped(family, case)
    perturb(pm, "a")
    inputs = make_inputs(family)
    out = output_of(pm, inputs)
    pm.save_adapter("a", tmp_path / "a")

    fresh = pa.AdapterModel(make_model(family))
    fresh.load_adapter(tmp_path / "a")
    assert fresh.adapters == ["a"] and fresh.active_adapters == ("a",)
    assert torch.equal(output_of(fresh, inputs), out)
    # Loading again under another name into the same model gives a second, equal adapter.
    fresh.load_adapter(tmp_path / "a", name="again")
    assert torch.equal(output_of(fresh, inputs), out)


@pytest.mark.parametrize("case,family", PARAMS)
def test_training_touches_only_the_trained_adapter(case, family):
    base = make_model(family)
    pm = pa.AdapterModel(base)
    pm.add_adapter("other", config_for(case, family))
    perturb(pm, "other")
    pm.add_adapter("a", config_for(case, family))
    base_before = {k: v.clone() for k, v in base.state_dict().items() if ".adapters." not in k}
    other_before = {k: v.detach().clone() for k, v in pm.adapter_state_dict("other").items()}
    a_before = {k: v.detach().clone() for k, v in pm.adapter_state_dict("a").items()}

    params = pm.train_adapter("a")
    assert {id(p) for p in params} == {id(p) for p in pm.trainable_parameters()}
    assert len(params) == len(pm.adapter_parameters("a"))
    opt = torch.optim.AdamW(params, lr=1e-2)
    inputs = make_inputs(family)
    for _ in range(3):
        loss = output_of(pm, inputs).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    assert any(not torch.equal(v, a_before[k]) for k, v in pm.adapter_state_dict("a").items())
    assert_same_tensors(other_before, {k: v.detach() for k, v in pm.adapter_state_dict("other").items()})
    assert_same_tensors(base_before, {k: v for k, v in base.state_dict().items() if ".adapters." not in k})


@pytest.mark.parametrize("case,family", [p for p in PARAMS if p.values[1] in HF])
def test_gradient_checkpointing_gives_the_same_gradients(case, family):
    def grads(checkpointing: bool):
        pm = wrapped(family, case)
        perturb(pm, "a")
        for m in pm.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        params = pm.train_adapter("a")
        if checkpointing:
            pm.gradient_checkpointing_enable()
        calls = []
        layer_sites = [m for n, m in pa.sites.sites_of(pm.model).items() if ".0." in n]
        for site in layer_sites[:1]:  # prompt tuning has no sites
            site.register_forward_pre_hook(lambda *_: calls.append(1))
        output_of(pm, make_inputs(family)).float().pow(2).mean().backward()
        # With checkpointing the layer's forward ran again during backward.
        assert len(calls) == len(layer_sites[:1]) * (2 if checkpointing else 1)
        return [p.grad.clone() for p in params]

    plain, checkpointed = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in plain[:1])
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_stack_of_two_adapters_applies_both(bert):
    pm = pa.AdapterModel(bert)
    inputs = make_inputs("bert")
    pm.add_adapter("x", {"method": "lora", "r": 2})
    pm.add_adapter("y", {"method": "ia3"})
    perturb(pm, "x")
    perturb(pm, "y", seed=4)
    pm.set_active("x")
    only_x = output_of(pm, inputs)
    pm.set_active("x", "y")
    both = output_of(pm, inputs)
    assert not torch.allclose(both, only_x)
    # Merging x into the base gives the same stacked output with y still live.
    pm.merge_adapter("x")
    torch.testing.assert_close(output_of(pm, inputs), both, atol=1e-5, rtol=1e-5)


def test_unwrap_returns_the_original_modules_bit_identical(bert):
    originals = {n: m for n, m in bert.named_modules()}
    weights = {k: v.clone() for k, v in bert.state_dict().items()}
    pm = pa.AdapterModel(bert)
    pm.add_adapter("a", {"method": "lora", "r": 2, "modules_to_save": ["classifier"]})
    pm.add_adapter("b", {"method": "ia3"})
    perturb(pm, "a")
    pm.merge_adapter("a")
    pm.unmerge_adapter("a")
    pm.merge_adapter("b")
    pm.unmerge_adapter("b")
    base = pm.unwrap()
    assert base is bert
    assert {n: m for n, m in base.named_modules()}.keys() == originals.keys()
    assert all(originals[n] is m for n, m in base.named_modules())
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)


def test_wrapping_is_idempotent_per_site(bert):
    pm = pa.AdapterModel(bert)
    pm.add_adapter("a", {"method": "lora", "r": 2})
    pm.add_adapter("b", {"method": "lora", "r": 3})
    site = pm.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(site, pa.sites.Site) and isinstance(site.base, torch.nn.Linear)
    assert sorted(site.adapters) == ["a", "b"]
    pm.remove_adapter("a")
    pm.remove_adapter("b")
    assert isinstance(pm.model.bert.encoder.layer[0].attention.self.query, torch.nn.Linear)


def test_modules_to_save_copy_is_used_only_while_active(bert):
    pm = pa.AdapterModel(bert)
    inputs = make_inputs("bert")
    ref = output_of(pm, inputs)
    pm.add_adapter("head", {"method": "lora", "r": 2, "modules_to_save": ["classifier"]})
    params = pm.adapter_parameters("head")
    assert "classifier.module.weight" in params
    with torch.no_grad():
        params["classifier.module.weight"].add_(1.0)
    assert not torch.allclose(output_of(pm, inputs), ref)
    pm.set_active(None)
    assert torch.equal(output_of(pm, inputs), ref)


def test_deep_copied_model_keeps_its_own_state(bert):
    pm = pa.AdapterModel(bert)
    pm.add_adapter("a", {"method": "lora", "r": 2})
    twin = copy.deepcopy(pm)
    twin.set_active(None)
    assert pm.active_adapters == ("a",)
    site = twin.model.bert.encoder.layer[0].attention.self.query
    assert site.state is twin.state


EMBEDDINGS = {"bert": "word_embeddings", "llama": "embed_tokens", "gpt2": "wte"}


@pytest.mark.parametrize("family", list(EMBEDDINGS))
def test_lora_on_input_embeddings(family, tmp_path):
    base = make_model(family)
    inputs = make_inputs(family)
    ref = output_of(base, inputs)
    pm = pa.AdapterModel(base)
    pm.add_adapter("emb", {"method": "lora", "r": 2, "targets": [EMBEDDINGS[family]]})
    assert pm.record("emb").sites and all(s.endswith(EMBEDDINGS[family]) for s in pm.record("emb").sites)
    assert torch.equal(output_of(pm, inputs), ref)
    perturb(pm, "emb")
    out = output_of(pm, inputs)
    assert not torch.allclose(out, ref)
    if family == "gpt2":  # wte is tied to lm_head: merging would change both
        with pytest.raises(pa.StateError, match="tied to 'lm_head'"):
            pm.merge_adapter("emb")
        assert not pm.is_merged("emb")
    else:
        pm.merge_adapter("emb")
        torch.testing.assert_close(output_of(pm, inputs), out, atol=1e-4, rtol=1e-4)
        pm.unmerge_adapter("emb")
    pm.save_adapter("emb", tmp_path / "emb")
    fresh = pa.AdapterModel(make_model(family))
    fresh.load_adapter(tmp_path / "emb")
    assert torch.equal(output_of(fresh, inputs), out)


def test_prompt_beside_a_lora_on_the_embeddings(llama):
    pm = pa.AdapterModel(llama)
    inputs = make_inputs("llama")
    pm.add_adapter("emb", {"method": "lora", "r": 2, "targets": ["embed_tokens"]})
    perturb(pm, "emb")
    pm.add_adapter("p", {"method": "prompt", "num_virtual_tokens": 2})
    pm.set_active("emb", "p")
    stacked = output_of(pm, inputs)
    assert stacked.shape[1] == inputs["input_ids"].shape[1] + 2
    pm.set_active("p")
    assert not torch.allclose(output_of(pm, inputs), stacked)


@torch.no_grad()
def test_generate_keeps_the_active_adapter_at_every_step(llama):
    pm = pa.AdapterModel(llama)
    prompt = make_inputs("llama")
    bare = pm.generate(**prompt, max_new_tokens=6, do_sample=False)
    pm.add_adapter("a", {"method": "lora", "r": 4, "targets": ["all-linear"]})
    perturb(pm, "a", seed=5)
    adapted = pm.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert not torch.equal(adapted, bare)
    pm.merge_adapter("a")  # the same model with the update in the weights decodes the same tokens
    assert torch.equal(pm.generate(**prompt, max_new_tokens=6, do_sample=False), adapted)
    pm.unmerge_adapter("a")
    pm.set_active(None)
    assert torch.equal(pm.generate(**prompt, max_new_tokens=6, do_sample=False), bare)


def test_all_linear_skips_the_output_layer_even_while_another_adapter_wraps_it():
    """The site set of 'all-linear' must not depend on what else is installed: a pool
    that plans an adapter while another one holds lm_head must find the saved sites."""
    pm = pa.AdapterModel(make_model("llama"))
    pm.add_adapter("alone", {"method": "lora", "r": 2, "targets": ["all-linear"]})
    pm.add_adapter("head", {"method": "lora", "r": 2, "targets": ["lm_head"]})
    pm.add_adapter("after", {"method": "lora", "r": 2, "targets": ["all-linear"]})
    sites = {n: pm.state.adapters[n].sites for n in ("alone", "after")}
    assert "lm_head" not in sites["alone"] and sites["after"] == sites["alone"]


def test_a_plan_filled_from_a_file_skips_random_init_in_its_own_thread_only():
    """Loads build parts with ``filled=True`` (their tensors are copied in next): no
    random init is spent on them, and an adapter added meanwhile in another thread
    still starts from its random A."""
    import threading
    from polyadapter.methods.spec import parts_filled_later
    pm = pa.AdapterModel(make_model("llama"))
    config = pa.LoraConfig(r=2, targets=["all-linear"])
    filled = pm.plan_adapter("f", config, filled=True)
    assert all(not part.lora_A.any() for part in filled.parts.values())
    fresh = {}
    with parts_filled_later():  # on in this thread while the other one plans
        worker = threading.Thread(target=lambda: fresh.update(plan=pm.plan_adapter("g", config)))
        worker.start()
        worker.join()
    assert all(part.lora_A.any() for part in fresh["plan"].parts.values())
    assert all(part.lora_A.any() for part in pm.plan_adapter("h", config).parts.values())


@pytest.mark.parametrize("case", [c for c, (_, families, _, _) in CASES.items() if "llama" in families])
def test_a_bfloat16_base_trains_every_method(case):
    base = make_model("llama").to(torch.bfloat16)
    pm = pa.AdapterModel(base)
    pm.add_adapter("a", config_for(case, "llama"))
    params = pm.train_adapter("a")
    assert {p.dtype for p in params} == {torch.bfloat16}  # parts follow the base's dtype
    out = output_of(pm, make_inputs("llama"))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
