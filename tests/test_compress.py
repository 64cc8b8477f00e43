"""Quantized outer reduction (``megatron_ppu/sync/compress.py``) against hand-derived error bounds,
a plain fp32 sum, hand-computed byte counts and the collectives actually called (gloo, 2-3 ranks).

Error bounds used throughout, per block of ``block`` consecutive values with absmax a:
* int8: scale s = a/127, q = round(x/s): |x - q·s| <= s/2 = a/254.
* fp8 e4m3fn: s = a/448, y = x/s in [-448, 448]; a normal y in [2^e, 2^(e+1)) has ulp 2^(e-3), so
  rounding to nearest moves it by at most 2^(e-4) <= |y|·2^-4; below 2^-6 (subnormals) the step
  is 2^-9, so at most 2^-10. In x units: |err| <= max(|x|·2^-4, s·2^-10).
Plus a small allowance for fp32 arithmetic (1e-5 of the block absmax, far below either bound).
"""
import math
import threading

import pytest
import torch
import torch.distributed as dist

from megatron_ppu.sync.compress import dequantize, new_residual, payload_bytes, quantize, quantized_all_reduce_
from tests.harness import run_ranks

KINDS = ("int8", "fp8")
SLACK = 1e-5  # fp32 arithmetic allowance, relative to the block absmax


