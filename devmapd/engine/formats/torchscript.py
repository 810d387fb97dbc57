"""Recognise TorchScript archives (torch.jit.save): zips with constants.pkl and a code/ folder.

They hold code as well as weights, so devmapd refuses them and says to use torch.jit.load.
"""
from __future__ import annotations

from collections.abc import Iterable


def is_torchscript(names: Iterable[str]) -> bool:
    for name in names:
        _, _, rest = name.partition("/")
        if rest == "constants.pkl" or rest.startswith("code/"):
            return True
    return False
