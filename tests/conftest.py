"""Tiny models built in code (width 32, 2 layers) and matching inputs, shared by all tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """A user's own network: conv stem, two Linear layers, no Hugging Face anything."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.conv(x).flatten(1)
        h = self.act(self.fc1(h))
        return self.head(self.act(self.fc2(h)))


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=3)
    return ViTForImageClassification(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg)


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = {"bert": tiny_bert, "llama": tiny_llama, "vit": tiny_vit, "gpt2": tiny_gpt2, "mlp": TinyNet}[kind]()
    return model.eval()


def make_inputs(kind: str, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind in ("vit",):
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    if kind == "mlp":
        return {"x": torch.randn(batch, 3, 8, 8, generator=g)}
    ids = torch.randint(0, 100, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding, so masks matter
    return {"input_ids": ids, "attention_mask": mask}


def output_of(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# Targets for the user's own network, which has no family preset.
MLP_TARGETS = ["fc1", "fc2"]


@pytest.fixture
def bert():
    return make_model("bert")


@pytest.fixture
def llama():
    return make_model("llama")


# ---------------------------------------------------------------------- snapshots
def snapshot(pm) -> dict:
    """Everything a refused call must leave as it was: every parameter and buffer (values,
    dtype, requires_grad), the module tree (names and types), the adapters (names, configs,
    sites), the active setup, the merged set and the train/eval mode."""
    return {
        "tensors": {n: (t.detach().clone(), t.dtype, t.requires_grad)
                    for n, t in list(pm.named_parameters()) + list(pm.named_buffers())},
        "modules": [(n, type(m).__name__) for n, m in pm.named_modules()],
        "state_dict_keys": list(pm.model.state_dict().keys()),
        "adapter_state_keys": list(pm.state_dict().keys()),
        "adapters": {n: (r.config.to_dict(), list(r.sites), list(r.saved_modules), dict(r.provenance))
                     for n, r in pm.state.adapters.items()},
        "setup": repr(pm.state.setup), "active": pm.state.active,
        "merged": sorted(pm.state.merged),
        "site_merged": {n: list(m.merged) for n, m in pm.named_modules() if hasattr(m, "merged")},
        "training": [m.training for m in pm.modules()],
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    for key in before:
        if key == "tensors":
            assert before[key].keys() == after[key].keys()
            for n, (t, dtype, grad) in before[key].items():
                t2, dtype2, grad2 = after[key][n]
                assert dtype == dtype2 and grad == grad2, n
                assert torch.equal(t, t2), f"{n} changed"
        else:
            assert before[key] == after[key], key
