"""Modules trained in full and saved with an adapter (PEFT's ``modules_to_save``),
e.g. a classification head. The adapter's copy replaces the module at its site while
the adapter is active; the original stays untouched for every other adapter."""
from __future__ import annotations

import copy

from torch import nn


class ModuleCopy(nn.Module):
    replaces_base = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(base)
