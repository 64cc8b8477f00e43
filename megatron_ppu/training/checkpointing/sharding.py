"""Replica-state sharding: state identical on a replica's inner-DP ranks, written once.

The inner-DP ranks of a replica hold identical copies of the replica's local weights, the
DiLoCo snapshot θ(t) and outer momentum, and (without ``--use-distributed-optimizer``) the
inner optimizer state. Writing every copy would multiply a checkpoint's size by ``inner_dp``.
This module owns the split: :func:`shard_state` flattens the tensors of such a state per dtype
(a fixed order), splits each concatenation into ``inner_dp`` equal shares and keeps this rank's
share (with the state's structure, its "skeleton", and the tensors' shapes);
:func:`unshard_state` all-gathers the shares inside the replica
(``ReplicaLayout.inner_dp_group``, fast links) and rebuilds the state. Which state is
replica-shared and which is a rank's own is :mod:`.save_load`'s decision; the shares travel in
the rank files that :mod:`.format` describes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .verdicts import CheckpointError


@dataclass(frozen=True)
class _TensorRef:
    # The rank files pickle the skeleton, and with it this class by its module's name: keep the name
    # the files have held since format 2 (the package re-exports it), so that checkpoints written
    # before and after the package split read alike.
    __module__ = "megatron_ppu.training.checkpointing"
    index: int


def _strip(obj, tensors: list):
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach())
        return _TensorRef(len(tensors) - 1)
    if isinstance(obj, dict):
        return type(obj)((k, _strip(v, tensors)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj, tensors: list):
    if isinstance(obj, _TensorRef):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return type(obj)((k, _fill(v, tensors)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def _dtype_groups(meta: List[Tuple[str, tuple]]) -> Dict[str, List[int]]:
    groups: Dict[str, List[int]] = {}
    for i, (dt, _) in enumerate(meta):
        groups.setdefault(dt, []).append(i)
    return dict(sorted(groups.items()))


def shard_state(state, group) -> dict:
    """This rank's share of ``state`` (identical on every rank of ``group``).

    The tensors are flattened and concatenated per dtype (a fixed order), and each
    concatenation is split into ``len(group)`` equal parts; rank i of ``group`` keeps
    part i (copied to host memory). :func:`unshard_state` puts the shares back together.
    """
    tensors: list = []
    skeleton = _strip(state, tensors)
    parts = dist.get_world_size(group) if group is not None else 1
    index = dist.get_rank(group) if group is not None else 0
    meta = [(str(t.dtype).replace("torch.", ""), tuple(t.shape)) for t in tensors]
    pieces = {}
    for dt, members in _dtype_groups(meta).items():
        n = sum(tensors[i].numel() for i in members)
        chunk = math.ceil(n / parts)
        lo, hi = index * chunk, min(n, (index + 1) * chunk)
        out, off = [], 0
        for i in members:
            t = tensors[i]
            a, b = max(lo, off), min(hi, off + t.numel())
            if a < b:
                out.append(t.reshape(-1)[a - off:b - off].to("cpu"))
            off += t.numel()
        pieces[dt] = torch.cat(out) if out else torch.empty(0, dtype=getattr(torch, dt))
    return {"skeleton": skeleton, "meta": meta, "parts": parts, "index": index, "pieces": pieces}


def unshard_state(shard: dict, group):
    """Collective over ``group``: all-gather the shares written by :func:`shard_state`
    and return the whole state (host tensors)."""
    parts = dist.get_world_size(group) if group is not None else 1
    index = dist.get_rank(group) if group is not None else 0
    if shard["parts"] != parts or shard["index"] != index:
        raise CheckpointError(f"the replica state was split over {shard['parts']} inner-DP ranks "
                              f"(this share: {shard['index']}), this run has {parts} (this rank: {index}).")
    meta = shard["meta"]
    tensors: List[Optional[torch.Tensor]] = [None] * len(meta)
    for dt, members in _dtype_groups(meta).items():
        dtype = getattr(torch, dt)
        n = sum(math.prod(meta[i][1]) for i in members)
        chunk = math.ceil(n / parts)
        mine = shard["pieces"][dt].reshape(-1)
        if parts > 1:
            pad = torch.zeros(chunk, dtype=dtype)
            pad[:mine.numel()] = mine
            raw = pad.view(torch.uint8) if dtype != torch.bool else pad.to(torch.uint8)
            gathered = [torch.empty_like(raw) for _ in range(parts)]
            dist.all_gather(gathered, raw, group=group)
            flat = torch.cat([g.view(dtype) if dtype != torch.bool else g.bool() for g in gathered])[:n]
        else:
            flat = mine
        off = 0
        for i in members:
            k = math.prod(meta[i][1])
            tensors[i] = flat[off:off + k].clone().view(meta[i][1])
            off += k
    return _fill(shard["skeleton"], tensors)

