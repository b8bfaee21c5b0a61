"""Generate the AdapterHub parity fixtures. Runs INSIDE the `adapters` venv, never ours:

    cd /work/main && python3 -m venv .venv-adapters && \
        .venv-adapters/bin/pip install torch==2.13.0 transformers==4.57.6 adapters==1.3.0 safetensors
    .venv-adapters/bin/python tests/adapterhub/make_fixtures.py

For each tiny model (the same configs as tests/conftest.py) it writes, under
tests/adapterhub/fixtures/<model>/:

- base.safetensors        the base model's weights (seeded), loaded by our tests into
                          transformers 5.x models of the same config;
- inputs.safetensors      input_ids and attention_mask;
- adapters/<name>/        each adapter saved by `adapters` itself (safetensors);
- fusion/<a>_<b>/         each fusion layer saved by `adapters` (save_adapter_fusion);
- reference.safetensors   `<case>` -> the model's output with that setup active (logits).

Adapter weights are randomised (nothing is zero, so every term of every formula shows).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import adapters
import torch
from adapters import (
    DoubleSeqBnConfig,
    Fuse,
    IA3Config,
    LoRAConfig,
    Parallel,
    ParBnConfig,
    SeqBnConfig,
    Stack,
)
from safetensors.torch import save_file

OUT = Path(__file__).parent / "fixtures"


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# name -> adapters config. Small reduction factors keep the bottlenecks non-trivial at width 32.
ADAPTERS = {
    "seq_bn": SeqBnConfig(reduction_factor=4),
    "seq_bn_b": SeqBnConfig(reduction_factor=8),
    # (ln_before=True cannot be saved by `adapters` as safetensors: its LayerNorm is registered
    # twice, as adapter_norm_before and adapter_down.0, and safetensors refuses shared tensors.)
    "seq_bn_var": SeqBnConfig(reduction_factor=4, non_linearity="gelu", scaling=0.5, leave_out=[0]),
    "double_seq_bn": DoubleSeqBnConfig(reduction_factor=4),
    "double_seq_bn_b": DoubleSeqBnConfig(reduction_factor=8),
    "par_bn": ParBnConfig(reduction_factor=2),
    "lora": LoRAConfig(r=4, alpha=8),
    "ia3": IA3Config(),
}
# case -> (setup, adapters it uses, fused adapters or None)
CASES = {
    **{n: (n, [n], None) for n in ADAPTERS},
    "stack_seq_bn": (Stack("seq_bn", "seq_bn_b"), ["seq_bn", "seq_bn_b"], None),
    "stack_double_seq_bn": (Stack("double_seq_bn", "double_seq_bn_b"), ["double_seq_bn", "double_seq_bn_b"], None),
    "stack_lora_seq_bn": (Stack("lora", "seq_bn"), ["lora", "seq_bn"], None),
    "fuse_seq_bn": (Fuse("seq_bn", "seq_bn_b"), ["seq_bn", "seq_bn_b"], ["seq_bn", "seq_bn_b"]),
    "fuse_double_seq_bn": (Fuse("double_seq_bn", "double_seq_bn_b"), ["double_seq_bn", "double_seq_bn_b"],
                           ["double_seq_bn", "double_seq_bn_b"]),
    "parallel": (Parallel("seq_bn", "seq_bn_b"), ["seq_bn", "seq_bn_b"], None),
}


def output(model, batch):
    out = model(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def make(kind: str, build):
    torch.manual_seed(0)
    model = build().eval()
    folder = OUT / kind
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "base.safetensors"))
    batch = inputs()
    save_file(batch, str(folder / "inputs.safetensors"))
    adapters.init(model)
    for i, (name, config) in enumerate(ADAPTERS.items()):
        if kind == "llama" and name == "ia3":
            config = IA3Config()  # llama: k, v and the FFN (gate/up) projections
        model.add_adapter(name, config=config)
        for n, p in model.named_parameters():
            p.requires_grad_(False)
        # randomise only this adapter's tensors
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{name}." not in n and not n.endswith(f".{name}"):
                    continue
                noise = torch.randn(p.shape, generator=g) * 0.3
                if "norm" in n or (name == "ia3"):
                    p.copy_(1 + noise)
                else:
                    p.copy_(noise)
    refs = dict(zip(("base", "base.hidden"), output(model, batch)))
    model.eval()
    for case, (setup, names, fusion) in CASES.items():
        if fusion is not None:
            model.add_adapter_fusion(Fuse(*fusion), config="dynamic")
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "adapter_fusion_layer" in n and ",".join(fusion) in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.set_active_adapters(setup)
        model.eval()
        with torch.no_grad():
            refs[case], refs[case + ".hidden"] = output(model, batch)
        model.set_active_adapters(None)
        if fusion is not None:
            target = folder / "fusion" / "_".join(fusion)
            target.mkdir(parents=True)
            model.save_adapter_fusion(str(target), ",".join(fusion), use_safetensors=True)
    for name in ADAPTERS:
        (folder / "adapters" / name).mkdir(parents=True)
        model.save_adapter(str(folder / "adapters" / name), name, use_safetensors=True)
    save_file({k: v.contiguous() for k, v in refs.items()}, str(folder / "reference.safetensors"))
    base = refs["base"]
    print(kind, {k: round(float((v[: base.shape[0]] - base).abs().max()), 4) for k, v in refs.items()
                 if not k.endswith(".hidden")})


if __name__ == "__main__":
    make("bert", tiny_bert)
    make("llama", tiny_llama)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixtures: {total:,} bytes")
