"""polyadapter: parameter-efficient, modular transfer learning on any PyTorch model."""
from ._version import __version__  # noqa: F401
from .compose import Average, BatchSplit, Fuse, Parallel, Stack  # noqa: E402
from .config import AdapterConfig  # noqa: E402
from .errors import (  # noqa: E402
    AdapterNameError,
    ConfigError,
    LoadError,
    PolyAdapterError,
    ShapeMismatchError,
    StateError,
    TargetError,
    UnsafeFileError,
)
from .methods import METHODS, config_from_dict  # noqa: E402
from .methods.arrow import ArrowConfig  # noqa: E402
from .methods.basis import BasisConfig, BasisLoraConfig  # noqa: E402
from .methods.bottleneck import BottleneckConfig  # noqa: E402
from .methods.fusion import FusionConfig  # noqa: E402
from .methods.ia3 import IA3Config  # noqa: E402
from .methods.lora import LoraConfig  # noqa: E402
from .methods.poly import PolyConfig  # noqa: E402
from .methods.prompt import PromptConfig  # noqa: E402
from .methods.sparse import SparseConfig  # noqa: E402
from .model import AdapterModel  # noqa: E402


def wrap(model) -> AdapterModel:
    """Wrap a frozen base model so adapters can be added to it."""
    return AdapterModel(model)


__all__ = [
    "AdapterModel", "wrap", "AdapterConfig", "LoraConfig", "IA3Config", "BottleneckConfig",
    "PromptConfig", "SparseConfig", "FusionConfig", "ArrowConfig", "PolyConfig", "BasisConfig", "BasisLoraConfig",
    "Stack", "Parallel", "Fuse", "Average", "BatchSplit",
    "config_from_dict", "METHODS",
    "PolyAdapterError", "ConfigError", "TargetError", "AdapterNameError", "LoadError",
    "ShapeMismatchError", "UnsafeFileError", "StateError",
]
