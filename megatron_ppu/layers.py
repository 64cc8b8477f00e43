"""Partial-update parallel linears for Megatron-Core (paper §2.2, App. C.1).

A sliced weight is stored as two tensors: the owned slice, the only trainable
``nn.Parameter`` of the weight, and the frozen remainder, a ``Parameter`` with
``requires_grad=False``. Megatron's DDP allocates ``main_grad`` only for
parameters that require grad and its optimizer only sees those, so the frozen
part has no gradient buffer and no optimizer state by construction.

The backward pass (autograd functions below) computes

* the **full input gradient** (dgrad): ``dX = dY_owned @ W_owned + dY_frozen @ W_frozen``
  for an output-sliced weight, and the interleaving of ``dY @ W_owned`` and
  ``dY @ W_frozen`` for an input-sliced weight, i.e. exactly ``dY @ W``;
* the weight gradient (wgrad) **only for the owned slice**: no GEMM touches the
  frozen rows/columns.

The forward is the full forward, as two GEMMs over the two parts; in evaluation (eval mode, no
gradients) an input-sliced weight (fc2, W_O) is summed slice by slice in index order instead, so that
every replica computes the global model bit for bit alike whichever slice it owns. (The paper's
negative control "detach-all-but-k", App. D, drops the frozen part's dgrad term:
``frozen_input_jacobian="detach"``.) ``state_dict``
and ``sharded_state_dict`` present every weight in Megatron's full layout
(``weight``/``bias``), so checkpoints move between plain Megatron and
megatron_ppu in both directions.

Tensor parallelism: slicing happens inside each TP shard, and communication is
Megatron's own (``copy_to``/``gather_from_sequence_parallel`` before a column
linear, ``reduce_from``/``reduce_scatter_to_sequence_parallel`` after a row
linear). Under sequence parallelism the all-gathered input of a column linear is
kept for the wgrad (Megatron's fused path re-gathers it in the backward instead;
we trade that activation memory for simplicity).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch.nn import Parameter

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from .ownership import (  # noqa: F401 (ParamSplit: re-exported)
    ParamSplit,
    SliceLayout,
    SlicedModule,
    attention_output_layout,
    mlp_fc1_layout,
    mlp_fc2_layout,
    qkv_layout,
)


def _mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` over the last dim of ``a`` (any leading shape)."""
    return torch.matmul(a, w.t())


