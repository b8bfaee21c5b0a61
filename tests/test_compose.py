"""Composition blocks: Stack, Parallel, Fuse (AdapterFusion), Average, BatchSplit —
their algebra, their use inside mixed batches, and the nestings they refuse."""
from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model
from test_mixed import assert_rows_match_alone, full_inputs

import polyadapter as pa
from polyadapter import Average, BatchSplit, Fuse, Parallel, Stack


def _model(kind="bert", methods=("lora", "lora", "bottleneck")):
    pm = pa.AdapterModel(make_model(kind))
    g = torch.Generator().manual_seed(5)
    make = {"lora": lambda: pa.LoraConfig(r=4), "bottleneck": lambda: pa.BottleneckConfig(),
            "ia3": lambda: pa.IA3Config(), "prompt": lambda: pa.PromptConfig(num_virtual_tokens=2, seed=0)}
    for name, method in zip("abcdefg", methods):
        pm.add_adapter(name, make[method](), activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def run(pm, setup, inputs):
    pm.set_active(setup)
    with torch.no_grad():
        out = pm(**inputs)
    return out if isinstance(out, tuple) else out.logits


def test_stack_of_one_is_the_adapter_and_stack_equals_set_active_list():
    pm = _model()
    x = full_inputs("bert", 3)
    assert torch.equal(run(pm, Stack("a"), x), run(pm, "a", x))
    pm.set_active("a", "c")
    assert pm.state.setup == Stack("a", "c")
    assert torch.equal(run(pm, Stack("a", "c"), x), run(pm, ["a", "c"], x))
    pm = _model(methods=("lora", "bottleneck", "bottleneck"))  # b and c share their sites
    assert not torch.allclose(run(pm, Stack("b", "c"), x), run(pm, Stack("c", "b"), x))


def test_average_weights_one_zero_is_the_first_adapter():
    pm = _model(methods=("lora", "bottleneck", "ia3"))
    x = full_inputs("bert", 3)
    for first, second in (("a", "b"), ("b", "c"), ("c", "a")):
        got = run(pm, Average(first, second, weights=[1.0, 0.0]), x)
        assert torch.allclose(got, run(pm, first, x), atol=1e-6)


def test_average_of_loras_is_base_plus_weighted_updates_at_every_site():
    pm = _model(kind="mlp", methods=())
    pm.add_adapter("a", pa.LoraConfig(r=4, targets=["fc2"]), activate=False)
    pm.add_adapter("b", pa.LoraConfig(r=2, targets=["fc2"]), activate=False)
    with torch.no_grad():
        for n in ("a", "b"):
            for p in pm.adapter_parameters(n).values():
                p.normal_()
    site = pm.model.fc2
    h = torch.randn(4, 32)
    pm.set_active(Average("a", "b", weights=[0.25, 0.75]))
    with torch.no_grad():
        want = site.base(h) + 0.25 * site.adapters["a"].delta(h) + 0.75 * site.adapters["b"].delta(h)
        assert torch.allclose(site(h), want, atol=1e-5)


def test_parallel_gives_one_output_per_child_each_equal_to_that_child_alone():
    pm = _model(kind="llama")
    x = full_inputs("llama", 3)
    outs = run(pm, Parallel("a", Stack("b", "c"), "c"), x)
    assert isinstance(outs, tuple) and len(outs) == 3
    for out, child in zip(outs, ["a", Stack("b", "c"), "c"]):
        assert out.logits.shape[0] == 3
        assert torch.allclose(out.logits, run(pm, child, x), atol=1e-5)


def test_parallel_generate_returns_one_set_of_sequences_per_child():
    pm = _model(kind="llama")
    ids = torch.randint(2, 100, (2, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    pm.set_active(Parallel("a", "b"))
    with torch.no_grad():
        seqs = pm.generate(input_ids=ids, **kw)
        assert len(seqs) == 2
        for s, child in zip(seqs, ["a", "b"]):
            pm.set_active(child)
            assert torch.equal(s, pm.generate(input_ids=ids, **kw))


def test_batch_split_equals_the_same_rows_named_one_by_one():
    pm = _model()
    x = full_inputs("bert", 5)
    split = run(pm, BatchSplit("a", Stack("b", "c"), batch_sizes=[2, 3]), x)
    with torch.no_grad():
        named = pm(**x, adapter_names=["a", "a", Stack("b", "c"), Stack("b", "c"), Stack("b", "c")]).logits
    assert torch.equal(split, named)
    pm.set_active(BatchSplit("a", "b", batch_sizes=[2, 2]))
    with pytest.raises(pa.StateError, match="covers 4 rows but the batch has 5"):
        pm(**x)


def test_the_issue_example_language_and_task_stack_beside_another_task():
    pm = _model(methods=("bottleneck", "bottleneck", "lora"))  # a=en (language), b=ner (task), c=sentiment
    assert_rows_match_alone(pm, "bert", [Stack("a", "b"), "c", Stack("a", "b"), None])


# ---------------------------------------------------------------------- fusion
def _fused(kind="bert"):
    pm = _model(kind=kind, methods=("bottleneck", "bottleneck", "bottleneck"))
    pm.add_adapter("f", pa.FusionConfig(adapters=["a", "b", "c"]), activate=False)
    return pm


def test_fusion_with_flat_attention_and_identity_values_is_the_uniform_average():
    pm = _fused()
    with torch.no_grad():
        for k, p in pm.adapter_parameters("f").items():
            if ".query." in k or ".key." in k:
                p.zero_()
    x = full_inputs("bert", 3)
    assert torch.allclose(run(pm, Fuse("a", "b", "c"), x), run(pm, Average("a", "b", "c"), x), atol=1e-5)
    assert torch.equal(run(pm, "f", x), run(pm, Fuse("a", "b", "c"), x))


def test_fusion_trains_only_its_own_layer_and_reloads(tmp_path):
    pm = _fused()
    frozen = {n: {k: v.clone() for k, v in pm.adapter_state_dict(n).items()} for n in "abc"}
    base = {k: v.clone() for k, v in pm.model.state_dict().items() if ".adapters." not in k}
    params = pm.train_adapter("f")
    assert pm.state.setup == Fuse("a", "b", "c", fusion="f")
    opt = torch.optim.Adam(params, lr=1e-2)
    x = full_inputs("bert", 4)
    labels = torch.tensor([0, 1, 2, 1])

    def eval_loss():
        pm.eval()
        with torch.no_grad():
            return pm(**x, labels=labels).loss.item()

    before = eval_loss()
    pm.train()
    for _ in range(10):
        loss = pm(**x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < before
    for n in "abc":
        assert all(torch.equal(v, frozen[n][k]) for k, v in pm.adapter_state_dict(n).items())
    assert all(torch.equal(v, base[k]) for k, v in pm.model.state_dict().items() if ".adapters." not in k)
    pm.eval()
    want = run(pm, "f", x)
    pm.save_adapter("f", tmp_path / "f")
    pm.remove_adapter("f")
    pm.load_adapter(tmp_path / "f", activate=False)
    assert torch.equal(run(pm, Fuse("a", "b", "c"), x), want)


def test_fuse_inside_mixed_batches_and_stacks():
    pm = _fused(kind="llama")
    pm.add_adapter("lang", pa.LoraConfig(r=4), activate=False)
    assert_rows_match_alone(pm, "llama", [Fuse("a", "b", "c"), "a", Stack("lang", Fuse("a", "b", "c")), None])


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("setup, message", [
    (Stack("a", Parallel("b", "c")), "Parallel cannot be nested inside another block"),
    (Average(BatchSplit("a", "b", batch_sizes=[1, 1]), "c"), "BatchSplit cannot be nested"),
    (Fuse(Stack("a", "b"), "c"), "Fuse children must be adapter names"),
    (Fuse("a", "b"), "no fusion adapter over"),
    (Fuse("b", "a", "c", fusion="f"), "was made for"),
    (Average("a", "b", weights=[1.0]), "2 children but 1 weights"),
    (Stack("a", "a"), "appears twice"),
    (Average("a", "p"), "cannot hold prompt adapter"),
    (Parallel(), "at least one child"),
    (BatchSplit("a", "b", batch_sizes=[1]), "one non-negative batch size per child"),
    (Stack("a", "nope"), "no adapter named 'nope'"),
    (42, "found int"),
])
def test_nonsense_nesting_is_refused_with_the_reason(setup, message):
    pm = _fused()
    pm.add_adapter("p", pa.PromptConfig(num_virtual_tokens=2), activate=False)
    before = pm.state.setup
    with pytest.raises(pa.PolyAdapterError, match=message):
        pm.set_active(setup)
    assert pm.state.setup == before


def test_fusion_config_needs_existing_adapters():
    pm = pa.AdapterModel(make_model("bert"))
    with pytest.raises(pa.ConfigError, match="none of the adapters"):
        pm.add_adapter("f", pa.FusionConfig(adapters=["x", "y"]))
    with pytest.raises(pa.ConfigError, match="at least two distinct"):
        pa.FusionConfig(adapters=["x"])


def test_parallel_on_a_plain_torch_model():
    pm = _model(kind="mlp", methods=())
    pm.add_adapter("a", pa.LoraConfig(r=2, targets=["fc1", "fc2"]), activate=False)
    pm.add_adapter("b", pa.IA3Config(targets=["fc1"]), activate=False)
    with torch.no_grad():
        for p in pm.adapter_parameters("a").values():
            p.normal_()
    x = make_inputs("mlp", 3)
    pm.set_active(Parallel("a", "b"))
    with torch.no_grad():
        ya, yb = pm(**x)
        pm.set_active("a")
        assert torch.allclose(ya, pm(**x), rtol=1e-4, atol=1e-4)
        pm.set_active("b")
        assert torch.allclose(yb, pm(**x), rtol=1e-4, atol=1e-4)
