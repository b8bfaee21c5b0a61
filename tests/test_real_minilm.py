"""The packaged MiniLM (real pretrained weights): parity with PEFT on real weights for
LoRA and (IA)^3 in both directions, and the core promises on a real model."""
from __future__ import annotations

import pytest
import torch

import polyadapter as pa
from polyadapter.basemodels import load_classifier

import peft  # noqa: E402  the peer we check parity against (a test dependency)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TEXTS = ["Shares rose sharply after the quarterly results.", "The striker scored twice in the final.",
         "Parliament debated the new budget late into the night."]


@pytest.fixture(scope="module")
def tokenized():
    _, tokenizer = load_classifier("minilm", num_labels=5)
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


def fresh():
    return load_classifier("minilm", num_labels=5, seed=0)[0].eval()


def randomise(named_params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in named_params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_peft_saved_adapter_gives_peft_outputs(kind, tokenized, tmp_path):
    if kind == "lora":
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    else:
        config = peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                                modules_to_save=["classifier"])
    theirs = peft.get_peft_model(fresh(), config).eval()
    randomise((n, p) for n, p in theirs.named_parameters() if "lora_" in n or "ia3_l" in n or "modules_to_save" in n)
    with torch.no_grad():
        expected = theirs(**tokenized).logits
    theirs.save_pretrained(str(tmp_path / "peft"))

    ours = pa.AdapterModel(fresh())
    ours.load_adapter(tmp_path / "peft", name="from_peft")
    with torch.no_grad():
        got = ours(**tokenized).logits
    assert (got - expected).abs().max() <= 1e-5
    assert (got - fresh()(**tokenized).logits).abs().max() > 1e-3  # the adapter really acts


@pytest.mark.parametrize("config", [pa.LoraConfig(r=8, modules_to_save=["classifier"]),
                                    pa.LoraConfig(r=4, init="pissa", use_rslora=True),
                                    pa.IA3Config(modules_to_save=["classifier"])], ids=["lora", "pissa", "ia3"])
def test_our_export_gives_our_outputs_in_peft(config, tokenized, tmp_path):
    ours = pa.AdapterModel(fresh())
    ours.add_adapter("mine", config)
    randomise(ours.adapter_parameters("mine").items())
    with torch.no_grad():
        expected = ours(**tokenized).logits
    ours.save_adapter("mine", tmp_path / "export", format="peft")
    theirs = peft.PeftModel.from_pretrained(fresh(), str(tmp_path / "export")).eval()
    with torch.no_grad():
        got = theirs(**tokenized).logits
    assert (got - expected).abs().max() <= 1e-5


def test_merge_matches_peft_merge_and_unload(tokenized):
    config = dict(r=8, lora_alpha=16, target_modules=["query", "value"])
    theirs = peft.get_peft_model(fresh(), peft.LoraConfig(**config)).eval()
    randomise((n, p) for n, p in theirs.named_parameters() if "lora_" in n)
    ours = pa.AdapterModel(fresh())
    ours.add_adapter("a", pa.LoraConfig(r=8, alpha=16, targets=["query", "value"]))
    lora = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    with torch.no_grad():  # copy PEFT's weights into ours, then merge both
        for key, p in ours.adapter_parameters("a").items():
            site, param = key.rsplit(".", 1)
            p.copy_(lora[f"base_model.model.{site}.{param}.default.weight"])
    ours.merge_adapter("a")
    merged = theirs.merge_and_unload()
    for name, w in merged.state_dict().items():
        if name.endswith(("query.weight", "value.weight")):
            site = name[: -len(".weight")]
            ours_w = pa.sites.original_modules(ours.model)[site].weight
            assert (ours_w - w).abs().max() <= 1e-6, name
