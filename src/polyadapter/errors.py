"""One exception family. Every message names what was wrong and where."""


class PolyAdapterError(Exception):
    """Base of every error polyadapter raises on purpose."""


class ConfigError(PolyAdapterError, ValueError):
    """A method config has an unknown key, a bad value, or an unknown method."""


class TargetError(PolyAdapterError, ValueError):
    """A target pattern matched nothing, or matched modules a method cannot act on."""


class AdapterNameError(PolyAdapterError, LookupError):
    """An adapter name is unknown, already taken, or not a valid name."""


class LoadError(PolyAdapterError):
    """An adapter file or folder cannot be loaded; nothing was changed."""


class ShapeMismatchError(LoadError):
    """A tensor in an adapter file does not fit the base model."""


class UnsafeFileError(LoadError):
    """A pickle-based file was offered; polyadapter never unpickles."""


class StateError(PolyAdapterError, RuntimeError):
    """An operation does not fit the adapter's current state (e.g. training a merged adapter)."""
