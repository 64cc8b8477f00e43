"""Subnetwork data parallelism (SDP): block- and neuron-level ownership plans.

Generalises PPU's ownership machinery (seed paper "Model Parallelism With Subnetwork
Data Parallelism"): each replica trains a structured subnetwork, every parameter is
held by the same number of replicas, and parameters are synchronised among their
holders only, either every step (SDP) or every H steps through the DiLoCo outer loop
(the count vector m of Algorithm 1 is "number of holders").

Plans (``--subnet-plan``):

* ``ppu``: PPU, the neuron-level plan with backward masking (:mod:`megatron_ppu.layers`).
* ``neurons``: the same MLP hidden-unit slices, with ``--subnet-masking forward``:
  in training the hidden units a replica does not own are dropped from its forward
  pass too, and the MLP output is multiplied by N (inverted-dropout scaling, so its
  expected magnitude matches the full MLP's); evaluation uses the full MLP unscaled.
* ``blocks``: each replica holds ``b = coverage x L`` of the L transformer blocks;
  every block is held by ``c = K b / L`` replicas. The assignment is a seeded random
  permutation of the blocks cut into K cyclic windows of b, which makes both counts
  exact. With ``backward`` masking a block the replica does not hold runs in the
  forward pass (its input Jacobian stays in the backward pass) but its weights get no
  gradient; with ``forward`` masking it is skipped entirely (the residual stream passes
  through), costing no FLOPs at all. Either way it holds no gradient buffer and no
  optimizer state there. The weights are still stored on every replica, so that
  every replica can evaluate (and checkpoint) the full model.

The assignment is fixed for the whole run. Re-drawing it per step or per round is not
implemented: it would require every replica to keep optimizer state for every block
(giving up the memory saving) or to move optimizer state between replicas at each
re-draw.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubnetConfig:
    """Attributes:
        plan: "ppu", "neurons" or "blocks".
        masking: "backward" (full forward, sparse backward) or "forward" (non-held part
            skipped in the forward pass too).
        coverage: blocks plan: fraction of the transformer blocks each replica holds.
        sync: "outer" (every H steps through DiLoCo) or "step" (SDP: every step).
        seed: seed of the block assignment.
    """

    plan: str = "ppu"
    masking: str = "backward"
    coverage: float = 1.0
    sync: str = "outer"
    seed: int = 0


def validate_subnet_config(cfg: SubnetConfig, *, num_slices: int, num_replicas: int, num_layers: int) -> None:
    """Raise ``ValueError`` naming the fix for an unusable plan."""
    if cfg.plan not in ("ppu", "neurons", "blocks"):
        raise ValueError(f"--subnet-plan must be ppu, neurons or blocks, got {cfg.plan!r}.")
    if cfg.masking not in ("backward", "forward"):
        raise ValueError(f"--subnet-masking must be backward or forward, got {cfg.masking!r}.")
    if cfg.sync not in ("outer", "step"):
        raise ValueError(f"--subnet-sync must be outer or step, got {cfg.sync!r}.")
    if cfg.plan == "ppu" and cfg.masking != "backward":
        raise ValueError("--subnet-plan ppu is backward masking by definition; use --subnet-plan neurons "
                         "for forward-masked MLP slices.")
    if cfg.plan == "neurons":
        if cfg.masking != "forward":
            raise ValueError("--subnet-plan neurons with backward masking is PPU: use --subnet-plan ppu.")
        if num_slices < 2:
            raise ValueError("--subnet-plan neurons needs --ppu-slices N > 1 (each replica keeps 1/N of the units).")
    if cfg.plan == "blocks":
        if num_slices != 1:
            raise ValueError("--subnet-plan blocks does not combine with --ppu-slices > 1; use one plan.")
        block_assignment(num_replicas, num_layers, cfg.coverage, cfg.seed)  # raises if unbalanced
    elif cfg.coverage != 1.0:
        raise ValueError("--subnet-coverage applies to --subnet-plan blocks only (neurons/ppu: 1/--ppu-slices).")


def block_assignment(num_replicas: int, num_layers: int, coverage: float, seed: int) -> List[List[int]]:
    """Blocks (0-based global layer indices) held by each replica; balanced and reproducible.

    Raises ``ValueError`` unless every replica holds the same number b >= 1 of blocks
    and every block the same number c >= 1 of holders (K b = L c).
    """
    K, L = num_replicas, num_layers
    b_exact = coverage * L
    b = int(round(b_exact))
    if not 0 < coverage <= 1 or abs(b_exact - b) > 1e-9 or b < 1:
        raise ValueError(
            f"--subnet-coverage {coverage} x {L} layers must be a whole number >= 1 of blocks per "
            f"replica; use a multiple of 1/{L} (e.g. {', '.join(f'{i}/{L}' for i in range(1, L + 1))})."
        )
    if (K * b) % L:
        raise ValueError(
            f"{K} replicas holding {b} of {L} blocks each cannot hold every block the same number of "
            f"times (K*b = {K * b} is not a multiple of L = {L}); change --subnet-coverage or the "
            f"number of replicas."
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(L, generator=g).tolist()
    return [sorted(perm[(k * b + j) % L] for j in range(b)) for k in range(K)]


def holders_per_block(assignment: Sequence[Sequence[int]], num_layers: int) -> List[int]:
    counts = [0] * num_layers
    for blocks in assignment:
        for i in blocks:
            counts[i] += 1
    return counts


def _skip_forward(self, hidden_states, *args, **kwargs):
    # A block this replica does not hold: the residual stream passes through unchanged.
    return hidden_states, kwargs.get("context")


def apply_block_plan(model: torch.nn.Module, held: Sequence[int], masking: str) -> int:
    """Freeze (backward masking) or skip (forward masking) the transformer layers of
    ``model`` whose global index is not in ``held``. Returns the number of layers masked
    on this pipeline stage."""
    held = set(held)
    masked = 0
    for layer in model.decoder.layers:
        idx = layer.layer_number - 1  # megatron numbers layers globally from 1
        if idx in held:
            continue
        for p in layer.parameters():
            p.requires_grad_(False)
        if masking == "forward":
            layer.forward = types.MethodType(_skip_forward, layer)
        masked += 1
    return masked


def block_holders_fn(assignment: Sequence[Sequence[int]], num_layers: int, num_replicas: int,
                     layer_offset: int = 0) -> Callable[[str], int]:
    """``owners(name)`` for :func:`megatron_ppu.ownership.build_ownership_plan`: the number of
    replicas holding a parameter (its block's holders, or K outside the blocks)."""
    counts = holders_per_block(assignment, num_layers)

    def owners(name: str) -> int:
        if "decoder.layers." in name:
            local = int(name.split("decoder.layers.")[1].split(".")[0])
            return counts[layer_offset + local]
        return num_replicas

    return owners


class SubnetGradSync:
    """Per-step SDP gradient synchronisation: every parameter's gradient becomes the mean
    over the replicas that hold it of their local gradients.

    Implemented as one masked all-reduce (SUM) over the replica group of the full-layout
    gradients (zeros where this replica holds nothing), divided elementwise by the
    number of holders m. Call after the backward pass (after Megatron's
    ``finalize_model_grads``) and before ``optimizer.step()``.
    """

    def __init__(self, model: torch.nn.Module, plan, replica_group):
        self.plan = plan
        self.group = replica_group
        self.model = model
        self.entries = []  # (name, split-or-None, param parts, owners)
        modules = dict(model.named_modules())
        for name, own in plan.params.items():
            mod_name, _, attr = name.rpartition(".")
            module = modules[mod_name]
            split = getattr(module, "ppu_splits", {}).get(attr)
            parts = [split.owned_param(module), split.frozen_param(module)] if split else [getattr(module, attr)]
            self.entries.append((name, split, parts, own.owners))
        self.bytes_last = 0

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        return g if g is not None and p.requires_grad else torch.zeros_like(p, dtype=torch.float32)

    def sync(self) -> int:
        """Average gradients over holders in place; returns the payload bytes sent."""
        fulls = []
        for name, split, parts, owners in self.entries:
            gs = [self._grad(p).float() for p in parts]
            fulls.append(split.layout.assemble(gs[0], gs[1], split.dim) if split else gs[0])
        flat = torch.cat([f.reshape(-1) for f in fulls])
        if dist.get_world_size(self.group) > 1:
            dist.all_reduce(flat, group=self.group)
        off = 0
        for (name, split, parts, owners), full in zip(self.entries, fulls):
            n = full.numel()
            avg = flat[off:off + n].view_as(full) / max(owners, 1)
            off += n
            values = split.layout.split(avg, split.dim) if split else (avg,)
            for p, v in zip(parts, values):
                if not p.requires_grad:
                    continue
                g = getattr(p, "main_grad", None)
                target = g if g is not None else p.grad
                target.copy_(v.to(target.dtype))
        self.bytes_last = flat.numel() * flat.element_size()
        return self.bytes_last
