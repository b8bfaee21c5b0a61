"""Architecture knowledge as data: where each method acts, per model family.

A family is chosen from ``model.config.model_type``. Where module names changed across
transformers releases (ViT was BERT-like before transformers 5), a model type lists
several families and the first whose patterns all match the model is used. Patterns follow the rules in
``sites.py``: an exact module name or a dotted suffix, ``re:<regex>`` for a regular
expression matched against the whole name, or the keyword ``all-linear``.
"""

import re

from .sites import matches

FAMILY_OF_MODEL_TYPE = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert",
    "camembert": "bert", "vit": ("vit", "bert"), "deit": ("vit", "bert"), "data2vec-text": "bert",
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma": "llama", "gemma2": "llama", "phi3": "llama", "smollm3": "llama",
    "gpt2": "gpt2",
}

# The FFN output projection of a BERT-style layer, but not the attention's output.
_BERT_FFN_OUT = r"re:(.*\.)?layer\.\d+\.output\.dense"
# The FFN block's LayerNorm (its input is the sum h + x), and the block itself.
_BERT_FFN_LN = r"re:(.*\.)?layer\.\d+\.output\.LayerNorm"
_BERT_FFN_BLOCK = r"re:(.*\.)?layer\.\d+\.output"

PRESETS = {
    "bert": {
        "lora": ["query", "value"],
        "ia3": ["key", "value", "output.dense"],
        "ia3_feedforward": ["output.dense"],
        "sparse": ["query", "value", "intermediate.dense", "output.dense"],
        "houlsby": ["attention.output.dense", _BERT_FFN_OUT],
        "pfeiffer": [_BERT_FFN_OUT],
        "parallel": [_BERT_FFN_OUT],
        # AdapterHub's placements (adapters' SeqBnConfig / DoubleSeqBnConfig / ParBnConfig)
        "seq_bn": [_BERT_FFN_LN],
        "double_seq_bn": ["attention.output.dense", _BERT_FFN_OUT],
        "par_bn": [_BERT_FFN_BLOCK],
        # (IA)^3 as AdapterHub places it: the FFN's first projection's output is scaled
        "ia3_adapterhub": ["key", "value", "intermediate.dense"],
    },
    "llama": {
        "lora": ["q_proj", "v_proj"],
        "ia3": ["k_proj", "v_proj", "down_proj"],
        "ia3_feedforward": ["down_proj"],
        "sparse": ["q_proj", "v_proj", "down_proj"],
        "houlsby": ["self_attn.o_proj", "mlp.down_proj"],
        "pfeiffer": ["mlp.down_proj"],
        "parallel": ["mlp"],
        # pre-LN: the sum z = h + x has no LayerNorm after it; it is the layer's output
        "seq_bn": [r"re:(.*\.)?layers\.\d+"],
        "double_seq_bn": ["self_attn.o_proj", "mlp.down_proj"],
        # adapters 1.3 wraps down_proj as Llama's "intermediate" LoRA layer
        "ia3_adapterhub": ["k_proj", "v_proj", "mlp.down_proj"],
    },
    "vit": {
        "lora": ["q_proj", "v_proj"],
        "ia3": ["k_proj", "v_proj", "mlp.fc2"],
        "ia3_feedforward": ["mlp.fc2"],
        "sparse": ["q_proj", "v_proj", "mlp.fc2"],
        "houlsby": ["attention.o_proj", "mlp.fc2"],
        "pfeiffer": ["mlp.fc2"],
        "parallel": ["mlp"],
        "seq_bn": [r"re:(.*\.)?layers?\.\d+"],
        "double_seq_bn": ["attention.o_proj", "mlp.fc2"],
        "ia3_adapterhub": ["k_proj", "v_proj", "mlp.fc1"],
    },
    "gpt2": {
        "lora": ["c_attn"],
        "ia3": ["c_attn", "mlp.c_proj"],
        "ia3_feedforward": ["mlp.c_proj"],
        "sparse": ["c_attn", "mlp.c_proj"],
        "houlsby": ["attn.c_proj", "mlp.c_proj"],
        "pfeiffer": ["mlp.c_proj"],
        "parallel": ["mlp"],
        "seq_bn": [r"re:(.*\.)?h\.\d+"],
        "double_seq_bn": ["attn.c_proj", "mlp.c_proj"],
        "ia3_adapterhub": ["c_attn", "mlp.c_fc"],
    },
}

# Layer containers, for ``leave_out`` (layer indices): the number after the container's name.
LAYER_INDEX = {
    "bert": r"(?:^|\.)layer\.(\d+)(?:\.|$)",
    "llama": r"(?:^|\.)layers\.(\d+)(?:\.|$)",
    "vit": r"(?:^|\.)layers?\.(\d+)(?:\.|$)",
    "gpt2": r"(?:^|\.)h\.(\d+)(?:\.|$)",
}

# Output blocks that take (hidden_states, residual input) and hold their projection,
# dropout and LayerNorm as children: what a ``par_bn`` part calls itself (BERT's
# BertOutput / BertSelfOutput, RoBERTa's, ELECTRA's, ... all share the layout).
BLOCKS = [
    {"projection": "dense", "dropout": "dropout", "norm": "LayerNorm", "residual_arg": 0,
     "residual_kwarg": "input_tensor"},
]

# Where AdapterHub's `adapters` (1.3) keeps a layer's bottleneck adapters, relative to the
# layer, and which of our sites each location means per kind of adapter: "output" — the
# sub-layer's output projection (original_ln_before=False: Houlsby-like), "sum" — the
# module that sees the residual sum (original_ln_before=True: the block's LayerNorm on
# post-LN models, the layer itself on pre-LN ones; "" is the layer), "block" — the output
# block (par_bn). A kind missing here cannot be placed faithfully on that family.
ADAPTERHUB_LOCATIONS = {
    "bert": {
        "attention.output": {"output": "attention.output.dense", "sum": "attention.output.LayerNorm",
                             "block": "attention.output"},
        "output": {"output": "output.dense", "sum": "output.LayerNorm", "block": "output"},
    },
    "llama": {
        "attention_adapters": {"output": "self_attn.o_proj"},
        "output_adapters": {"output": "mlp.down_proj", "sum": ""},
    },
    "gpt2": {
        "attention_adapters": {"output": "attn.c_proj"},
        "output_adapters": {"output": "mlp.c_proj", "sum": ""},
    },
}


def _candidates(model) -> tuple[str, ...]:
    config = getattr(model, "config", None)
    found = FAMILY_OF_MODEL_TYPE.get(getattr(config, "model_type", None), ())
    return (found,) if isinstance(found, str) else found


def model_family(model) -> str | None:
    names = [n for n, _ in model.named_modules()]
    for family in _candidates(model):
        if all(any(matches(n, p) for n in names) for p in PRESETS[family]["lora"]):
            return family
    return next(iter(_candidates(model)), None)


def preset(model, key: str) -> list[str] | None:
    family = model_family(model)
    return None if family is None else PRESETS[family].get(key)


def family_presets(model) -> dict:
    family = model_family(model)
    return {} if family is None else PRESETS[family]


def layer_index(model, name: str) -> int | None:
    """The layer number in module name ``name`` (per the family's layer container), or None."""
    pattern = LAYER_INDEX.get(model_family(model) or "")
    m = re.search(pattern, name) if pattern else None
    return int(m.group(1)) if m else None


def block_layout(module) -> dict | None:
    """The entry of ``BLOCKS`` whose children ``module`` has, or None."""
    for layout in BLOCKS:
        if all(hasattr(module, layout[k]) for k in ("projection", "dropout", "norm")):
            return layout
    return None
