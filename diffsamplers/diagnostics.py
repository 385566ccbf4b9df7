"""Counting the operations that make the host wait for the device.

A CUDA host–device synchronisation happens when a value computed on the GPU is needed on the CPU
(``.item()``, ``bool(tensor)``, ``.tolist()``, ``nonzero()``, a ``.cpu()`` copy, …). :class:`HostReadCounter`
intercepts those operations at the dispatcher, on any device, so a CPU test can prove that a loop would
not synchronise on a GPU. On CUDA, ``torch.cuda.set_sync_debug_mode`` gives the real count as well
(:func:`count_cuda_syncs`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReadCounter", "count_cuda_syncs"]

# aten ops whose result needs device data on the host.
_HOST_READS = {
    "aten::_local_scalar_dense",  # .item(), float(t), bool(t), if t: ...
    "aten::nonzero",  # data-dependent output shape
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::equal",
    "aten::is_nonzero",
}


class HostReadCounter(TorchDispatchMode):
    """Context manager counting device→host reads (see module docstring).

    ``device_type`` restricts the count to ops on tensors of that device type (``None``: any device);
    copies to the CPU from that device count too.
    """

    def __init__(self, device_type: str | None = None):
        super().__init__()
        self.device_type = device_type
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _on_device(self, args: Any) -> bool:
        if self.device_type is None:
            return True
        flat = torch.utils._pytree.tree_leaves(args)
        return any(isinstance(a, torch.Tensor) and a.device.type == self.device_type for a in flat)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _HOST_READS and self._on_device(args):
            self.counts[name] += 1
        elif name in ("aten::_to_copy", "aten::copy_") and self.device_type not in (None, "cpu"):
            src = args[1] if name == "aten::copy_" else args[0]
            dst_device = kwargs.get("device") if name == "aten::_to_copy" else args[0].device
            if (
                isinstance(src, torch.Tensor)
                and src.device.type == self.device_type
                and dst_device is not None
                and torch.device(dst_device).type == "cpu"
            ):
                self.counts["device-to-host copy"] += 1
        return func(*args, **kwargs)


def count_cuda_syncs(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` with CUDA sync debugging on; returns (result, number of synchronising calls)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return result, syncs
