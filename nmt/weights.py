"""Copies derived from a model's weights (packed for oneDNN, transposed), each kept until its weights change."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


def version_key(weights: Iterable[torch.Tensor | None]) -> tuple | None:
    """What identifies these tensors' current values: each one's storage and in-place version (an optimizer step, a
    load_state_dict, .to() change one or the other; a write through .data does not, as for autograd). None when one
    is an inference tensor (made under torch.inference_mode), which keeps no version counter."""
    key = []
    for w in weights:  # a plain loop: this runs a few times a decoding step
        if w is None:
            key.append(None)
        elif w.is_inference():
            return None
        else:
            key.append((w.data_ptr(), w._version))
    return tuple(key)


class WeightCache(Generic[T]):
    """Derived copies by name, each made again once the weights it was made from change (see version_key); those of
    inference tensors, which cannot tell, are made at every use."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple, T]] = {}

    def get(self, name: Hashable, weights: Iterable[torch.Tensor | None], make: Callable[[], T]) -> T:
        """The copy named so, made with make() unless the one kept was made from these weights as they are now."""
        key = version_key(weights)
        if key is None:
            return make()
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            entry = self._entries[name] = key, make()
        return entry[1]

    def cached(self, name: Hashable) -> T | None:
        """The copy kept under this name, if any."""
        entry = self._entries.get(name)
        return None if entry is None else entry[1]

    def clear(self) -> None:
        self._entries.clear()
