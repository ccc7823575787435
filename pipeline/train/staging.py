"""Host-memory snapshots of checkpoint state dicts, for saves written in the background.

A snapshot must not change when training goes on (the next step updates weights, moments and the
optimizer's ``lr`` in place), so every tensor is copied and every container rebuilt. The copies
go into buffers kept from one save to the next: a fresh allocation pays a page fault per 4 KiB
page, several times the copy itself on a VM (bench/train.py measures the blocked time), and
torchtitan's asynchronous checkpointing keeps its pinned staging memory for the same reason. The
cost is host memory equal to this rank's checkpoint shards for the whole run (`--dry-run` plans it).

Tensors that share a storage (views into DeepSpeed's flat buffers) share one copied storage, with
the same offsets and strides, so ``torch.save`` of the snapshot writes the bytes it would have
written for the original.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class HostStaging:
    """Reusable host buffers, one per (file name, n-th storage in it); see the module docstring."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], torch.UntypedStorage] = {}

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(b.nbytes() for b in self._buffers.values())

    def snapshot(self, obj: Any, name: str) -> Any:
        """A copy of ``obj`` (a state dict for the file ``name``) that training cannot change.

        The previous snapshot for ``name`` must be written by now: its buffers are reused.
        """
        return self._copy(obj, name, {})

    def _copy(self, obj: Any, name: str, storages: dict[int, torch.UntypedStorage]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, name, storages)
        if isinstance(obj, dict):
            out = copy.copy(obj)  # keeps the type (OrderedDict, defaultdict and its factory)
            for k, v in obj.items():
                out[k] = self._copy(v, name, storages)
            return out
        if type(obj) in (list, tuple):
            return type(obj)(self._copy(v, name, storages) for v in obj)
        return copy.deepcopy(obj)  # numbers, strings, torch.Size, config objects

    def _tensor(self, t: torch.Tensor, name: str, storages: dict[int, torch.UntypedStorage]) -> torch.Tensor:
        assert type(t) in (torch.Tensor, torch.nn.Parameter), f"cannot stage a {type(t).__name__} in {name}"
        src = t.untyped_storage()
        dst = storages.get(_storage_key(src))
        if dst is None:
            slot = (name, len(storages))
            dst = self._buffers.get(slot)
            if dst is None or dst.nbytes() != src.nbytes():
                dst = torch.UntypedStorage(src.nbytes())
                if src.device.type == "cuda":
                    dst = dst.pin_memory()  # device-to-host copies at full speed
                self._buffers[slot] = dst
            dst.copy_(src)
            storages[_storage_key(src)] = dst
        out = torch.empty(0, dtype=t.dtype).set_(dst, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
        elif t.requires_grad:
            out.requires_grad_(True)
        out.__dict__.update(copy.deepcopy(t.__dict__))  # attributes torch.save keeps (none in DeepSpeed's today)
        return out


def _storage_key(storage: torch.UntypedStorage) -> tuple[str, int, int]:
    """A storage's identity from public API: two live storages never share an address (empty ones
    may, and they hold nothing to share), so tensors viewing one storage stay views of one copy."""
    return str(storage.device), storage.data_ptr(), storage.nbytes()
