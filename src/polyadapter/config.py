"""The fields every method's config shares, checked by type (``validate.py``) and by rule.

``methods.config_from_dict`` builds a config of any method from a JSON-like dict."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import ConfigError
from .validate import check_config_fields


# Softmax temperatures (fusion, Arrow routing): far below this the scores divided by
# it overflow to inf and softmax returns NaN (large ones only make the weights uniform).
MIN_TEMPERATURE = 1e-3


@dataclass
class AdapterConfig:
    """Shared fields. ``targets``: module-name patterns (see ``sites.py``); ``None``
    takes the preset for the model's family. ``modules_to_save``: patterns of modules
    (e.g. a task head) trained in full and saved with the adapter."""

    method: ClassVar[str] = ""
    # Fields holding module-name patterns (lists, or dicts keyed by pattern); their
    # ``re:`` patterns are compiled up front so a bad regex fails here, not mid-install.
    pattern_fields: ClassVar[tuple[str, ...]] = ("targets", "modules_to_save")
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
        self.require(self.targets is None or len(self.targets) > 0, "targets",
                     "a non-empty list of module-name patterns, or None for the model family's preset")
        check_config_fields(self, where=f"{self.method} config")  # types and finite numbers, every field
        for key in self.pattern_fields:
            for pattern in getattr(self, key, None) or ():
                if isinstance(pattern, str) and pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as e:
                        raise ConfigError(f"{self.method} config: {key} pattern {pattern!r} is not a valid "
                                          f"regular expression: {e}") from None
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