# ------------------------------------------------------------ independent reference bounds
def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element: the absmax of its block (blocks of ``block`` consecutive values, zero-padded)."""
    n = x.numel()
    nb = -(-n // block)
    padded = torch.zeros(nb * block, dtype=x.dtype)
    padded[:n] = x.reshape(-1).abs()
    return padded.view(nb, block).amax(dim=1).repeat_interleave(block)[:n]


def _elem_bound(x: torch.Tensor, a: torch.Tensor, kind: str) -> torch.Tensor:
    """Hand-derived |error| bound of one quantization, per element (x values, a block absmax)."""
    if kind == "int8":
        return a / 254 + SLACK * a
    return torch.maximum(x.abs() * 2.0 ** -4, a / 448 * 2.0 ** -10) + SLACK * a


def _sum_bound(xs: torch.Tensor, kind: str, block: int) -> torch.Tensor:
    """Bound of |quantized_all_reduce - exact sum| per element for inputs xs (W, n), float64:
    the W phase-(b) quantizations plus the re-quantization of the sum of what was received
    (whose values are within the phase-(b) bound of the exact sum)."""
    e_b = sum(_elem_bound(x, _block_absmax(x, block), kind) for x in xs)
    s_abs = xs.sum(0).abs() + e_b  # |S_i| for the sum S actually re-quantized
    return e_b + _elem_bound(s_abs, _block_absmax(s_abs, block), kind)


def _ref_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """int8 per-block quantize + dequantize written out block by block (zero block: 0)."""
    out = torch.zeros_like(x)
    for lo in range(0, x.numel(), block):
        b = x[lo:lo + block]
        s = b.abs().max() / 127
        if s > 0:
            out[lo:lo + block] = torch.clamp(torch.round(b / s), -127, 127) * s
    return out


def _ref_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """fp8 e4m3fn per-block quantize + dequantize written out block by block (zero block: 0)."""
    out = torch.zeros_like(x)
    for lo in range(0, x.numel(), block):
        b = x[lo:lo + block]
        s = b.abs().max() / 448
        if s > 0:
            out[lo:lo + block] = torch.clamp(b / s, -448, 448).to(torch.float8_e4m3fn).to(torch.float32) * s
    return out


def _delta(n: int, seed: int) -> torch.Tensor:
    """A delta-like vector: N(0, 1e-3) with 0.5 % outliers at 30 sigma and one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 1e-3
    idx = torch.randint(0, n, (max(1, n // 200),), generator=g)
    x[idx] *= 30
    if n >= 512:
        x[256:512] = 0.0
    return x


# ------------------------------------------------------------------------ single process
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,block", [(1000, 256), (256, 256), (7, 256), (4096, 64), (1, 1)])
def test_round_trip_within_hand_bound(kind, n, block):
    x = _delta(n, seed=n)
    if n >= 8:  # a block spanning subnormal fp8 codes: one large value, the rest tiny
        x[:block] = torch.linspace(-1e-7, 1e-7, min(block, n))
        x[0] = 1.0
    payload, scales = quantize(x, kind, block)
    assert payload.dtype == torch.uint8 and payload.numel() == n
    assert scales.dtype == torch.float32 and scales.numel() == math.ceil(n / block)
    want_scale = [float(x[lo:lo + block].abs().max()) / (127 if kind == "int8" else 448) for lo in range(0, n, block)]
    assert scales.tolist() == pytest.approx(want_scale, rel=1e-6)
    y = dequantize(payload, scales, kind, block, n)
    err = (y - x).abs()
    bound = _elem_bound(x.double(), _block_absmax(x.double(), block), kind)
    assert bool((err.double() <= bound).all()), float((err.double() - bound).max())
    ref = _ref_int8(x, block) if kind == "int8" else _ref_fp8(x, block)
    assert torch.allclose(y, ref, rtol=1e-6, atol=0.0)
    if n >= 512:
        assert torch.equal(y[256:512], torch.zeros(256))  # an all-zero block decodes to exactly 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_round_trip_keeps_non_finite_visible(kind, bad):
    x = torch.randn(1000)
    x[300] = bad  # block 1 of 256
    y = dequantize(*quantize(x, kind, 256), kind, 256, 1000)
    assert not bool(torch.isfinite(y[256:512]).any())  # the whole block is non-finite
    assert bool(torch.isfinite(y[:256]).all()) and bool(torch.isfinite(y[512:]).all())


@pytest.mark.timeout(60)
def test_bad_kind_and_block_name_the_fix():
    with pytest.raises(ValueError, match="--diloco-allreduce-dtype"):
        quantize(torch.zeros(4), "int4", 256)
    with pytest.raises(ValueError, match="block"):
        quantize(torch.zeros(4), "int8", 0)
    with pytest.raises(ValueError, match="--diloco-allreduce-dtype"):
        payload_bytes(10, 2, "fp16", 256)


@pytest.mark.timeout(60)
def test_payload_bytes_by_hand():
    # 1000 values, W = 3, block 256: chunk C = ceil(1000/768)·256 = 512 (2 blocks), packed chunk
    # 2·4 + 512 = 520 bytes, 2 chunks into the all-to-all + 1 into the all-gather = 1560.
    assert payload_bytes(1000, 3, "int8", 256) == 1560
    assert payload_bytes(1000, 3, "fp8", 256) == 1560
    # W = 2: C = ceil(1000/512)·256 = 512, 520 bytes, 1 + 1 chunks = 1040.
    assert payload_bytes(1000, 2, "int8", 256) == 1040
    assert payload_bytes(1000, 1, "int8", 256) == 0
    assert payload_bytes(1000, 3, "fp32") == 4000 and payload_bytes(1000, 3, "bf16") == 2000
    for world in (2, 3, 8, 64):
        n = 10_000_000
        assert payload_bytes(n, world, "int8", 256) <= 0.27 * 4 * n


@pytest.mark.timeout(300)
def test_block_256_beats_per_row_on_outliers():
    """The measurement behind the default (docs/compression.md): smaller blocks isolate outliers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4096, generator=g) * 1e-3
    idx = torch.randint(0, x.numel(), (x.numel() // 1000,), generator=g)
    x.view(-1)[idx] *= 50
    rel = {}
    for kind in KINDS:
        for block in (256, 4096, x.numel()):
            y = dequantize(*quantize(x, kind, block), kind, block, x.numel())
            rel[kind, block] = float((y - x.view(-1)).norm() / x.norm())
    assert rel["int8", 256] < 0.5 * rel["int8", 4096] < rel["int8", x.numel()]
    assert rel["fp8", 256] < rel["fp8", 4096] < rel["fp8", x.numel()]
    assert rel["int8", 256] < 0.05 and rel["fp8", 256] < 0.03


# ------------------------------------------------------------------- multi-rank workers
_WATCHED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "broadcast",
            "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "send", "recv", "isend",
            "irecv", "batch_isend_irecv")
_INPUT_ARG = {"all_to_all_single": 1, "all_gather_into_tensor": 1}  # position of the input tensor


class _Recorder:
    """Wraps the torch.distributed collectives (test only) and records what goes into them."""

    def __init__(self):
        self.dist, self.calls, self.saved = dist, [], {}

    def __enter__(self):
        for name in _WATCHED:
            fn = getattr(self.dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                t = args[_INPUT_ARG.get(_name, 0)] if len(args) > _INPUT_ARG.get(_name, 0) else None
                if isinstance(t, torch.Tensor):
                    self.calls.append((_name, str(t.dtype), t.numel() * t.element_size()))
                else:
                    self.calls.append((_name, None, None))
                return _fn(*args, **kwargs)

            setattr(self.dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)


def _gather_inputs(x):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.stack(parts)


def _reduce_worker(rank, world_size, cases):
    out = []
    for kind, n, block in cases:
        x = _delta(n, seed=1000 * rank + n)
        inputs = _gather_inputs(x)
        exact = x.clone()
        dist.all_reduce(exact)  # plain fp32 all-reduce of the same inputs
        y = x.clone()
        with _Recorder() as rec:
            sent = quantized_all_reduce_(y, dist.group.WORLD, kind, block)
        out.append({"kind": kind, "n": n, "block": block, "inputs": inputs, "exact": exact, "result": y,
                    "sent": sent, "calls": rec.calls})
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 3])
def test_quantized_all_reduce_matches_fp32_sum(world):
    cases = [(k, n, 256) for k in KINDS for n in (1000, 1536, 5)] + [("int8", 200_003, 256), ("fp8", 4096, 64)]
    res = run_ranks(world, "tests.test_compress:_reduce_worker", {"cases": cases}, timeout=400)
    for i, (kind, n, block) in enumerate(cases):
        per_rank = [r[i] for r in res]
        first = per_rank[0]
        for r in per_rank[1:]:  # every rank holds bit-identical values
            assert torch.equal(r["result"].view(torch.int32), first["result"].view(torch.int32)), (kind, n)
        xs = first["inputs"].double()
        err = (first["result"].double() - first["exact"].double()).abs()
        bound = _sum_bound(xs, kind, block)
        assert bool((err <= bound).all()), (kind, n, float((err - bound).max()))
        if n >= 512:
            assert torch.equal(first["result"][256:512], torch.zeros(256))
        # Bytes: exactly what entered the collectives, one all-to-all + one all-gather of uint8.
        chunk = math.ceil(n / (world * block)) * block
        row = chunk + 4 * (chunk // block)  # by hand: payload + fp32 scales of one chunk
        for rank, r in enumerate(per_rank):
            names = [c[0] for c in r["calls"]]
            assert names == ["all_to_all_single", "all_gather_into_tensor"], names
            assert all(c[1] == "torch.uint8" for c in r["calls"]), r["calls"]
            handed = sum(c[2] for c in r["calls"])
            assert r["sent"] == handed == world * row == payload_bytes(n, world, kind, block), (r["sent"], handed)
            if n > 100_000:
                assert handed <= 0.27 * 4 * n, handed / (4 * n)


def _ef_worker(rank, world_size, rounds):
    """Error feedback over ``rounds`` rounds: the cumulative result against the cumulative exact sum."""
    W = world_size
    out = {}
    scenarios = {}
    # Biased phase (b): one 1.0 per block, the rest 0.49 of a quantization step: always rounds to 0.
    b = torch.full((1000,), 0.49 / 127)
    b[::256] = 1.0
    scenarios["bias_b"] = ("int8", lambda t: b.clone())
    # Biased phase (c): every contribution exact in int8 (scale 1), the sum's element 1 is 1 at
    # scale 3 (rounds to 0) each round: only the re-quantization error feeds back.
    c = torch.zeros(768)
    c[::256] = 127.0
    if rank == 0:
        c[1::256] = 1.0
    scenarios["bias_c"] = ("int8", lambda t: c.clone())
    for kind in KINDS:  # fresh random deltas every round
        scenarios[f"random_{kind}"] = (kind, lambda t: torch.randn(1000, generator=torch.Generator().manual_seed(
            7919 * t + rank)))
    for name, (kind, make) in scenarios.items():
        for ef in (True, False):
            residual = new_residual(make(0).numel()) if ef else None
            cum_q = cum_x = None
            max_abs, errs = 0.0, []
            for t in range(rounds):
                d = make(t)
                inputs = _gather_inputs(d).double()
                max_abs = max(max_abs, float(inputs.abs().max()))
                y = d.clone()
                quantized_all_reduce_(y, dist.group.WORLD, kind, 256, residual=residual)
                cum_q = y.double() if cum_q is None else cum_q + y.double()
                cum_x = inputs.sum(0) if cum_x is None else cum_x + inputs.sum(0)
                errs.append(float((cum_q - cum_x).abs().max()))
            out[name, ef] = {"kind": kind, "errs": errs, "max_abs": max_abs, "W": W}
    return out


def _ef_bound(kind: str, W: int, M: float) -> float:
    """Hand bound of the cumulative error with error feedback, by elements of absmax <= M.

    One quantization errs by at most eps·(block absmax): eps = 1/254 (int8), 1/16 (fp8, since
    max(|x|/16, a/448/1024) <= a/16). With residuals r (|r| <= rho) a rank quantizes
    x = Δ + r, |x| <= M + rho, and the sum it owns has |S| <= W(M + rho), so
    rho <= eps(M + rho) + eps·W(M + rho)  =>  rho <= (W+1)·eps·M / (1 - (W+1)·eps).
    The cumulative error telescopes to minus the residuals held at the end: each element has
    W phase-(b) parts and one owner's phase-(c) part, <= W·eps(M+rho) + eps·W(M+rho)."""
    eps = 1 / 254 if kind == "int8" else 1 / 16
    rho = (W + 1) * eps * M / (1 - (W + 1) * eps)
    return 2 * W * eps * (M + rho) * (1 + SLACK)


@pytest.mark.timeout(600)
def test_error_feedback_keeps_cumulative_error_bounded():
    rounds = 20
    res = run_ranks(3, "tests.test_compress:_ef_worker", {"rounds": rounds}, timeout=400)
    for name, ef in res[0]:
        for r in res:  # every rank saw the same results
            assert r[name, ef]["errs"] == res[0][name, ef]["errs"], name
    out = res[0]
    for name in ("bias_b", "bias_c", "random_int8", "random_fp8"):
        s = out[name, True]
        bound = _ef_bound(s["kind"], s["W"], s["max_abs"])
        assert max(s["errs"]) <= bound, (name, s["errs"], bound)  # every round, not growing with R
    # Without feedback the biased cases grow linearly, by the hand-computed amount per round.
    W = 3
    per_round = {"bias_b": W * 0.49 / 127, "bias_c": 1.0}
    for name, step in per_round.items():
        errs = out[name, False]["errs"]
        assert errs[-1] == pytest.approx(rounds * step, rel=1e-4), (name, errs[-1])
        assert errs[-1] > 5 * _ef_bound("int8", W, out[name, False]["max_abs"])
        assert errs[rounds // 2 - 1] == pytest.approx(rounds // 2 * step, rel=1e-4)


def _non_finite_worker(rank, world_size):
    out = []
    for kind in KINDS:
        for bad in ("nan", "inf", "-inf"):
            for where in (300, 900):  # chunk of rank 0 (sent by all-to-all), chunk of rank 1 (kept)
                x = torch.randn(1000, generator=torch.Generator().manual_seed(rank))
                if rank == 1:
                    x[where] = float(bad)
                residual = torch.full((1000,), 1e-4 * (rank + 1))
                before = residual.clone()
                quantized_all_reduce_(x, dist.group.WORLD, kind, 256, residual=residual)
                out.append({"case": (kind, bad, where), "result": x, "residual_kept": torch.equal(residual, before)})
    return out


@pytest.mark.timeout(600)
def test_non_finite_input_reaches_every_rank():
    res = run_ranks(3, "tests.test_compress:_non_finite_worker", timeout=300)
    for i, case in enumerate(res[0]):
        kind, bad, where = case["case"]
        lo = where // 256 * 256
        for r in res:
            y = r[i]["result"]
            assert not bool(torch.isfinite(y[lo:lo + 256]).any()), case["case"]  # the block is non-finite
            assert bool(torch.isfinite(y[:lo]).all()) and bool(torch.isfinite(y[lo + 256:]).all()), case["case"]
            assert r[i]["residual_kept"], case["case"]  # the skipped round leaves the residual as it was
            assert torch.equal(y.view(torch.int32), res[0][i]["result"].view(torch.int32))


def _single_and_thread_worker(rank, world_size):
    singles = [dist.new_group([r]) for r in range(world_size)]
    both = dist.new_group(list(range(world_size)))
    out = {}
    x = _delta(1000, seed=rank)
    for kind in KINDS:
        # W = 1: no collective at all, the result is the local round trip; residual = x - result.
        y, residual = x.clone(), new_residual(1000)
        with _Recorder() as rec:
            sent = quantized_all_reduce_(y, singles[rank], kind, 256, residual=residual)
        out[kind] = {"x": x, "y": y, "residual": residual.clone(), "sent": sent, "calls": rec.calls}
    # A background thread on its own group while the main thread uses the world group.
    ref = x.clone()
    quantized_all_reduce_(ref, dist.group.WORLD, "int8", 256)
    y, errors = x.clone(), []

    def bg():
        try:
            for _ in range(5):
                y.copy_(x)
                quantized_all_reduce_(y, both, "int8", 256)
        except BaseException as e:  # reported to the parent
            errors.append(repr(e))

    th = threading.Thread(target=bg)
    th.start()
    busy = torch.ones(10_000)
    for _ in range(20):
        dist.all_reduce(busy, group=dist.group.WORLD)
    th.join(timeout=120)
    out["thread"] = {"ref": ref, "y": y, "errors": errors, "alive": th.is_alive(), "busy": float(busy[0])}
    return out


@pytest.mark.timeout(600)
def test_single_rank_group_and_background_thread():
    res = run_ranks(2, "tests.test_compress:_single_and_thread_worker", timeout=300)
    for r in res:
        for kind in KINDS:
            s = r[kind]
            assert s["calls"] == [] and s["sent"] == 0
            ref = _ref_int8(s["x"], 256) if kind == "int8" else _ref_fp8(s["x"], 256)
            assert torch.allclose(s["y"], ref, rtol=1e-6, atol=0.0), kind
            assert torch.allclose(s["residual"], s["x"] - ref, rtol=0.0, atol=1e-9), kind
        t = r["thread"]
        assert t["errors"] == [] and not t["alive"]
        assert t["busy"] == 2.0 ** 20  # the main thread's 20 world all-reduces of ones on 2 ranks
        assert torch.equal(t["y"], t["ref"])  # the same sum from the background thread's group
    assert torch.equal(res[0]["thread"]["y"], res[1]["thread"]["y"])


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_check.sh runs it on the GPU)")
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_cuda_quantization_stays_on_the_device_and_matches_the_cpu(kind):
    """On CUDA nothing moves to the host (the sync-debug mode turns any device-to-host copy into an
    error) and the bytes equal the CPU computation's."""
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3)) * 1e-3
    x[17] = 0.5  # an outlier block
    q_cpu, s_cpu = quantize(x, kind, 256)
    xc = x.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q, s = quantize(xc, kind, 256)
        back = dequantize(q, s, kind, 256, x.numel())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert q.device.type == s.device.type == back.device.type == "cuda"
    assert torch.equal(q.cpu(), q_cpu) and torch.equal(s.cpu(), s_cpu)
    assert torch.equal(back.cpu(), dequantize(q_cpu, s_cpu, kind, 256, x.numel()))
