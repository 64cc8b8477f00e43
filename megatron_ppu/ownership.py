"""Who owns what: slice geometry and the per-rank ownership plan.

Vocabulary (paper §2.2, Algorithm 1):

* K replicas (DiLoCo "nodes"), N slices, K % N == 0. Replica k trains slice
  ``n = k mod N``; each slice is therefore trained by K/N replicas.
* A *sliced* weight is cut along one dimension of its **tensor-parallel shard**
  into N equal parts (so every TP rank of replica k trains slice n of its own
  shard; globally the owned set is the union over TP ranks, still 1/N of the
  weight). The cut is:

  ========================  =====  =====================================================
  weight (local shard)      dim    slice n of the shard
  ========================  =====  =====================================================
  ``mlp.linear_fc1.weight`` 0      rows ``[n*f, (n+1)*f)`` of the ffn/TP hidden units,
  ``[F, d]`` or ``[2F, d]``        ``f = F/N``; with SwiGLU the same rows of the gate
                                   half *and* of the up half (rows ``F + [n*f, (n+1)*f)``)
  ``mlp.linear_fc1.bias``   0      as the weight's rows
  ``mlp.linear_fc2.weight`` 1      columns ``[n*f, (n+1)*f)`` (the same hidden units)
  ``self_attention.         0      the rows of query groups ``[n*g, (n+1)*g)``, ``g = G/N``
  linear_qkv.weight``              where G is the query groups per TP rank (= heads for
  ``[G*(q+2)*hd, d]``              MHA); megatron stores each group's Q heads, K and V
                                   contiguously, so slice n is one contiguous row block
  ``linear_qkv.bias``       0      as the weight's rows
  ========================  =====  =====================================================

  Everything else (embeddings, norms, W_O = ``linear_proj``, fc2's bias, the
  output layer) is not sliced and is trained by every replica. (The paper's
  negative control ``slice_attention_output`` also cuts ``linear_proj.weight``
  along dim 1: the columns of the heads of query groups ``[n*g, (n+1)*g)``.)
* The count vector m of Algorithm 1: ``m[i] = K/N`` for every element of a sliced
  weight (each element belongs to exactly one slice, and each slice has K/N
  owners) and ``m[i] = K`` for every element of an unsliced weight. It is
  therefore constant per parameter, which :class:`ParamOwnership` records as
  ``owners``.

The :class:`OwnershipPlan` is built from a constructed model by
:func:`build_ownership_plan`; it is keyed by the names of ``model.state_dict()``
(Megatron's full layout), whatever the internal owned/frozen split of a layer. It is the
one place that answers, for a full-layout parameter name, which tensors hold it
(:meth:`OwnershipPlan.tensors`: module, attribute(s), split), which index ranges a replica
owns (:meth:`OwnershipPlan.owned_ranges`) and which transformer layer it belongs to
(:func:`layer_index`); the synchronisers, the benchmarks and the tests ask it instead of
reading the layers' storage. A module that stores parameters split is a
:class:`SlicedModule` (the partial linears of :mod:`megatron_ppu.layers` are), so this
module needs nothing from the layers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch.nn import Parameter

Range = Tuple[int, int]

#: A transformer layer's parameters are named ``...decoder.layers.<i>.`` (i: the layer's index
#: on this pipeline stage), in ``state_dict`` and ``named_parameters`` alike.
_LAYER_RE = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.")


def layer_index(name: str) -> Optional[int]:
    """The transformer layer (index on this pipeline stage) of parameter ``name``; None for the
    parameters outside the layers (embeddings, final norm, output layer)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class SliceLayout:
    """Owned/frozen index ranges along one dimension of length ``size``.

    ``owned`` ranges are sorted and disjoint. The owned tensor stores the owned
    ranges concatenated in order; the frozen tensor stores the complement in order.
    """

    size: int
    owned: Tuple[Range, ...]

    def __post_init__(self):
        prev = 0
        for s, e in self.owned:
            assert prev <= s < e <= self.size, f"bad owned ranges {self.owned} for size {self.size}"
            prev = e

    @property
    def frozen(self) -> Tuple[Range, ...]:
        out, prev = [], 0
        for s, e in self.owned:
            if s > prev:
                out.append((prev, s))
            prev = e
        if prev < self.size:
            out.append((prev, self.size))
        return tuple(out)

    @property
    def owned_size(self) -> int:
        return sum(e - s for s, e in self.owned)

    @property
    def frozen_size(self) -> int:
        return self.size - self.owned_size

    def pieces(self) -> Iterator[Tuple[bool, int, int]]:
        """Yield ``(is_owned, offset_in_its_tensor, length)`` in index order."""
        events = [(s, e, True) for s, e in self.owned] + [(s, e, False) for s, e in self.frozen]
        off = {True: 0, False: 0}
        for s, e, owned in sorted(events):
            yield owned, off[owned], e - s
            off[owned] += e - s

    def assemble(self, owned: torch.Tensor, frozen: torch.Tensor, dim: int) -> torch.Tensor:
        """Inverse of :meth:`split`: interleave owned and frozen parts along ``dim``."""
        if self.frozen_size == 0:
            return owned
        if self.owned_size == 0:
            return frozen
        parts = [(owned if o else frozen).narrow(dim, off, n) for o, off, n in self.pieces()]
        return torch.cat(parts, dim=dim)

    def split(self, full: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return contiguous copies ``(owned, frozen)`` of ``full`` along ``dim``."""
        assert full.shape[dim] == self.size, (full.shape, dim, self.size)
        o = [full.narrow(dim, s, e - s) for s, e in self.owned]
        f = [full.narrow(dim, s, e - s) for s, e in self.frozen]
        empty = full.narrow(dim, 0, 0)
        owned = torch.cat(o, dim=dim) if o else empty.clone()
        frozen = torch.cat(f, dim=dim) if f else empty.clone()
        return owned.contiguous(), frozen.contiguous()

    def take_owned(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if len(self.owned) == 1:
            s, e = self.owned[0]
            return t.narrow(dim, s, e - s)
        return torch.cat([t.narrow(dim, s, e - s) for s, e in self.owned], dim=dim)

    def take_frozen(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        fr = self.frozen
        if len(fr) == 1:
            s, e = fr[0]
            return t.narrow(dim, s, e - s)
        return torch.cat([t.narrow(dim, s, e - s) for s, e in fr], dim=dim)


def _check_slice(num_slices: int, slice_index: int) -> None:
    if not 0 <= slice_index < num_slices:
        raise ValueError(f"slice index {slice_index} is outside [0, {num_slices}).")


def mlp_fc1_layout(local_ffn: int, gated: bool, num_slices: int, slice_index: int) -> SliceLayout:
    """Rows of the local ``linear_fc1`` weight owned by ``slice_index`` (gate and up halves if gated)."""
    _check_slice(num_slices, slice_index)
    assert local_ffn % num_slices == 0, (local_ffn, num_slices)
    f = local_ffn // num_slices
    s = slice_index * f
    owned = ((s, s + f),) if not gated else ((s, s + f), (local_ffn + s, local_ffn + s + f))
    return SliceLayout(size=local_ffn * (2 if gated else 1), owned=owned)


def mlp_fc2_layout(local_ffn: int, num_slices: int, slice_index: int) -> SliceLayout:
    """Columns of the local ``linear_fc2`` weight owned by ``slice_index``."""
    _check_slice(num_slices, slice_index)
    assert local_ffn % num_slices == 0, (local_ffn, num_slices)
    f = local_ffn // num_slices
    return SliceLayout(size=local_ffn, owned=((slice_index * f, (slice_index + 1) * f),))


def qkv_layout(local_query_groups: int, rows_per_group: int, num_slices: int, slice_index: int) -> SliceLayout:
    """Rows of the local ``linear_qkv`` weight owned by ``slice_index`` (a block of query groups)."""
    _check_slice(num_slices, slice_index)
    assert local_query_groups % num_slices == 0, (local_query_groups, num_slices)
    g = local_query_groups // num_slices
    rows = g * rows_per_group
    return SliceLayout(size=local_query_groups * rows_per_group, owned=((slice_index * rows, (slice_index + 1) * rows),))


def attention_output_layout(local_heads: int, head_dim: int, local_query_groups: int, num_slices: int,
                            slice_index: int) -> SliceLayout:
    """Columns of the local ``linear_proj`` (W_O) owned by ``slice_index``: the heads of the same
    query groups as :func:`qkv_layout` (heads are ordered group by group)."""
    _check_slice(num_slices, slice_index)
    assert local_query_groups % num_slices == 0 and local_heads % local_query_groups == 0
    cols = local_heads // num_slices * head_dim
    return SliceLayout(size=local_heads * head_dim, owned=((slice_index * cols, (slice_index + 1) * cols),))


@dataclass(frozen=True)
class ParamSplit:
    """How a full-layout parameter ``name`` is held as ``{name}_owned`` + ``{name}_frozen``
    along ``dim`` (``layout`` says which indices are owned)."""

    name: str
    dim: int
    layout: SliceLayout

    @property
    def owned_name(self) -> str:
        return f"{self.name}_owned"

    @property
    def frozen_name(self) -> str:
        return f"{self.name}_frozen"

    def owned_param(self, module) -> Parameter:
        return getattr(module, self.owned_name)

    def frozen_param(self, module) -> Parameter:
        return getattr(module, self.frozen_name)

    def full(self, module) -> torch.Tensor:
        return self.layout.assemble(self.owned_param(module), self.frozen_param(module), self.dim)


class SlicedModule:
    """Interface of a module that stores some of its full-layout parameters split into an
    owned and a frozen part (:class:`megatron_ppu.layers.PartialLinearMixin`).

    Attributes:
        ppu_num_slices: N the module was built with.
        ppu_slice_index: the slice n it trains.
        ppu_splits: full-layout attribute name ("weight", "bias") -> :class:`ParamSplit`.
    """

    ppu_num_slices: int
    ppu_slice_index: int
    ppu_splits: Dict[str, ParamSplit]


@dataclass(frozen=True)
class ParamTensors:
    """The tensors that hold one full-layout parameter: ``module``'s attribute ``attr``, either
    a whole ``Parameter`` (``split`` None) or the two parts of ``split``."""

    name: str
    module: torch.nn.Module
    attr: str
    split: Optional[ParamSplit]

    @property
    def attrs(self) -> Tuple[str, ...]:
        """The attribute names on ``module``: ``(attr,)`` or ``(owned, frozen)``."""
        return (self.split.owned_name, self.split.frozen_name) if self.split is not None else (self.attr,)

    @property
    def parts(self) -> List[Parameter]:
        """The parameters, in the order of :attr:`attrs`."""
        return [getattr(self.module, a) for a in self.attrs]

    @property
    def whole(self) -> Optional[Parameter]:
        """The parameter of an unsplit tensor (None for a split one)."""
        return getattr(self.module, self.attr) if self.split is None else None

    def full(self) -> torch.Tensor:
        """The full-layout value (assembled for a split tensor)."""
        return self.split.full(self.module) if self.split is not None else getattr(self.module, self.attr)


@dataclass(frozen=True)
class ParamOwnership:
    """Ownership of one parameter of this rank (full Megatron layout of its TP shard).

    Attributes:
        name: key in ``model.state_dict()``.
        shape: shape of this rank's (TP-local) tensor.
        sliced: whether the parameter is cut into slices.
        dim: the sliced dimension (None if not sliced).
        owned: index ranges along ``dim`` that this rank trains (the whole
            dimension if not sliced and trainable; empty if frozen entirely).
        owners: m, the number of replicas that train each element (K/N or K).
    """

    name: str
    shape: Tuple[int, ...]
    sliced: bool
    dim: Optional[int]
    owned: Tuple[Range, ...]
    owners: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def owned_numel(self) -> int:
        if not self.sliced:
            return self.numel if self.owned else 0
        along = sum(e - s for s, e in self.owned)
        return self.numel // self.shape[self.dim] * along

    def owned_mask(self) -> torch.Tensor:
        """Boolean tensor of ``shape``: True where this rank trains the element."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        if not self.sliced:
            mask[...] = bool(self.owned)
            return mask
        for s, e in self.owned:
            mask.narrow(self.dim, s, e - s).fill_(True)
        return mask


@dataclass
class OwnershipPlan:
    """Per-rank plan: for every parameter, whether it is sliced, what this rank trains and m.

    Attributes:
        num_replicas: K.
        num_slices: N.
        replica_index: k, this rank's replica.
        params: ``state_dict`` name -> :class:`ParamOwnership`, in model order.
        modules: ``named_modules`` name -> module of the model the plan was built from (for
            :meth:`tensors`; not part of :meth:`to_dict`).
    """

    num_replicas: int
    num_slices: int
    replica_index: int
    params: Dict[str, ParamOwnership] = field(default_factory=dict)
    modules: Dict[str, torch.nn.Module] = field(default_factory=dict, repr=False, compare=False)

    def tensors(self, name: str) -> ParamTensors:
        """Which tensors hold full-layout parameter ``name``: module, attribute(s), split."""
        assert name in self.params, f"{name} is not a parameter of this plan"
        mod_name, _, attr = name.rpartition(".")
        module = self.modules[mod_name]
        split = module.ppu_splits.get(attr) if isinstance(module, SlicedModule) else None
        return ParamTensors(name=name, module=module, attr=attr, split=split)

    def owned_ranges(self, name: str, replica: int) -> Tuple[Range, ...]:
        """The index ranges of ``name`` (along its sliced dim) that replica ``replica`` trains.

        Sliced parameters: the ranges of slice ``replica mod N`` (slices are equal and evenly
        spaced, so this rank's ranges shifted by whole slice widths). Unsliced parameters: only
        this rank's replica is known here (the holders of a block are the blocks plan's).
        """
        own = self.params[name]
        if not own.sliced:
            assert replica == self.replica_index, "unsliced parameters: ask the blocks plan for other replicas"
            return own.owned
        shift = replica % self.num_slices - self.slice_index
        out = []
        for s, e in own.owned:
            a, b = s + shift * (e - s), e + shift * (e - s)
            assert 0 <= a < b <= own.shape[own.dim], (name, own.owned, replica)
            out.append((a, b))
        return tuple(out)

    @staticmethod
    def layer_of(name: str) -> Optional[int]:
        """The transformer layer of ``name`` on this pipeline stage (:func:`layer_index`)."""
        return layer_index(name)

    @property
    def slice_index(self) -> int:
        return self.replica_index % self.num_slices

    def total_numel(self) -> int:
        return sum(p.numel for p in self.params.values())

    def owned_numel(self) -> int:
        return sum(p.owned_numel for p in self.params.values())

    def sliced_names(self):
        return [n for n, p in self.params.items() if p.sliced]

    def summary(self) -> str:
        """Human-readable one-line summary for logs."""
        t, o = self.total_numel(), self.owned_numel()
        return (
            f"replica {self.replica_index}/{self.num_replicas} trains slice {self.slice_index}/"
            f"{self.num_slices}: {o:,} of {t:,} parameters ({100.0 * o / max(t, 1):.1f}%), "
            f"{len(self.sliced_names())} sliced tensors"
        )

    def to_dict(self) -> dict:
        """JSON-friendly form, stored in checkpoints to detect a changed layout."""
        return {
            "num_replicas": self.num_replicas,
            "num_slices": self.num_slices,
            "replica_index": self.replica_index,
            "params": {
                n: {"shape": list(p.shape), "sliced": p.sliced, "dim": p.dim,
                    "owned": [list(r) for r in p.owned], "owners": p.owners}
                for n, p in self.params.items()
            },
        }


def build_ownership_plan(model: torch.nn.Module, num_replicas: int, num_slices: int, replica_index: int,
                         owners_fn=None) -> OwnershipPlan:
    """Walk ``model`` and describe every parameter's ownership on this rank.

    Sliced modules (:class:`SlicedModule`: the partial linears of :mod:`megatron_ppu.layers`)
    report their sliced tensors;
    every other parameter is unsliced, trained here if it requires grad, and held by
    ``owners_fn(name)`` replicas (default: K; the block plan of
    :mod:`megatron_ppu.subnet` passes its per-block holder counts). The slice index the
    layers were built with must match ``replica_index mod num_slices``.
    """
    if num_replicas % num_slices != 0:
        raise ValueError(f"num_slices {num_slices} must divide num_replicas {num_replicas}.")
    plan = OwnershipPlan(num_replicas=num_replicas, num_slices=num_slices, replica_index=replica_index,
                         modules=dict(model.named_modules()))
    per_slice = num_replicas // num_slices
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        handled = set()
        if isinstance(module, SlicedModule):
            assert module.ppu_num_slices == num_slices, "layer built with another N"
            assert module.ppu_slice_index == replica_index % num_slices, (
                f"{mod_name} trains slice {module.ppu_slice_index}, replica {replica_index} should "
                f"train slice {replica_index % num_slices}"
            )
            for split in module.ppu_splits.values():
                full_shape = list(split.owned_param(module).shape)
                full_shape[split.dim] = split.layout.size
                plan.params[prefix + split.name] = ParamOwnership(
                    name=prefix + split.name, shape=tuple(full_shape), sliced=True, dim=split.dim,
                    owned=split.layout.owned, owners=per_slice,
                )
                handled.update({split.owned_name, split.frozen_name})
        for pname, p in module.named_parameters(recurse=False):
            if pname in handled:
                continue
            name = prefix + pname
            owners = owners_fn(name) if owners_fn is not None else (num_replicas if p.requires_grad else 0)
            plan.params[name] = ParamOwnership(
                name=name, shape=tuple(p.shape), sliced=False, dim=None,
                owned=((0, p.shape[0] if p.dim() else 1),) if p.requires_grad else (),
                owners=owners,
            )
    return plan
