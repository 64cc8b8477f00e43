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
  gradient; with ``forward`` masking it is skipped entirely in training (the residual
  stream passes through), costing no FLOPs at all, and evaluation runs the full model
  (as LayerDrop does, without rescaling). Either way it holds no gradient buffer and no
  optimizer state there. The weights are still stored on every replica, so that
  every replica can evaluate (and checkpoint) the full model.

The assignment is fixed for the whole run. Re-drawing it per step or per round is not
implemented: it would require every replica to keep optimizer state for every block
(giving up the memory saving) or to move optimizer state between replicas at each
re-draw.

This module holds the plans; the per-step synchronisation among holders is
:class:`megatron_ppu.sync.sdp.SDPSync`, the synchronisation every H steps is
:class:`megatron_ppu.sync.diloco.DiLoCoSync`.
"""
from __future__ import annotations

from typing import Callable, FrozenSet, List, Sequence

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from .config import SubnetConfig, check_block_balance, validate_subnet_config
from .ownership import layer_index

__all__ = ["SubnetConfig", "validate_subnet_config", "MaskableTransformerLayer", "block_assignment",
           "block_holder_sets", "holders_per_block", "apply_block_plan", "block_holders_fn"]


class MaskableTransformerLayer(TransformerLayer):
    """Megatron's ``TransformerLayer`` that the blocks plan can mask in the forward pass
    (the layer class of :func:`megatron_ppu.spec.get_gpt_layer_ppu_spec`).

    After :meth:`skip_in_training`, in training the residual stream passes through unchanged
    (no FLOPs, no activations); in evaluation the block runs, so every replica evaluates the
    full model (LayerDrop-style: no rescaling of the kept blocks). Unmasked, it is Megatron's
    layer exactly."""

    _ppu_skip_in_training = False

    def skip_in_training(self) -> None:
        """Forward masking of this block (see the class docstring)."""
        self._ppu_skip_in_training = True

    def forward(self, *args, **kwargs):
        if self._ppu_skip_in_training and self.training:
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return hidden_states, kwargs.get("context")
        return super().forward(*args, **kwargs)


def block_assignment(num_replicas: int, num_layers: int, coverage: float, seed: int) -> List[List[int]]:
    """Blocks (0-based global layer indices) held by each replica; balanced and reproducible.

    Raises ``ValueError`` unless every replica holds the same number b >= 1 of blocks
    and every block the same number c >= 1 of holders (K b = L c).
    """
    K, L = num_replicas, num_layers
    b = check_block_balance(K, L, coverage)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(L, generator=g).tolist()
    return [sorted(perm[(k * b + j) % L] for j in range(b)) for k in range(K)]


def block_holder_sets(assignment: Sequence[Sequence[int]], num_layers: int) -> List[FrozenSet[int]]:
    """For every block (global layer index), the set of replicas that hold it."""
    sets: List[set] = [set() for _ in range(num_layers)]
    for k, blocks in enumerate(assignment):
        for i in blocks:
            sets[i].add(k)
    return [frozenset(x) for x in sets]


def holders_per_block(assignment: Sequence[Sequence[int]], num_layers: int) -> List[int]:
    """For every block, the number of replicas that hold it."""
    return [len(s) for s in block_holder_sets(assignment, num_layers)]


def apply_block_plan(model: torch.nn.Module, held: Sequence[int], masking: str) -> int:
    """Freeze (backward masking) or skip in training (forward masking) the transformer
    layers of ``model`` whose global index is not in ``held``. Returns the number of
    layers masked on this pipeline stage."""
    held = set(held)
    masked = 0
    for layer in model.decoder.layers:
        idx = layer.layer_number - 1  # megatron numbers layers globally from 1
        if idx in held:
            continue
        for p in layer.parameters():
            p.requires_grad_(False)
        if masking == "forward":
            assert isinstance(layer, MaskableTransformerLayer), (
                f"forward masking needs megatron_ppu's layer spec, got {type(layer).__name__}")
            layer.skip_in_training()
        masked += 1
    return masked


def block_holders_fn(assignment: Sequence[Sequence[int]], num_layers: int, num_replicas: int,
                     layer_offset: int = 0) -> Callable[[str], FrozenSet[int]]:
    """``holders(name)``: the replicas holding a parameter of this pipeline stage (named as in
    its ``state_dict``): its block's holders, or all K outside the blocks. ``layer_offset`` is
    the global index of the stage's first layer. ``len(holders(name))`` is the ``owners_fn`` of
    :func:`megatron_ppu.ownership.build_ownership_plan`."""
    sets = block_holder_sets(assignment, num_layers)
    everyone = frozenset(range(num_replicas))

    def holders(name: str) -> FrozenSet[int]:
        local = layer_index(name)
        return everyone if local is None else sets[layer_offset + local]

    return holders
