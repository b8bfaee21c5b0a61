"""Chat data for causal language models: conversations from the chatterbot corpus or a
JSONL file, rendered with the tokenizer's chat template and encoded so that the loss
falls on the assistant's answers only.

    convs = load_chat_data("chatterbot:greetings")   # or "my.jsonl"
    rows = [encode_chat(tokenizer, m, max_length=160) for m in convs.conversations]
    train_lm_adapter(pm, "greetings", rows, tokenizer, steps=20)   # polyadapter.training

A conversation is a list of ``{"role", "content"}`` messages (roles ``system``,
``user``, ``assistant``). A tokenizer without a chat template gets a plain transcript
(``User: ...`` / ``Assistant: ...``), each answer ended by the EOS token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import DataError, _read_jsonl, load_chatterbot

CHATTERBOT_PREFIX = "chatterbot:"
ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label that carries no loss
DATA_HELP = ("chatterbot:CATEGORY (the chatterbot corpus, English) or a .jsonl file of "
             "{\"prompt\", \"completion\"} or {\"messages\": [...]} lines")


@dataclass
class ChatData:
    """Conversations to train on, and where they came from."""

    name: str
    conversations: list[list[dict]]

    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def answers(self) -> int:
        return sum(m["role"] == "assistant" for c in self.conversations for m in c)


def as_messages(turns: list[str]) -> list[dict]:
    """Alternating turns (a user's first) as chat messages."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# ---------------------------------------------------------------------- loading
def load_chat_data(spec: str | Path) -> ChatData:
    """``chatterbot:CATEGORY`` or the path of a ``.jsonl`` file (see :data:`DATA_HELP`)."""
    text = str(spec)
    if text.startswith(CHATTERBOT_PREFIX):
        category = text[len(CHATTERBOT_PREFIX):]
        categories = load_chatterbot()
        if category not in categories:
            raise DataError(f"--data {text}: no chatterbot category {category!r}; "
                            f"available: {', '.join(sorted(categories))}")
        return ChatData(text, [as_messages(c) for c in categories[category]])
    path = Path(text)
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise DataError(f"--data {text}: expected {DATA_HELP}")
    if not path.is_file():
        raise DataError(f"{path}: data file not found (expected {DATA_HELP})")
    try:
        rows = _read_jsonl(path, "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot decode the file as utf-8 ({e})") from None
    conversations = [_conversation(row, f"{path}:{line}") for line, row in rows]
    if not conversations:
        raise DataError(f"{path}: no conversations found")
    return ChatData(path.name, conversations)


def _conversation(row: dict, where: str) -> list[dict]:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: message {m!r} is not {{\"role\": one of {list(ROLES)}, "
                                f"\"content\": a string}}")
        out = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        out = as_messages([row["prompt"], row["completion"]])
    else:
        raise DataError(f"{where}: expected {{\"prompt\": str, \"completion\": str}} or {{\"messages\": [...]}}; "
                        f"found keys {sorted(row)}")
    if not any(m["role"] == "assistant" for m in out[1:]):
        raise DataError(f"{where}: no assistant message after the first (nothing to learn)")
    return out


# ---------------------------------------------------------------------- rendering
def chat_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The conversation as text pieces, each marked True when it is an answer (an
    assistant turn with its end-of-turn marker). The pieces join to the full text."""
    if not getattr(tokenizer, "chat_template", None):
        return _plain_pieces(tokenizer, messages)
    full = _render(tokenizer, messages)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        end = _render(tokenizer, messages[:i + 1])
        if not (full.startswith(start) and full.startswith(end) and pos <= len(start) <= len(end)):
            return [(full, True)]  # a template whose prefixes do not line up: loss on every token
        pieces += [(full[pos:len(start)], False), (full[len(start):len(end)], True)]
        pos = len(end)
    pieces.append((full[pos:], False))
    return [(t, trained) for t, trained in pieces if t]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _plain_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    eos = getattr(tokenizer, "eos_token", None) or ""
    pieces = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i > 0:
            pieces += [("Assistant: ", False), (m["content"] + eos, True), ("\n", False)]
        else:
            pieces.append((f"{m['role'].capitalize()}: {m['content']}\n", False))
    return pieces


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The whole conversation as one text (the chat template's rendering)."""
    return "".join(t for t, _ in chat_pieces(tokenizer, messages))


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> dict:
    """``{"input_ids", "labels"}`` (lists, at most ``max_length`` tokens): labels are the
    tokens of the answers and :data:`IGNORE` elsewhere (no loss on prompts)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in chat_pieces(tokenizer, messages):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tokens
        labels += tokens if trained else [IGNORE] * len(tokens)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def has_answer(row: dict) -> bool:
    """Whether an encoded row keeps some answer token (after truncation)."""
    return any(label != IGNORE for label in row["labels"][1:])


def default_targets(model) -> list[str]:
    """The attention projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) when the
    model has them all, as Llama-family models (SmolLM2) do; else ``all-linear``."""
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return attention if set(attention) <= leaves else ["all-linear"]
