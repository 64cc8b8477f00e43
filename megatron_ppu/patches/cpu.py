"""Runtime patches that let megatron-core (0.16.1 to 0.19.x) run on CPU with the gloo backend.

Each patch is small, names the call site it covers and why, and is applied only
by :func:`apply_cpu_patches` (explicitly, by tests, the CPU demo and the training
entry point when no GPU is present). Nothing is patched on import.

Call sites (megatron/core, 0.16.1):

* ``torch.cuda.current_device()`` used as a *device* in ~40 places (global memory
  buffer for attention, rotary embedding, TP mappings, DDP buffers, p2p shapes):
  on a CPU-only torch it raises. :func:`_patch_current_device` makes it return the
  CPU device while CUDA is unavailable.
* ``torch.cuda.synchronize()`` in p2p_communication and async checkpoint saving:
  a no-op without CUDA.
* Hard-coded ``device="cuda"`` literals: transformer/utils.py
  ``get_default_causal_mask`` (reached when attention_mask is None), the three
  pipeline schedules (``total_num_tokens``), optimizer/optimizer.py
  (``found_inf``, ``_scale_one``, ...), optimizer/clip_grads.py (grad norm,
  zero counting), optimizer/grad_scaler.py (fp16 loss scale), utils.py
  ``local_multi_tensor_l2_norm``; and ``weight.data.cuda()`` in
  ``LanguageModule.setup_embeddings_and_output_layer`` (tied embeddings with PP > 1,
  where the first and last stages all-reduce the shared weight). Rewritten to ``"cpu"`` with
  :func:`patches._rewrite.rewrite_function`, which fails loudly if the source
  changed.
* Type-string checks ``param.type() == 'torch.cuda.FloatTensor'`` (and Half/BFloat16)
  in clip_grads, ``Float16OptimizerWithFloat16Params.__init__`` and the distributed
  optimizer: a CPU tensor's type string has no ``.cuda``.
* The "CUDA" RNG tracker (tensor_parallel/random.py): ``model_parallel_cuda_manual_seed``,
  attention dropout (``get_cuda_rng_tracker().fork()``) and activation recompute
  (``_get_all_rng_states``) read CUDA generators. :class:`CPURNGStatesTracker`
  keeps the named states of the CPU generator instead, so dropout and recompute
  stay reproducible.

Call sites added in later megatron-core versions (rewritten only where the installed version
has them, :func:`_patch_cuda_literals_of_later_versions`):

* 0.17: ``_ParamAndGradBucketGroup.start_grad_sync`` (distributed/param_and_grad_buffer.py)
  reads ``torch.cuda.current_stream()`` to wait for CUDA-graph weight-gradient events; no
  parameter has such an event on CPU, so the stream is ``None`` there.
* 0.19: ``MegatronOptimizer.has_grad_norm_group`` (optimizer/optimizer.py) all-reduces a flag
  made with ``device='cuda'``.

Not patched: ``WrappedTorchNorm`` refuses ``sequence_parallel`` on every device (CPU
or CUDA). The project's specs use their own torch norms instead
(:mod:`megatron_ppu.norms`, through :func:`megatron_ppu.spec.get_gpt_decoder_ppu_spec`),
so ``--sequence-parallel`` works the same way with and without these patches.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from . import compat
from ._rewrite import rewrite_function

logger = logging.getLogger(__name__)

#: The megatron-core versions these patches were written for (each rewrite also fails loudly
#: when the source it expects is not there).
SUPPORTED_MEGATRON_CORE = ">=0.16.1,<0.20"
_APPLIED = False


def _check_version() -> None:
    compat.check_supported()


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None


_CUDA_LITERALS = [('device="cuda"', 'device="cpu"'), ("device='cuda'", "device='cpu'")]
_CUDA_TYPE_STRINGS = [
    (f"'torch.cuda.{t}Tensor'", f"'torch.{t}Tensor'") for t in ("Float", "Half", "BFloat16")
]


def _patch_cuda_literals() -> None:
    from megatron.core import utils as mc_utils
    from megatron.core.optimizer import clip_grads, grad_scaler, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils as tr_utils

    rewrite_function(tr_utils, "get_default_causal_mask", _CUDA_LITERALS)
    rewrite_function(tr_utils, "get_sliding_window_causal_mask", _CUDA_LITERALS)
    for name in (
        "forward_backward_no_pipelining",
        "forward_backward_pipelining_with_interleaving",
        "forward_backward_pipelining_without_interleaving",
    ):
        rewrite_function(schedules, name, _CUDA_LITERALS)
    rewrite_function(optimizer.MixedPrecisionOptimizer, "__init__", _CUDA_LITERALS)
    rewrite_function(optimizer.FP32Optimizer, "__init__", _CUDA_LITERALS)
    rewrite_function(optimizer.Float16OptimizerWithFloat16Params, "__init__", _CUDA_TYPE_STRINGS)
    from megatron.core.optimizer import distrib_optimizer

    rewrite_function(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups", _CUDA_TYPE_STRINGS)
    rewrite_function(distrib_optimizer.DistributedOptimizer, "__init__", _CUDA_TYPE_STRINGS)
    rewrite_function(clip_grads, "get_grad_norm_fp32", _CUDA_LITERALS)
    rewrite_function(
        clip_grads,
        "clip_grad_by_total_norm_fp32",
        _CUDA_LITERALS + [("'torch.cuda.FloatTensor'", "'torch.FloatTensor'")],
    )
    rewrite_function(clip_grads, "count_zeros_fp32", _CUDA_LITERALS)
    rewrite_function(grad_scaler.MegatronGradScaler, "__init__", _CUDA_LITERALS)
    rewrite_function(grad_scaler.DynamicGradScaler, "__init__", _CUDA_LITERALS)
    rewrite_function(mc_utils, "local_multi_tensor_l2_norm", _CUDA_LITERALS)
    from megatron.core.models.common.language_module import language_module

    rewrite_function(language_module.LanguageModule, "setup_embeddings_and_output_layer",
                     [("weight.data = weight.data.cuda()", "weight.data = weight.data")], expected=1)


def _patch_cuda_literals_of_later_versions() -> None:
    if compat.at_least("0.17"):
        from megatron.core.distributed import param_and_grad_buffer

        rewrite_function(param_and_grad_buffer._ParamAndGradBucketGroup, "start_grad_sync",
                         [("current_stream = torch.cuda.current_stream()", "current_stream = None")], expected=1)
    if compat.at_least("0.19"):
        from megatron.core.optimizer import optimizer

        rewrite_function(optimizer.MegatronOptimizer, "has_grad_norm_group", [("device='cuda'", "device='cpu'")],
                         expected=1)


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel import random as tp_random

    class CPURNGStatesTracker(tp_random.CudaRNGStatesTracker):
        """Megatron's named-RNG-state tracker backed by the CPU generator."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CPURNGStatesTracker


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tracker_cls = _make_cpu_tracker_class()
    tp_random.CPURNGStatesTracker = tracker_cls
    original_init = tp_random.initialize_rng_tracker

    def initialize_rng_tracker(use_te_rng_tracker=False, inference_rng_tracker=False,
                               use_cudagraphable_rng=False, force_reset=False):
        if force_reset:
            tp_random._CUDA_RNG_STATE_TRACKER = None
            tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
        if tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            return
        if use_te_rng_tracker or use_cudagraphable_rng:
            raise ValueError("Transformer Engine / CUDA-graph RNG trackers need a GPU.")
        tp_random._CUDA_RNG_STATE_TRACKER = tracker_cls()
        tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    initialize_rng_tracker.__ppu_original__ = original_init
    tp_random.initialize_rng_tracker = initialize_rng_tracker
    # Activation recompute saves/restores "cuda" RNG state around the recomputed
    # forward; the CPU generator is already covered by torch.get_rng_state there.
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)


def apply_cpu_patches() -> None:
    """Apply every CPU/gloo patch (idempotent).

    Call this explicitly before building megatron models on a machine without
    CUDA. Raises ``RuntimeError`` on a CUDA machine (the patches would hide real
    device placement bugs there) or on an unsupported megatron-core version.
    """
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_patches() is for machines without CUDA; do not call it on a GPU machine.")
    _check_version()
    _patch_current_device()
    _patch_cuda_literals()
    _patch_cuda_literals_of_later_versions()
    _patch_rng()
    _APPLIED = True
    logger.info("megatron-core %s patched for CPU/gloo execution", compat.megatron_core_version())
