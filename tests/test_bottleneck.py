"""Bottleneck adapters (sequential Houlsby/Pfeiffer, parallel He et al.) on the tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import polyadapter as pa
from polyadapter.errors import ConfigError, StateError
from polyadapter.methods.bottleneck import BottleneckPart

from conftest import MLP_TARGETS, make_inputs, make_model, output_of

KINDS = ["bert", "llama", "vit", "gpt2", "mlp"]
MODES = ["sequential", "parallel"]

# ViT in this transformers version names its layers q_proj/o_proj/mlp.fc2, which the
# "bert" family presets do not match, so ViT gets explicit targets here.
EXPLICIT_TARGETS = {
    ("mlp", "sequential"): MLP_TARGETS,
    ("mlp", "parallel"): MLP_TARGETS,
    ("vit", "sequential"): ["mlp.fc2"],
    ("vit", "parallel"): ["mlp"],
}


def config_for(kind: str, mode: str, **kw) -> pa.BottleneckConfig:
    return pa.BottleneckConfig(mode=mode, targets=EXPLICIT_TARGETS.get((kind, mode)), **kw)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@torch.no_grad()
def perturb(pm: pa.AdapterModel, name: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in pm.adapter_parameters(name).values():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


# ---------------------------------------------------------------------- at init and after change
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_starts_at_base_then_changes_without_touching_base(kind, mode):
    model = make_model(kind)
    inputs = make_inputs(kind)
    with torch.no_grad():
        base_out = output_of(model, inputs)
    before = snapshot(model)
    pm = pa.wrap(model)
    pm.add_adapter("a", config_for(kind, mode))
    assert pm.record("a").sites
    with torch.no_grad():
        assert torch.equal(output_of(pm, inputs), base_out)
        perturb(pm, "a")
        changed = output_of(pm, inputs)
    assert not torch.allclose(changed, base_out, atol=1e-4)
    # Deactivated, the wrapped model is the base again; unwrapped, its weights are too.
    pm.set_active()
    with torch.no_grad():
        assert torch.equal(output_of(pm, inputs), base_out)
    assert_bit_identical(before, pm.unwrap())


@pytest.mark.parametrize("mode", MODES)
def test_training_moves_only_the_adapter(mode):
    model = make_model("bert")
    inputs = make_inputs("bert")
    before = snapshot(model)
    pm = pa.wrap(model)
    pm.add_adapter("other", pa.BottleneckConfig(mode=mode), activate=False)
    other = {k: v.clone() for k, v in pm.adapter_state_dict("other").items()}
    pm.add_adapter("a", pa.BottleneckConfig(mode=mode, learned_scale=True))
    params = pm.train_adapter("a")
    assert {id(p) for p in params} == {id(p) for p in pm.trainable_parameters()}
    pm.eval()
    with torch.no_grad():
        base_out = output_of(pm, inputs)
    opt = torch.optim.Adam(params, lr=1e-2)
    labels = torch.tensor([0, 2])
    for _ in range(3):
        loss = nn.functional.cross_entropy(output_of(pm, inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(output_of(pm, inputs), base_out, atol=1e-5)
    for k, v in pm.adapter_state_dict("other").items():
        assert torch.equal(v, other[k]), k
    pm.remove_adapter("a")
    pm.remove_adapter("other")
    assert_bit_identical(before, pm.unwrap())


# ---------------------------------------------------------------------- what the part computes
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "swish", "tanh", "identity"])
@pytest.mark.parametrize("mode,residual", [("sequential", True), ("sequential", False), ("parallel", True)])
def test_part_computes_the_documented_formula(mode, residual, activation):
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    part = BottleneckPart(base, pa.BottleneckConfig(mode=mode, residual=residual, hidden_size=3,
                                                    activation=activation, scale=1.5), "s")
    with torch.no_grad():
        for p in part.parameters():
            p.copy_(torch.randn_like(p))
    act = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu,
           "swish": nn.functional.silu, "tanh": torch.tanh, "identity": lambda t: t}[activation]
    f = lambda h: 1.5 * (act(h @ part.down.weight.T + part.down.bias) @ part.up.weight.T + part.up.bias)  # noqa: E731
    x = torch.randn(5, 6)
    y = base(x)
    want = {("sequential", True): lambda: y + f(y), ("sequential", False): lambda: f(y),
            ("parallel", True): lambda: y + f(x)}[(mode, residual)]()
    with torch.no_grad():
        torch.testing.assert_close(part.apply(base, x), want)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_acts_on_adapter_input_only_in_training(mode):
    torch.manual_seed(0)
    base = nn.Linear(6, 6)
    part = BottleneckPart(base, pa.BottleneckConfig(mode=mode, hidden_size=3, dropout=0.5), "s")
    x = torch.randn(8, 6)
    with torch.no_grad():
        assert torch.equal(part.train().apply(base, x), base(x))  # up = 0: the base path is never dropped
        for p in part.parameters():
            p.copy_(torch.randn_like(p))
        a, b = part.apply(base, x), part.apply(base, x)
        assert not torch.equal(a, b)
        part.eval()
        plain = BottleneckPart(base, pa.BottleneckConfig(mode=mode, hidden_size=3), "s")
        plain.load_state_dict(part.state_dict())
        assert torch.equal(part.apply(base, x), plain.apply(base, x))


@pytest.mark.parametrize("mode", MODES)
def test_tuple_output_adapts_first_element_keeps_rest(mode):
    # ViT's attention sub-layer returns (hidden_states, attention_weights).
    model = make_model("vit")
    inputs = make_inputs("vit")
    with torch.no_grad():
        base_out = output_of(model, inputs)
    pm = pa.wrap(model)
    pm.add_adapter("a", pa.BottleneckConfig(mode=mode, targets=["re:.*layers\\.\\d+\\.attention"]))
    assert pm.record("a").sites == ["vit.layers.0.attention", "vit.layers.1.attention"]
    with torch.no_grad():
        assert torch.equal(output_of(pm, inputs), base_out)
        perturb(pm, "a")
        assert not torch.allclose(output_of(pm, inputs), base_out, atol=1e-4)
    site = pm.model.vit.layers[0].attention
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = site(hidden)
        ref = site.base(hidden)
    assert isinstance(out, tuple) and len(out) == len(ref)
    assert not torch.equal(out[0], ref[0])
    for a, b in zip(out[1:], ref[1:]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_parts_follow_base_dtype():
    model = make_model("mlp").double()
    inputs = {"x": make_inputs("mlp")["x"].double()}
    with torch.no_grad():
        base_out = output_of(model, inputs)
    pm = pa.wrap(model)
    pm.add_adapter("a", pa.BottleneckConfig(targets=MLP_TARGETS, learned_scale=True))
    assert {p.dtype for p in pm.adapter_parameters("a").values()} == {torch.float64}
    with torch.no_grad():
        assert torch.equal(output_of(pm, inputs), base_out)


# ---------------------------------------------------------------------- placement
def test_houlsby_two_sites_per_layer_pfeiffer_one_on_bert():
    pm = pa.wrap(make_model("bert"))
    pm.add_adapter("h", pa.BottleneckConfig(placement="houlsby"))
    pm.add_adapter("p", pa.BottleneckConfig(placement="pfeiffer"))
    layers = range(2)
    assert sorted(pm.record("h").sites) == sorted(
        [f"bert.encoder.layer.{i}.attention.output.dense" for i in layers]
        + [f"bert.encoder.layer.{i}.output.dense" for i in layers])
    assert pm.record("p").sites == [f"bert.encoder.layer.{i}.output.dense" for i in layers]
    # The resolved patterns are recorded, so a saved config says where it acted.
    assert pm.record("p").config.targets is not None


def test_parallel_on_llama_wraps_the_mlp_block():
    pm = pa.wrap(make_model("llama"))
    pm.add_adapter("a", pa.BottleneckConfig(mode="parallel", placement="houlsby"))  # placement ignored
    assert pm.record("a").sites == ["model.layers.0.mlp", "model.layers.1.mlp"]
    part = pm.parts("a")["model.layers.0.mlp"]
    assert (part.down.in_features, part.up.out_features) == (32, 32)


def test_sequential_reads_output_width_parallel_reads_input_width():
    # BERT's FFN output dense maps 64 -> 32: sequential adapts its 32-wide output,
    # parallel reads its 64-wide input.
    pm = pa.wrap(make_model("bert"))
    pm.add_adapter("s", pa.BottleneckConfig(mode="sequential", hidden_size=4))
    pm.add_adapter("p", pa.BottleneckConfig(mode="parallel", hidden_size=4))
    site = "bert.encoder.layer.0.output.dense"
    s, p = pm.parts("s")[site], pm.parts("p")[site]
    assert (s.down.in_features, s.up.out_features) == (32, 32)
    assert (p.down.in_features, p.up.out_features) == (64, 32)


# ---------------------------------------------------------------------- sizes
@pytest.mark.parametrize("kw,hidden", [
    ({}, 2),                                          # 32 / 16
    ({"reduction_factor": 8}, 4),
    ({"reduction_factor": 3}, 11),                    # round(10.67)
    ({"reduction_factor": 100}, 1),                   # never below 1
    ({"reduction_factor": 8, "hidden_size": 5}, 5),   # hidden_size wins
])
def test_bottleneck_width(kw, hidden):
    pm = pa.wrap(make_model("bert"))
    pm.add_adapter("a", pa.BottleneckConfig(**kw))
    parts = pm.parts("a")
    for part in parts.values():
        assert part.down.out_features == hidden and part.up.in_features == hidden
    per_site = 32 * hidden + hidden + hidden * 32 + 32
    assert pm.parameter_counts("a")["adapter"] == len(parts) * per_site


# ---------------------------------------------------------------------- options
def test_residual_false_does_not_start_at_base():
    model = make_model("bert")
    inputs = make_inputs("bert")
    with torch.no_grad():
        base_out = output_of(model, inputs)
    pm = pa.wrap(model)
    pm.add_adapter("a", pa.BottleneckConfig(residual=False))
    with torch.no_grad():
        assert not torch.allclose(output_of(pm, inputs), base_out, atol=1e-4)
        site = pm.model.bert.encoder.layer[0].output.dense
        assert torch.count_nonzero(site(torch.randn(2, 3, 64))) == 0  # s * f(y) with up = 0


def test_learned_scale_is_trainable_and_saved(tmp_path):
    model = make_model("gpt2")
    inputs = make_inputs("gpt2")
    pm = pa.wrap(model)
    pm.add_adapter("a", pa.BottleneckConfig(learned_scale=True, scale=2.0))
    scales = {k: p for k, p in pm.adapter_parameters("a").items() if k.endswith(".scale")}
    assert len(scales) == len(pm.record("a").sites)
    assert all(p.shape == () and p.item() == 2.0 for p in scales.values())
    params = pm.train_adapter("a")
    assert all(any(p is q for q in params) for p in scales.values())
    # The scale gets a gradient once the adapter's output is non-zero.
    perturb(pm, "a")
    output_of(pm, inputs).sum().backward()
    assert all(p.grad is not None and p.grad.abs() > 0 for p in scales.values())
    with torch.no_grad():
        for i, p in enumerate(scales.values()):
            p.fill_(0.25 + i)
    pm.eval()
    with torch.no_grad():
        want = output_of(pm, inputs)
    pm.save_adapter("a", tmp_path / "a")

    fresh = pa.wrap(make_model("gpt2"))
    fresh.load_adapter(tmp_path / "a", name="b")
    loaded = {k: p for k, p in fresh.adapter_parameters("b").items() if k.endswith(".scale")}
    assert [p.item() for p in loaded.values()] == [0.25 + i for i in range(len(loaded))]
    with torch.no_grad():
        assert torch.equal(output_of(fresh, inputs), want)


def test_fixed_scale_is_not_a_parameter():
    pm = pa.wrap(make_model("bert"))
    pm.add_adapter("a", pa.BottleneckConfig(scale=4.0))
    assert not any(k.endswith(".scale") for k in pm.adapter_parameters("a"))
    assert all(part.scale == 4.0 for part in pm.parts("a").values())


def test_config_json_roundtrip():
    cfg = pa.BottleneckConfig(mode="parallel", reduction_factor=4, activation="swish", scale=4.0,
                              learned_scale=True, dropout=0.1, targets=["mlp"])
    data = cfg.to_dict()
    assert data["method"] == "bottleneck"
    assert pa.config_from_dict(data) == cfg


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("field,value", [
    ("activation", "foo"),
    ("reduction_factor", 0),
    ("reduction_factor", -2.0),
    ("mode", "x"),
    ("placement", "middle"),
    ("hidden_size", 0),
    ("hidden_size", True),
    ("dropout", 1.0),
    ("scale", float("nan")),
    ("residual", "yes"),
    ("learned_scale", 1),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field) as info:
        pa.BottleneckConfig(**{field: value})
    assert repr(value) in str(info.value)
    with pytest.raises(ConfigError, match=field):
        pa.config_from_dict({"method": "bottleneck", field: value})


def test_parallel_refuses_residual_false():
    with pytest.raises(ConfigError, match="residual"):
        pa.BottleneckConfig(mode="parallel", residual=False)


def test_merge_raises_state_error_and_changes_nothing():
    model = make_model("llama")
    inputs = make_inputs("llama")
    pm = pa.wrap(model)
    pm.add_adapter("a", pa.BottleneckConfig(mode="parallel"))
    perturb(pm, "a")
    with torch.no_grad():
        want = output_of(pm, inputs)
    with pytest.raises(StateError, match="cannot be merged"):
        pm.merge_adapter("a")
    assert not pm.is_merged("a")
    with torch.no_grad():
        assert torch.equal(output_of(pm, inputs), want)


def test_sublayer_whose_width_guess_is_wrong_gives_target_error():
    # The block flattens before its Linear, so its input's last dim (4) is not the
    # Linear's input width (12) that the parallel adapter was built for.
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))
    pm = pa.wrap(model)
    pm.add_adapter("a", pa.BottleneckConfig(mode="parallel", targets=["block"]))
    with pytest.raises(pa.TargetError, match="'block'.*12"):
        pm(torch.randn(2, 3, 4))
