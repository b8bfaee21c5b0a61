"""Prompt tuning (Lester et al., "The Power of Scale for Parameter-Efficient Prompt
Tuning"): a few trainable "virtual token" embeddings prepended to every input.

This method has no sites. It acts on the model's *inputs* instead: ``prepare`` turns
``input_ids`` into ``inputs_embeds`` with the model's own embedding layer, puts the
prompt in front, and widens every per-token input (attention mask, token types,
token-level labels) to match. Because nothing inside the model is touched, it works
with any Hugging Face-style model whose forward accepts ``inputs_embeds``, without
per-architecture code, and several active prompts simply prepend in turn (the first
active one ends up nearest the real tokens).

It has no weight-space form, so it cannot be merged (the model refuses).

Initialisation: ``vocab`` (default) copies randomly chosen rows of the embedding
matrix — the prompt starts in the region of embedding space the model was trained
on, which trains faster and more stably than noise; ``random`` draws from a normal
with the embedding matrix's std; ``tokens`` copies the embeddings of given token ids
(e.g. a task description), repeated or cut to ``num_virtual_tokens``.

Generation: ``AdapterModel.generate`` hands Hugging Face ``generate`` the prompted
``inputs_embeds`` and the widened ``attention_mask`` instead of ``input_ids``. In that
mode Hugging Face returns **only the newly generated tokens**, not the input ids
followed by them; use ``max_new_tokens`` rather than ``max_length``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError, PolyAdapterError, TargetError
from ..sites import base_module
from .spec import MethodSpec

INITS = ("vocab", "random", "tokens")
IGNORE_INDEX = -100  # Hugging Face's label value for "no loss here"


@dataclass
class PromptConfig(AdapterConfig):
    """``num_virtual_tokens``: prompt length. ``init``: ``vocab`` | ``random`` |
    ``tokens`` (see the module docstring). ``init_token_ids``: the ids to copy, only
    with ``init="tokens"``. ``seed``: makes ``vocab``/``random`` initialisation
    reproducible; ``None`` uses torch's global generator. ``targets`` must stay unset:
    a prompt acts on the input embeddings, not on named modules; ``modules_to_save``
    (e.g. a classifier head) is allowed."""

    method: ClassVar[str] = "prompt"
    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_token_ids: list[int] | None = None
    seed: int | None = None

    def validate(self):
        self.require(self.targets is None, "targets",
                     "None (prompt tuning acts on the input embeddings, not on target modules)")
        self.require(_is_int(self.num_virtual_tokens) and self.num_virtual_tokens > 0,
                     "num_virtual_tokens", "a positive integer")
        self.require(self.init in INITS, "init", f"one of {list(INITS)}")
        if self.init_token_ids is not None and not isinstance(self.init_token_ids, (str, bytes)):
            try:
                self.init_token_ids = list(self.init_token_ids)
            except TypeError:
                pass
        if self.init == "tokens":
            self.require(isinstance(self.init_token_ids, list) and len(self.init_token_ids) > 0
                         and all(_is_int(i) and i >= 0 for i in self.init_token_ids),
                         "init_token_ids", "a non-empty list of non-negative token ids (init='tokens')")
        else:
            self.require(self.init_token_ids is None, "init_token_ids",
                         "None unless init='tokens'")
        self.require(self.seed is None or _is_int(self.seed), "seed", "an integer or None")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def input_embedding_layer(model: nn.Module) -> nn.Module:
    """The model's token embedding layer, or a PolyAdapterError saying why prompt
    tuning cannot act on this model (checked up front so failures name the model,
    not a shape error deep inside its forward)."""
    cls = type(model).__name__
    getter = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
    emb = base_module(emb)  # e.g. an embedding with a LoRA
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TargetError(
            f"prompt tuning needs a model with a token embedding layer (get_input_embeddings() returning an "
            f"embedding with a 2-D weight); {cls} has none")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "inputs_embeds" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise TargetError(f"prompt tuning needs a model whose forward accepts inputs_embeds; {cls}'s does not")
    return emb


class PromptPart(nn.Module):
    """Holds the prompt (``embeddings``: num_virtual_tokens x hidden) and rewrites a
    call's keyword arguments so the model sees it in front of the real tokens."""

    def __init__(self, model: nn.Module, config: PromptConfig, site: str):
        super().__init__()
        emb = input_embedding_layer(model)
        table = emb.weight.detach()
        vocab, _ = table.shape
        n = config.num_virtual_tokens
        gen = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        if config.init == "tokens":
            bad = [i for i in config.init_token_ids if i >= vocab]
            if bad:
                raise ConfigError(f"prompt config: init_token_ids={config.init_token_ids!r} is invalid; "
                                  f"ids {bad[:5]} are not below the model's vocabulary size {vocab}")
            ids = torch.tensor(config.init_token_ids, dtype=torch.long)
            ids = ids.repeat((n + len(ids) - 1) // len(ids))[:n]
            init = table[ids.to(table.device)]
        elif config.init == "vocab":
            ids = torch.randint(0, vocab, (n,), generator=gen)
            init = table[ids.to(table.device)]
        else:
            std = table.float().std().item()
            init = (torch.randn(n, table.shape[1], generator=gen) * std).to(table.device)
        self.embeddings = nn.Parameter(init.to(table.dtype).clone())

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def prepare(self, model: nn.Module, kwargs: dict) -> dict:
        """Keyword arguments for ``model(**kwargs)`` with the prompt in front.

        Token-level labels (integer labels shaped like the tokens, as a causal LM or a
        token classifier takes) get ``-100`` over the prompt so it carries no loss;
        anything else (per-sequence class labels) is left alone."""
        kwargs = self._prepend(model, kwargs)
        labels = kwargs.get("labels")
        if (isinstance(labels, torch.Tensor) and not labels.is_floating_point()
                and labels.dim() == 2 and labels.shape[1] + self.num_virtual_tokens == kwargs["inputs_embeds"].shape[1]
                and labels.shape[0] == kwargs["inputs_embeds"].shape[0]):
            pad = labels.new_full((labels.shape[0], self.num_virtual_tokens), IGNORE_INDEX)
            kwargs["labels"] = torch.cat([pad, labels], dim=1)
        return kwargs

    def prepare_generate(self, model: nn.Module, kwargs: dict) -> dict:
        """Keyword arguments for ``model.generate(**kwargs)``: generation starts from the
        prompted embeddings, so Hugging Face returns only the new tokens."""
        return self._prepend(model, kwargs)

    def _prepend(self, model: nn.Module, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        embeds = _input_embeds(model, kwargs)
        batch, length = embeds.shape[:2]
        n = self.num_virtual_tokens
        prompt = self.embeddings.to(device=embeds.device, dtype=embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is None:
            kwargs["attention_mask"] = torch.ones(batch, n + length, dtype=torch.long, device=embeds.device)
        else:
            if mask.dim() != 2:
                raise PolyAdapterError(
                    f"prompt tuning needs a 2-D attention_mask (batch, tokens); found shape {tuple(mask.shape)}")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
        return kwargs


def prepare_rows(model: nn.Module, kwargs: dict, row_prompts: list[list[PromptPart]], generate: bool) -> dict:
    """Keyword arguments for a mixed batch in which row ``i`` gets the prompts
    ``row_prompts[i]`` (innermost first; several prompts on a row stack as with one
    setup, and a row may have none).

    When the rows' prompt lengths differ, the shorter ones are padded (attention mask 0
    over the padding) so that each row's prompt and tokens sit where they would alone:

    - models that generate (decoders): padding goes on the left of the row's prompt and
      ``position_ids`` come from the mask, as in Hugging Face generation, so every
      row's real tokens stay aligned with the caller's and the last position is each
      row's last token;
    - other models (encoders, which often pool the first position): padding goes after
      the row's tokens, so every row starts with its own prompt at position 0; row
      ``i``'s tokens then start at offset ``len(prompt_i)``, and token-level labels
      are shifted with them."""
    kwargs = dict(kwargs)
    embeds = _input_embeds(model, kwargs)
    batch, length, hidden = embeds.shape
    if len(row_prompts) != batch:
        raise PolyAdapterError(f"mixed batch: {len(row_prompts)} row setups for a batch of {batch}")
    prefixes = [torch.cat([p.embeddings for p in reversed(parts)], dim=0).to(device=embeds.device,
                                                                            dtype=embeds.dtype)
                if parts else embeds.new_zeros(0, hidden) for parts in row_prompts]
    lengths = [t.shape[0] for t in prefixes]
    n = max(lengths)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    elif mask.dim() != 2:
        raise PolyAdapterError(
            f"prompt tuning needs a 2-D attention_mask (batch, tokens); found shape {tuple(mask.shape)}")
    left = _generates(model)

    def padded(prefix, row, fill, pad_value):
        """One row: prompt, then the row itself, padded to ``n + length``."""
        gap = fill.new_full((n - prefix.shape[0],) + tuple(fill.shape[1:]), pad_value)
        return torch.cat([gap, prefix, row] if left else [prefix, row, gap], dim=0)

    ones = [mask.new_ones(m) for m in lengths]
    zeros_h = embeds.new_zeros(1, hidden)
    kwargs["inputs_embeds"] = torch.stack([padded(p, e, zeros_h, 0) for p, e in zip(prefixes, embeds)])
    kwargs["attention_mask"] = torch.stack([padded(o, m, mask[:1, 0], 0) for o, m in zip(ones, mask)])
    types = kwargs.get("token_type_ids")
    if types is not None:
        kwargs["token_type_ids"] = torch.stack([padded(t.new_zeros(m), t, t[:1], 0)
                                                for m, t in zip(lengths, types)])
    if len(set(lengths)) > 1 and left and not generate and _accepts(model, "position_ids"):
        kwargs["position_ids"] = (kwargs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    labels = kwargs.get("labels")
    if (not generate and isinstance(labels, torch.Tensor) and not labels.is_floating_point()
            and labels.dim() == 2 and tuple(labels.shape) == (batch, length)):
        kwargs["labels"] = torch.stack([padded(labels.new_full((m,), IGNORE_INDEX), lab, lab[:1], IGNORE_INDEX)
                                        for m, lab in zip(lengths, labels)])
    return kwargs


def _generates(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:  # noqa: BLE001 - a model's own check failing means "no"
        return False


def _input_embeds(model: nn.Module, kwargs: dict) -> torch.Tensor:
    """Pop ``input_ids`` from ``kwargs`` and return the input embeddings; explicit
    ``position_ids`` are refused (the prompt shifts every position)."""
    if kwargs.get("position_ids") is not None:
        raise PolyAdapterError(
            "prompt tuning does not support explicit position_ids: the prompt shifts every position; "
            "leave position_ids unset and let the model derive them from the attention mask")
    input_ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if input_ids is None:
            raise PolyAdapterError("prompt tuning needs input_ids or inputs_embeds among the model's inputs")
        embeds = model.get_input_embeddings()(input_ids)
    elif input_ids is not None:
        raise PolyAdapterError("pass input_ids or inputs_embeds, not both")
    return embeds


def _accepts(model: nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _size(model: nn.Module, config: PromptConfig, site: str) -> int:
    return config.num_virtual_tokens * input_embedding_layer(model).weight.shape[1]


SPEC = MethodSpec(
    name="prompt",
    config_cls=PromptConfig,
    make_part=PromptPart,
    fill_defaults=lambda model, cfg: cfg,
    level="input",
    summary="trainable virtual-token embeddings prepended to the input (prompt tuning)",
    size=_size,
)
