"""The fields every method's config shares, and JSON (de)serialisation with checks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import ConfigError


@dataclass
class AdapterConfig:
    """Shared fields. ``targets``: module-name patterns (see ``sites.py``); ``None``
    takes the preset for the model's family. ``modules_to_save``: patterns of modules
    (e.g. a task head) trained in full and saved with the adapter."""

    method: ClassVar[str] = ""
    targets: list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        for key in ("targets", "modules_to_save"):
            value = getattr(self, key)
            if value is not None:
                value = list(value)
                setattr(self, key, value)
                self.require(all(isinstance(p, str) and p for p in value), key, "a list of non-empty strings")
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise through :meth:`require`."""

    def require(self, ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(
                f"{self.method} config: {key}={getattr(self, key)!r} is invalid; expected {expected}"
            )

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


def config_from_dict(data: dict, where: str = "config") -> AdapterConfig:
    """Build a method config from a JSON-like dict, refusing unknown methods and keys."""
    from .methods import METHODS

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {type(data).__name__}")
    data = dict(data)
    method = data.pop("method", None)
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}; known methods: {sorted(METHODS)}")
    cls = METHODS[method].config_cls
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for method {method!r}; allowed: {sorted(allowed)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
