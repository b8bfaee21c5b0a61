"""Request bodies of the OpenAI-compatible API (pydantic), and polyadapter's two
extension fields: ``adapters`` (a composition) and ``merged_adapters`` (LoRAX's
per-request merge). Unknown fields are ignored, as vLLM does, so clients that send
more of OpenAI's fields still work; fields we cannot honour are refused by name."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Ints = list[Annotated[int, Field(ge=0)]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class Composition(BaseModel):
    """``{"stack": [...]}``, ``{"average": [...], "weights": [...]}`` or
    ``{"fuse": [...], "fusion": NAME}``; children are adapter names or compositions."""
    model_config = ConfigDict(extra="forbid")
    stack: list[Union[str, "Composition"]] | None = Field(None, min_length=1, max_length=16)
    average: list[Union[str, "Composition"]] | None = Field(None, min_length=1, max_length=16)
    fuse: list[Union[str, "Composition"]] | None = Field(None, min_length=1, max_length=16)
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None = None
    fusion: str | None = None


class MergedAdapters(BaseModel):
    """LoRAX's ``merged_adapters``."""
    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(min_length=1, max_length=16)
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None = None
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = "linear"
    density: Annotated[float, Field(gt=0, le=1)] | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"


class _Generation(_Body):
    model: str = Field(max_length=256)
    n: Annotated[int, Field(ge=1, le=16)] = 1
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None   # vLLM's extension; -1 or 0: off
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: Ints | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    ignore_eos: bool = False
    adapters: Composition | None = None
    merged_adapters: MergedAdapters | None = None


class CompletionRequest(_Generation):
    prompt: str | Ints | list[str] | list[Ints] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=1)] | None = None
    echo: bool = False
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=0)] | None = None


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=64)
