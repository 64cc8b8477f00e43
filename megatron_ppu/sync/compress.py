"""Quantized cross-replica reduction for the DiLoCo outer sync (int8 / fp8 with per-block scales).

At an outer sync every replica k holds a flat fp32 pseudo-gradient Δ_k and every replica needs
Σ_k Δ_k. :func:`quantized_all_reduce_` computes that sum with about one byte per value on the
wire instead of four (fp32) or two (bf16):

1. (error feedback, optional) x = Δ_k + residual_k;
2. x is split into W equal chunks (W = ranks of the group; the tail is padded with zeros to a
   multiple of W·block); chunk j is quantized and sent to rank j with one ``all_to_all_single``
   of a ``uint8`` buffer holding, per chunk, the fp32 scales (as bytes) then the payload;
3. rank j dequantizes the W contributions to its chunk, sums them in fp32 in rank order,
   re-quantizes the sum and the W re-quantized chunks are shared with one
   ``all_gather_into_tensor`` of ``uint8`` buffers;
4. every rank dequantizes all chunks: the result is bit-identical on every rank;
5. (error feedback) residual_k = x − dequantize(quantize(x)) of what this rank sent, plus, on
   the chunk this rank owns, the error of the re-quantization of the sum (see
   ``docs/compression.md``: the cumulative error over rounds then telescopes and stays bounded).

Only quantized bytes and scales are handed to the collectives; a rank's own chunk never enters
the ``all_to_all`` (split size 0 to itself). Non-finite input stays visible: a block holding NaN
or Inf has a non-finite scale, so it dequantizes to non-finite values here, at its owner and, after
the gather, on every rank (the caller skips the outer step; the residual is then left unchanged).

Quantization (:func:`quantize` / :func:`dequantize`), per block of ``block`` consecutive values:

* ``int8``: scale = absmax / 127, q = round(x / scale) clamped to [-127, 127]; |error| ≤ scale/2;
* ``fp8``: scale = absmax / 448, the values x / scale cast to ``torch.float8_e4m3fn`` (bytes
  viewed as ``uint8``: gloo refuses float8 tensors, "Invalid scalar type"); |error| ≤
  max(|x|·2⁻⁴, scale·2⁻¹⁰) (half an ulp of a normal, half the subnormal step).

An all-zero block has scale 0 and decodes to 0. The functions hold no state: the error-feedback
residual is a plain fp32 tensor owned by the caller (:func:`new_residual`), so concurrent calls on
different process groups (e.g. from a background thread overlapping training) do not interact.
Every buffer lives on ``flat.device`` (CPU for gloo, CUDA for NCCL); nothing is copied to the host.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

QUANTIZED_KINDS = ("int8", "fp8")
PLAIN_KINDS = {"fp32": 4, "bf16": 2}
DEFAULT_BLOCK = 256
INT8_MAX = 127.0
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_QMAX = {"int8": INT8_MAX, "fp8": FP8_MAX}
_SCALE_BYTES = 4  # one fp32 scale per block

__all__ = ["quantize", "dequantize", "quantized_all_reduce_", "payload_bytes", "new_residual",
           "QUANTIZED_KINDS", "DEFAULT_BLOCK"]


def _check_kind(kind: str, allowed=QUANTIZED_KINDS) -> None:
    if kind not in allowed:
        raise ValueError(f"--diloco-allreduce-dtype (kind) must be one of {', '.join(allowed)}, got {kind!r}; "
                         f"pick one of those.")


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block (values per quantization scale) must be a positive integer, got {block!r}; "
                         f"use the default {DEFAULT_BLOCK}.")


def _quantize_blocks(xb: torch.Tensor, kind: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``xb`` of shape (blocks, block) fp32: (payload uint8 (blocks, block), scales fp32 (blocks,))."""
    absmax = xb.abs().amax(dim=1)  # NaN propagates; Inf gives Inf: the scale carries non-finiteness
    qmax = _QMAX[kind]
    scale = absmax / qmax
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    # Non-finite only where the scale is (a finite absmax means finite values): zero those codes,
    # the non-finite scale decodes the whole block to NaN/Inf.
    y = torch.nan_to_num(xb / divisor, nan=0.0, posinf=qmax, neginf=-qmax).clamp_(-qmax, qmax)
    if kind == "int8":
        payload = torch.round(y).to(torch.int8).view(torch.uint8)
    else:
        payload = y.to(torch.float8_e4m3fn).view(torch.uint8)
    return payload, scale


