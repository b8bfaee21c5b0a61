"""Architecture knowledge as data: where each method acts, per model family.

A family is chosen from ``model.config.model_type``. Where module names changed across
transformers releases (ViT was BERT-like before transformers 5), a model type lists
several families and the first whose patterns all match the model is used. Patterns follow the rules in
``sites.py``: an exact module name or a dotted suffix, ``re:<regex>`` for a regular
expression matched against the whole name, or the keyword ``all-linear``.
"""

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

PRESETS = {
    "bert": {
        "lora": ["query", "value"],
        "ia3": ["key", "value", "output.dense"],
        "ia3_feedforward": ["output.dense"],
        "sparse": ["query", "value", "intermediate.dense", "output.dense"],
        "houlsby": ["attention.output.dense", _BERT_FFN_OUT],
        "pfeiffer": [_BERT_FFN_OUT],
        "parallel": [_BERT_FFN_OUT],
    },
    "llama": {
        "lora": ["q_proj", "v_proj"],
        "ia3": ["k_proj", "v_proj", "down_proj"],
        "ia3_feedforward": ["down_proj"],
        "sparse": ["q_proj", "v_proj", "down_proj"],
        "houlsby": ["self_attn.o_proj", "mlp.down_proj"],
        "pfeiffer": ["mlp.down_proj"],
        "parallel": ["mlp"],
    },
    "vit": {
        "lora": ["q_proj", "v_proj"],
        "ia3": ["k_proj", "v_proj", "mlp.fc2"],
        "ia3_feedforward": ["mlp.fc2"],
        "sparse": ["q_proj", "v_proj", "mlp.fc2"],
        "houlsby": ["attention.o_proj", "mlp.fc2"],
        "pfeiffer": ["mlp.fc2"],
        "parallel": ["mlp"],
    },
    "gpt2": {
        "lora": ["c_attn"],
        "ia3": ["c_attn", "mlp.c_proj"],
        "ia3_feedforward": ["mlp.c_proj"],
        "sparse": ["c_attn", "mlp.c_proj"],
        "houlsby": ["attn.c_proj", "mlp.c_proj"],
        "pfeiffer": ["mlp.c_proj"],
        "parallel": ["mlp"],
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
