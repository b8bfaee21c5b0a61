"""Typed checks of every value we read from a user or a file, before anything is built.

One layer for all of them: a method config (built in Python or read from
``polyadapter.json`` / ``adapter_config.json``), the native folder's metadata and
PEFT's config fields. Each is described by its types — the config dataclasses' own
annotations, or the pydantic models below — and checked by pydantic in strict mode:
no string where a number is expected, no ``true`` where an integer is, no NaN or
infinity, no unknown field. A failure becomes one :class:`ConfigError` (or
:class:`LoadError` for a file) that names the file or adapter, the field and what it
holds.

Why pydantic: it is the validator the server's request models use too, it is well
kept, fast (Rust core) and reads our existing type annotations, so the types are
written once. Semantic rules (``r > 0``, a mode among a list) stay in each config's
``validate``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import ConfigError, LoadError

STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


def describe_errors(e: ValidationError, limit: int = 3) -> str:
    """``field.path: message (found VALUE)``, for the first few problems pydantic found."""
    parts = []
    for err in e.errors()[:limit]:
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "missing":
            parts.append(f"field {loc!r} is missing")
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        else:
            parts.append(f"{loc}={_short(err.get('input'))} is invalid: {err['msg'].rstrip('.').lower()}")
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------- method configs
@functools.lru_cache(maxsize=None)
def field_model(cls: type) -> type[BaseModel]:
    """A strict pydantic model of the dataclass ``cls``'s fields, from its annotations."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: (hints[f.name], ...) for f in dataclasses.fields(cls)}
    return create_model(f"{cls.__name__}Fields", __config__=STRICT, **fields)


def check_config_fields(config, where: str) -> None:
    """ConfigError unless every field of the config dataclass ``config`` has its
    declared type, with finite numbers."""
    cls = type(config)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name)
        if isinstance(value, tuple):  # a tuple where a list is declared is the same thing in Python
            value = list(value)
            setattr(config, f.name, value)
        values[f.name] = value
    try:
        field_model(cls).model_validate(values)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_errors(e)}") from None


# ---------------------------------------------------------------------- files
class Fingerprint(BaseModel):
    model_config = STRICT
    model_type: str | None = None
    class_: str | None = Field(default=None, alias="class")
    num_parameters: int = Field(ge=0)
    structure_sha256: str
    weights_sha256: str


class NativeMeta(BaseModel):
    """``polyadapter.json``. ``config`` is checked by its method's own field model."""

    model_config = STRICT
    format: Literal["polyadapter-adapter"]
    format_version: int = Field(ge=1)
    library_version: str
    name: str
    config: dict[str, Any]
    sites: list[str]
    modules_to_save: list[str] = []
    num_parameters: int = Field(default=0, ge=0)
    base_model: Fingerprint | Annotated[dict[str, Any], Field(max_length=0)] = {}  # {}: converted without a base
    provenance: dict[str, Any] = {}
    packing: str | None = None


Strings = str | list[str] | None


class PeftFields(BaseModel):
    """The fields of PEFT's ``adapter_config.json`` that we read, by type. Other fields
    pass here (PEFT adds fields in every release, mostly at neutral defaults); the PEFT
    reader refuses any of them that is set to something we cannot represent."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    peft_type: str
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    peft_version: str | None = None
    r: int = Field(default=8, ge=1)
    lora_alpha: float = 8
    lora_dropout: float | None = Field(default=0.0, ge=0, lt=1)
    use_rslora: bool = False
    target_modules: Strings = None
    modules_to_save: Strings = None
    exclude_modules: Strings = None
    feedforward_modules: Strings = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: Strings = None
    rank_pattern: dict[str, typing.Annotated[int, Field(ge=1)]] | None = None
    alpha_pattern: dict[str, float] | None = None
    init_lora_weights: bool | str = True
    use_dora: bool = False
    bias: str | None = "none"
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    inference_mode: bool = True


def check_file(model: type[BaseModel], data: dict, where: str) -> BaseModel:
    """``data`` validated by ``model``, or a LoadError naming the file and the fields."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise LoadError(f"{where}: {describe_errors(e)}") from None


def finite_or_text(value):
    """``value`` with every non-finite float replaced by its text ("nan", "inf"), so the
    JSON we write stays strict JSON (which has no NaN) and reads back."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_or_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_text(v) for v in value]
    return value