def _dequantize_blocks(payload: torch.Tensor, scales: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of :func:`_quantize_blocks`: payload (blocks, block) uint8, scales (blocks,) → fp32."""
    codes = payload.view(torch.int8) if kind == "int8" else payload.view(torch.float8_e4m3fn)
    return codes.to(torch.float32) * scales.unsqueeze(1)


def quantize(x: torch.Tensor, kind: str, block: int = DEFAULT_BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize the values of ``x`` (flattened, fp32) per block of ``block`` consecutive values.

    Returns ``(payload, scales)``: ``payload`` is a ``uint8`` tensor of ``x.numel()`` bytes (int8
    codes or ``float8_e4m3fn`` bytes), ``scales`` holds one fp32 scale per block
    (``ceil(numel / block)``; the last block is padded with zeros for the absmax). ``kind`` is
    ``"int8"`` (scale = absmax/127) or ``"fp8"`` (scale = absmax/448). A block containing NaN/Inf
    gets a non-finite scale and decodes to non-finite values."""
    _check_kind(kind)
    _check_block(block)
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = -(-n // block)
    xb = torch.nn.functional.pad(flat, (0, nb * block - n)).view(nb, block)
    payload, scales = _quantize_blocks(xb, kind)
    return payload.reshape(-1)[:n], scales


def dequantize(payload: torch.Tensor, scales: torch.Tensor, kind: str, block: int, numel: int) -> torch.Tensor:
    """The fp32 values (1-D, ``numel``) encoded by :func:`quantize`'s ``(payload, scales)``."""
    _check_kind(kind)
    _check_block(block)
    nb = -(-numel // block)
    assert payload.dtype == torch.uint8 and payload.numel() >= numel, (payload.dtype, payload.numel(), numel)
    assert scales.numel() == nb, (scales.numel(), nb)
    p = torch.nn.functional.pad(payload.reshape(-1)[:numel], (0, nb * block - numel)).view(nb, block)
    return _dequantize_blocks(p, scales.reshape(-1).to(torch.float32), kind).reshape(-1)[:numel]


def _chunk_layout(numel: int, world: int, block: int) -> Tuple[int, int, int]:
    """(values per chunk C, blocks per chunk, bytes per packed chunk = 4·blocks + C)."""
    chunk = -(-numel // (world * block)) * block
    nb = chunk // block
    return chunk, nb, _SCALE_BYTES * nb + chunk


def payload_bytes(numel: int, world: int, kind: str, block: int = DEFAULT_BLOCK) -> int:
    """Bytes one rank hands to the collectives to reduce ``numel`` values over ``world`` ranks.

    ``"fp32"`` / ``"bf16"``: the plain all-reduce's input buffer, ``numel × 4`` / ``numel × 2``.
    ``"int8"`` / ``"fp8"`` (:func:`quantized_all_reduce_`): 0 when ``world == 1`` (no collective),
    else ``world × (C + 4·C/block)`` with ``C = ceil(numel / (world·block))·block`` values per chunk:
    ``world − 1`` packed chunks into the all-to-all plus one into the all-gather. A ring all-reduce
    sends 2(W−1)/W of its input; the two quantized collectives together send the same fraction of
    this count, so the ratio of the two numbers is the ratio of the bytes on the wire (≈ 0.254 of
    fp32 at block 256 for large ``numel``)."""
    if kind in PLAIN_KINDS:
        return numel * PLAIN_KINDS[kind]
    _check_kind(kind, QUANTIZED_KINDS + tuple(PLAIN_KINDS))
    _check_block(block)
    if world <= 1 or numel == 0:
        return 0
    _, _, row = _chunk_layout(numel, world, block)
    return world * row


def new_residual(numel: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """A zero error-feedback residual for a flat buffer of ``numel`` values (fp32, host by default)."""
    return torch.zeros(numel, dtype=torch.float32, device=device or "cpu")


def _pack(payload: torch.Tensor, scales: torch.Tensor, rows: int, nb: int, chunk: int) -> torch.Tensor:
    """(rows, 4·nb + chunk) uint8: each row the chunk's fp32 scales as bytes, then its payload."""
    packed = torch.empty((rows, _SCALE_BYTES * nb + chunk), dtype=torch.uint8, device=payload.device)
    packed[:, :_SCALE_BYTES * nb] = scales.reshape(rows, nb).view(torch.uint8)
    packed[:, _SCALE_BYTES * nb:] = payload.reshape(rows, chunk)
    return packed


def _unpack_dequantize(packed: torch.Tensor, kind: str, block: int, nb: int, chunk: int) -> torch.Tensor:
    """Inverse of :func:`_pack` followed by dequantization: (rows, chunk) fp32."""
    rows = packed.shape[0]
    scales = packed[:, :_SCALE_BYTES * nb].contiguous().view(torch.float32).reshape(rows * nb)
    payload = packed[:, _SCALE_BYTES * nb:].reshape(rows * nb, block)
    return _dequantize_blocks(payload, scales, kind).view(rows, chunk)


def quantized_all_reduce_(flat: torch.Tensor, group, kind: str, block: int = DEFAULT_BLOCK,
                          residual: Optional[torch.Tensor] = None) -> int:
    """In place: ``flat`` becomes the sum over the ranks of ``group`` of their ``flat``, reduced with
    ``kind`` ("int8" or "fp8") quantized bytes and one fp32 scale per ``block`` values (see the
    module docstring for the algorithm). Every rank ends with bit-identical values.

    ``flat``: 1-D contiguous fp32 on the collective's device (CPU for gloo, CUDA for NCCL).
    ``residual``: optional error-feedback state of the same shape, dtype and device, updated in
    place to what this rank has not yet delivered (its quantization error, plus the
    re-quantization error of the chunk it owns); left unchanged when the result is non-finite
    (the caller skips that outer step). With one rank no collective runs: ``flat`` becomes
    dequantize(quantize(flat [+ residual])). Returns the bytes this rank handed to the collectives
    (= :func:`payload_bytes`)."""
    _check_kind(kind)
    _check_block(block)
    assert flat.dim() == 1 and flat.dtype == torch.float32 and flat.is_contiguous(), (flat.shape, flat.dtype)
    if residual is not None:
        assert residual.shape == flat.shape and residual.dtype == torch.float32, (residual.shape, residual.dtype)
        assert residual.device == flat.device, (residual.device, flat.device)
    n = flat.numel()
    if n == 0:
        return 0
    world = dist.get_world_size(group)
    x = flat if residual is None else flat + residual
    if world == 1:
        payload, scales = quantize(x, kind, block)
        out = dequantize(payload, scales, kind, block, n)
        if residual is not None:
            residual.copy_(torch.where(torch.isfinite(out).all(), x - out, residual))
        flat.copy_(out)
        return 0

    # the group's own rank: also right for a process group not registered with torch.distributed
    # (torchft's reconfigurable cross-replica group, sync/torchft_replicas.py)
    rank = group.rank() if group is not None else dist.get_rank()
    chunk, nb, row = _chunk_layout(n, world, block)
    xp = torch.nn.functional.pad(x, (0, world * chunk - n))
    payload, scales = _quantize_blocks(xp.view(world * nb, block), kind)
    packed = _pack(payload, scales, world, nb, chunk)
    # Phase (b): chunk j to rank j; a rank's own chunk stays here (split size 0 to itself).
    send = torch.cat((packed[:rank], packed[rank + 1:])).reshape(-1)
    recv = torch.empty_like(send)
    splits = [0 if j == rank else row for j in range(world)]
    dist.all_to_all_single(recv, send, output_split_sizes=splits, input_split_sizes=splits, group=group)
    recv = recv.view(world - 1, row)
    # Phase (c): the W contributions to my chunk, in rank order, summed in fp32.
    contrib = _unpack_dequantize(torch.cat((recv[:rank], packed[rank:rank + 1], recv[rank:])), kind, block, nb,
                                 chunk)
    acc = contrib[0].clone()
    for j in range(1, world):
        acc += contrib[j]
    p2, s2 = _quantize_blocks(acc.view(nb, block), kind)
    mine = _pack(p2, s2, 1, nb, chunk).reshape(-1)
    gathered = torch.empty(world * row, dtype=torch.uint8, device=flat.device)
    dist.all_gather_into_tensor(gathered, mine, group=group)
    # Phase (d): every rank decodes the same bytes.
    out = _unpack_dequantize(gathered.view(world, row), kind, block, nb, chunk).reshape(-1)
    if residual is not None:
        # Phase (e): what I failed to send, and on my chunk what the re-quantized sum lost.
        sent = _dequantize_blocks(payload, scales, kind).reshape(-1)
        new = xp - sent
        lo = rank * chunk
        new[lo:lo + chunk] += acc - out[lo:lo + chunk]
        ok = torch.isfinite(out).all()  # same bytes on every rank: the same decision everywhere
        residual.copy_(torch.where(ok, new[:n], residual))
    flat.copy_(out[:n])
    return send.numel() + mine.numel()