class _OutputSlicedLinear(torch.autograd.Function):
    """``Y = X W^T`` with W's rows split into owned (trainable) and frozen parts."""

    @staticmethod
    def forward(ctx, x, w_owned, w_frozen, layout: SliceLayout, detach_frozen: bool = False):
        ctx.layout = layout
        ctx.detach_frozen = detach_frozen
        ctx.save_for_backward(x, w_owned, w_frozen)
        y_o = _mm(x, w_owned) if layout.owned_size else None
        y_f = _mm(x, w_frozen) if layout.frozen_size else None
        if y_o is None:
            return y_f
        if y_f is None:
            return y_o
        return layout.assemble(y_o, y_f, dim=-1)

    @staticmethod
    def backward(ctx, dy):
        x, w_owned, w_frozen = ctx.saved_tensors
        layout: SliceLayout = ctx.layout
        dx = None
        dw = None
        if layout.owned_size:
            dy_o = layout.take_owned(dy, -1)
            dx = torch.matmul(dy_o, w_owned)
            if ctx.needs_input_grad[1]:
                dw = torch.matmul(dy_o.reshape(-1, dy_o.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
        if layout.frozen_size and not ctx.detach_frozen:
            dx_f = torch.matmul(layout.take_frozen(dy, -1), w_frozen)
            dx = dx_f if dx is None else dx + dx_f
        if dx is None:
            dx = torch.zeros_like(x)
        return dx, dw, None, None, None


class _InputSlicedLinear(torch.autograd.Function):
    """``Y = X W^T`` with W's columns (X's last dim) split into owned and frozen parts.

    Only the owned columns of X are saved for the backward: the frozen part of
    the input is needed by no gradient.
    """

    @staticmethod
    def forward(ctx, x, w_owned, w_frozen, layout: SliceLayout, detach_frozen: bool = False):
        ctx.layout = layout
        ctx.detach_frozen = detach_frozen
        x_o = layout.take_owned(x, -1) if layout.owned_size else None
        y = None
        if x_o is not None:
            y = _mm(x_o, w_owned)
        if layout.frozen_size:
            y_f = _mm(layout.take_frozen(x, -1), w_frozen)
            y = y_f if y is None else y + y_f
        ctx.save_for_backward(x_o.contiguous() if x_o is not None else None, w_owned, w_frozen)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_o, w_owned, w_frozen = ctx.saved_tensors
        layout: SliceLayout = ctx.layout
        dx_o = torch.matmul(dy, w_owned) if layout.owned_size else None
        dx_f = None
        if layout.frozen_size:
            dx_f = torch.matmul(dy, w_frozen) if not ctx.detach_frozen else \
                dy.new_zeros(*dy.shape[:-1], layout.frozen_size)
        if dx_o is None:
            dx = dx_f
        elif dx_f is None:
            dx = dx_o
        else:
            dx = layout.assemble(dx_o, dx_f, dim=-1)
        dw = None
        if layout.owned_size and ctx.needs_input_grad[1]:
            dw = torch.matmul(dy.reshape(-1, dy.shape[-1]).t(), x_o.reshape(-1, x_o.shape[-1]))
        return dx, dw, None, None, None


def _slice_ordered_input_linear(x: torch.Tensor, w_owned: torch.Tensor, w_frozen: torch.Tensor,
                                layout: SliceLayout) -> Optional[torch.Tensor]:
    """``Y = X W^T`` for an input-sliced weight whose owned columns are one of its equal slices,
    summed slice by slice in index order: ``(X_0 W_0^T + X_1 W_1^T) + ...``. The sum's order is then
    the same on every replica, whichever slice it owns, so every replica computes the global model
    bit for bit alike (:class:`_InputSlicedLinear` adds the owned part to the frozen part, an order
    that depends on the slice once there are more than two: results differ in the last bits). With
    two slices it is :class:`_InputSlicedLinear`'s sum (a + b == b + a). No autograd function
    (for evaluation, without gradients). None when the layout is not one equal slice."""
    if len(layout.owned) != 1 or not layout.frozen_size:
        return None
    start, end = layout.owned[0]
    width = end - start
    if layout.size % width or start % width:
        return None
    y = None
    for a in range(0, layout.size, width):
        if a == start:
            w = w_owned
        else:
            w = w_frozen.narrow(1, a if a < start else a - width, width).contiguous()
        part = _mm(x.narrow(-1, a, width), w)
        y = part if y is None else y + part
    return y


class PartialLinearMixin(SlicedModule):
    """Shared machinery: split megatron's full weight into owned/frozen tensors and
    keep ``state_dict`` in Megatron's full layout."""

    ppu_num_slices: int
    ppu_slice_index: int
    ppu_splits: Dict[str, ParamSplit]

    def _ppu_init(self, num_slices: int, slice_index: int, frozen_input_jacobian: str = "full",
                  forward_mask: bool = False) -> None:
        self.ppu_forward_mask = forward_mask
        # the settings were validated at parse time (megatron_ppu.config.validate_ppu_config)
        assert frozen_input_jacobian in ("full", "detach"), frozen_input_jacobian
        self.ppu_num_slices = num_slices
        self.ppu_slice_index = slice_index
        self.ppu_detach_frozen = frozen_input_jacobian == "detach"
        self.ppu_splits = {}
        assert not getattr(self.config, "gradient_accumulation_fusion", False), (
            "the PPU partial linears compute weight gradients themselves: gradient_accumulation_fusion=False")

    def _ppu_split(self, name: str, dim: int, layout: SliceLayout) -> None:
        full: Parameter = getattr(self, name)
        assert full is not None and full.shape[dim] == layout.size, (name, tuple(full.shape), layout.size)
        attrs = dict(full.__dict__)  # megatron's TP attributes: tensor_model_parallel, partition_dim, ...
        owned, frozen = layout.split(full.detach(), dim)
        del self._parameters[name]
        p_owned = Parameter(owned, requires_grad=full.requires_grad)
        p_frozen = Parameter(frozen, requires_grad=False)
        for p in (p_owned, p_frozen):
            for k, v in attrs.items():
                setattr(p, k, v)
        split = ParamSplit(name=name, dim=dim, layout=layout)
        self.register_parameter(split.owned_name, p_owned)
        self.register_parameter(split.frozen_name, p_frozen)
        self.ppu_splits[name] = split

    def full_parameter(self, name: str) -> torch.Tensor:
        """The full (TP-local) tensor ``name`` ("weight"/"bias"), assembled, without autograd."""
        with torch.no_grad():
            return self.ppu_splits[name].full(self)

    # -- state dict in Megatron's full layout ---------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for split in self.ppu_splits.values():
            destination.pop(prefix + split.owned_name, None)
            destination.pop(prefix + split.frozen_name, None)
            full = split.full(self)
            destination[prefix + split.name] = full if keep_vars else full.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for split in self.ppu_splits.values():
            key = prefix + split.name
            if key in state_dict:
                full = state_dict.pop(key)
                if full.shape[split.dim] != split.layout.size:
                    error_msgs.append(
                        f"size mismatch for {key}: checkpoint has {tuple(full.shape)}, the model's "
                        f"full layout has {split.layout.size} along dim {split.dim}"
                    )
                    continue
                owned, frozen = split.layout.split(full, split.dim)
                state_dict[prefix + split.owned_name] = owned
                state_dict[prefix + split.frozen_name] = frozen
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _PartialColumnParallelLinear(PartialLinearMixin, ColumnParallelLinear):
    """ColumnParallelLinear whose local output rows are split owned/frozen."""

    def _ppu_weight_layout(self) -> SliceLayout:
        raise NotImplementedError

    def __init__(self, input_size, output_size, *, num_slices: int, slice_index: int,
                 frozen_input_jacobian: str = "full", forward_mask: bool = False, **kwargs):
        assert not kwargs.get("skip_weight_param_allocation"), "PPU partial linears need their own weight"
        ColumnParallelLinear.__init__(self, input_size, output_size, **kwargs)
        self._ppu_init(num_slices, slice_index, frozen_input_jacobian, forward_mask)
        layout = self._ppu_weight_layout()
        self._ppu_split("weight", 0, layout)
        if self.bias is not None:
            self._ppu_split("bias", 0, layout)
        # The parts carry the data; `weight`/`bias` stay readable attributes (None) for
        # megatron code that tests them, and state_dict() still shows them in full.
        self.weight = None
        self.bias = None

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        assert weight is None, "PPU partial linears do not take an external weight"
        if self.sequence_parallel:
            total_input = gather_from_sequence_parallel_region(input_, True, group=self.tp_group)
        elif self.allreduce_dgrad:
            total_input = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        else:
            total_input = input_
        w = self.ppu_splits["weight"]
        if self.ppu_forward_mask and self.training:
            # Forward masking (SDP neuron plan): only the owned rows exist in this forward.
            output_parallel = torch.matmul(total_input, w.owned_param(self).t())
            bias = self.ppu_splits["bias"].owned_param(self) if "bias" in self.ppu_splits else None
        else:
            output_parallel = _OutputSlicedLinear.apply(
                total_input, w.owned_param(self), w.frozen_param(self), w.layout, self.ppu_detach_frozen
            )
            # fc1's/qkv's bias is sliced with the rows; cat() routes its gradient to the owned part.
            bias = self.ppu_splits["bias"].full(self) if "bias" in self.ppu_splits else None
        if bias is not None and not self.skip_bias_add:
            output_parallel = output_parallel + bias
        gather_output = self.gather_output if runtime_gather_output is None else runtime_gather_output
        output = (gather_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
                  if gather_output else output_parallel)
        return output, (bias if self.skip_bias_add else None)


class PPUMLPColumnParallelLinear(_PartialColumnParallelLinear):
    """``mlp.linear_fc1`` training only slice n of the hidden units (both SwiGLU halves)."""

    def _ppu_weight_layout(self) -> SliceLayout:
        gated = bool(self.config.gated_linear_unit)
        local = self.output_size_per_partition // (2 if gated else 1)
        # divisibility by N: megatron_ppu.config.validate_ppu_config (mlp_fc1_layout asserts it)
        return mlp_fc1_layout(local, gated, self.ppu_num_slices, self.ppu_slice_index)


class PPUQKVColumnParallelLinear(_PartialColumnParallelLinear):
    """``self_attention.linear_qkv`` training only head group n (query groups under GQA)."""

    def _ppu_weight_layout(self) -> SliceLayout:
        cfg = self.config
        assert not getattr(cfg, "attention_output_gate", False), "validate_ppu_config refuses an output gate"
        tp = self.output_size // self.output_size_per_partition
        groups = cfg.num_query_groups or cfg.num_attention_heads
        assert groups % tp == 0, (groups, tp)  # divisibility by N: validate_ppu_config; qkv_layout asserts it
        local_groups = groups // tp
        rows_per_group = self.output_size_per_partition // local_groups
        return qkv_layout(local_groups, rows_per_group, self.ppu_num_slices, self.ppu_slice_index)


class _PartialRowParallelLinear(PartialLinearMixin, RowParallelLinear):
    """RowParallelLinear whose local input columns are split owned/frozen; its bias
    (shape [output]) is not sliced."""

    def _ppu_weight_layout(self) -> SliceLayout:
        raise NotImplementedError

    def __init__(self, input_size, output_size, *, num_slices: int, slice_index: int,
                 frozen_input_jacobian: str = "full", forward_mask: bool = False, **kwargs):
        RowParallelLinear.__init__(self, input_size, output_size, **kwargs)
        self._ppu_init(num_slices, slice_index, frozen_input_jacobian, forward_mask)
        self._ppu_split("weight", 1, self._ppu_weight_layout())
        self.weight = None

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        assert self.input_is_parallel, f"{type(self).__name__} expects input_is_parallel=True (megatron's GPT layer)"
        w = self.ppu_splits["weight"]
        if self.ppu_forward_mask and self.training:
            # Forward masking: the input holds only the owned hidden units; inverted-dropout
            # scaling by 1/keep = N keeps the MLP output's expected magnitude.
            output_parallel = torch.matmul(input_, w.owned_param(self).t()) * (w.layout.size / w.layout.owned_size)
        else:
            output_parallel = None
            if not self.training and not torch.is_grad_enabled():  # evaluation: the same sum on every replica
                output_parallel = _slice_ordered_input_linear(input_, w.owned_param(self), w.frozen_param(self),
                                                              w.layout)
            if output_parallel is None:
                output_parallel = _InputSlicedLinear.apply(input_, w.owned_param(self), w.frozen_param(self),
                                                           w.layout, self.ppu_detach_frozen)
        if self.sequence_parallel:
            output_ = reduce_scatter_to_sequence_parallel_region(output_parallel, group=self.tp_group)
        else:
            output_ = reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
        if not self.skip_bias_add:
            return (output_ + self.bias) if self.bias is not None else output_, None
        return output_, self.bias


class PPUMLPRowParallelLinear(_PartialRowParallelLinear):
    """``mlp.linear_fc2`` training only the columns of hidden-unit slice n."""

    def _ppu_weight_layout(self) -> SliceLayout:
        # divisibility by N: megatron_ppu.config.validate_ppu_config (mlp_fc2_layout asserts it)
        return mlp_fc2_layout(self.input_size_per_partition, self.ppu_num_slices, self.ppu_slice_index)


class PPUAttentionOutputRowParallelLinear(_PartialRowParallelLinear):
    """``self_attention.linear_proj`` (W_O) training only the columns of head group n.

    The paper's negative control (slicing W_O degrades perplexity); not part of the method.
    """

    def _ppu_weight_layout(self) -> SliceLayout:
        cfg = self.config
        tp = self.input_size // self.input_size_per_partition
        groups = cfg.num_query_groups or cfg.num_attention_heads
        assert groups % tp == 0, (groups, tp)  # divisibility by N: validate_ppu_config
        local_heads = cfg.num_attention_heads // tp
        head_dim = self.input_size_per_partition // local_heads
        return attention_output_layout(local_heads, head_dim, groups // tp, self.ppu_num_slices, self.ppu_slice_index)
