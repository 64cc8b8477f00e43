"""What differs between the supported megatron-core versions (0.16.1 to 0.19.x), in one place.

megatron_ppu has one code path; where megatron-core changed an interface or a convention it
asks this module, and each function here names the megatron-core change it covers and the
version that made it. Nothing here replaces megatron-core code (the CPU call-site rewrites that
depend on the version are in :mod:`megatron_ppu.patches.cpu`). Python 3.11 installs 0.16.1
(0.17 and later need Python >= 3.12); Python >= 3.12 installs 0.19.x (``setup.py``).

Gates (megatron-core version that changed it, function here, who asks):

* 0.17: the NullTokenizer's library is named ``null-text`` (was ``null``):
  :func:`null_tokenizer_library` (``megatron_ppu.data.tokenizers``).
* 0.18: ``NullTokenizer(N)`` has N ids with end-of-document N-1 (was N+1 ids, eod N). Not a
  gate: megatron_ppu reads ``vocab_size``/``eod`` from the installed tokenizer (Megatron-LM's
  convention of the installed version; :func:`null_tokenizer_convention` says which, for docs
  and messages).
* 0.18: a GPT layer spec's ``mlp`` is a builder (``partial(MLP.as_mlp_submodule, submodules=...)``,
  was a ``ModuleSpec``): :func:`mlp_submodules` (``megatron_ppu.spec``). ``MLP``/``SelfAttention``
  now call ``linear_fc1``/``linear_fc2``/``linear_proj`` directly (was ``build_module(spec)``);
  that needs no gate, as a ``ModuleSpec`` is callable there (``ModuleSpec.__call__`` builds it).
* 0.19: ``ProcessGroupCollection`` has ``dp_cp_gtp_remat`` / ``expt_dp_gtp_remat``, which
  ``finalize_model_grads`` reduces over: :func:`replica_data_parallel_fields`
  (``megatron_ppu.parallel``).
* 0.19: ``dist_checkpointing.save`` writes no ``common.pt``; the shared state is a sharded
  object ``common_state`` in the ``.distcp`` files: :func:`common_state_format`,
  :func:`checkpoint_unreadable_reason`, :func:`read_common_state`
  (``megatron_ppu.training.checkpointing``).
* 0.19: optimizer parameter groups are matched on load by ``max_lr``, ``min_lr``, ``start_wd``,
  ``end_wd``, ``wd_mult`` and ``optimizer`` too (was ``wd_mult``, ``lr_mult``,
  ``is_expert_parallel``, ``is_decoupled_lr``): :func:`load_optimizer_state_dict`.
* 0.19: ``GPTModel.__init__`` logs that GPTModel is deprecated in favour of ``HybridModel``:
  :func:`quiet_gpt_model_deprecation`.
"""
from __future__ import annotations

import functools
import logging
import os
from importlib.metadata import version as _dist_version
from typing import Dict, List, Optional, Tuple

from packaging.version import Version

logger = logging.getLogger(__name__)

#: The oldest and the first unsupported megatron-core release.
MIN_MEGATRON_CORE, MAX_MEGATRON_CORE_EXCLUSIVE = Version("0.16.1"), Version("0.20")


@functools.lru_cache(maxsize=None)
def megatron_core_version() -> Version:
    """The installed megatron-core's version."""
    return Version(_dist_version("megatron-core"))


def at_least(release: str) -> bool:
    """Whether the installed megatron-core is ``release`` or newer (``"0.19"`` counts 0.19.0rc too)."""
    return megatron_core_version().release >= Version(release).release


def check_supported() -> None:
    """Raise ``RuntimeError`` unless the installed megatron-core is one megatron_ppu supports."""
    found = megatron_core_version()
    if not MIN_MEGATRON_CORE <= found < MAX_MEGATRON_CORE_EXCLUSIVE:
        raise RuntimeError(
            f"megatron_ppu supports megatron-core {MIN_MEGATRON_CORE} to 0.19.x, found {found}. "
            "Install it with `pip install -e .` (Python 3.11: 0.16.1; Python >= 3.12: 0.19.x).")


# -- tokenizers ------------------------------------------------------------------------------------
def null_tokenizer_library() -> str:
    """``MegatronTokenizer.from_pretrained(metadata_path={"library": ...})`` of the NullTokenizer:
    megatron-core 0.17 renamed the library ``null`` to ``null-text`` (``null-multimodal`` beside it)."""
    return "null-text" if at_least("0.17") else "null"


def null_tokenizer_convention(n: int) -> Tuple[int, int]:
    """(vocabulary size, end-of-document id) of megatron-core's ``NullTokenizer(n)``: ``(n + 1, n)``
    before 0.18, ``(n, n - 1)`` from 0.18 on (Megatron-LM's convention of the installed version)."""
    return (n, n - 1) if at_least("0.18") else (n + 1, n)


# -- layer specs -----------------------------------------------------------------------------------
def mlp_submodules(layer_submodules):
    """The ``MLPSubmodules`` of a layer spec's ``mlp``: a ``ModuleSpec`` before megatron-core 0.18,
    a builder ``partial(MLP.as_mlp_submodule, submodules=...)`` from 0.18 on. Returned by reference:
    editing its fields edits the spec."""
    mlp = layer_submodules.mlp
    if isinstance(mlp, functools.partial):
        assert at_least("0.18"), "a partial mlp builder before megatron-core 0.18"
        return mlp.keywords["submodules"]
    return mlp.submodules


# -- process groups --------------------------------------------------------------------------------
def replica_data_parallel_fields() -> Tuple[str, ...]:
    """The ``ProcessGroupCollection`` fields that are data-parallel groups (a DiLoCo replica's
    inner-DP group in megatron_ppu). megatron-core 0.19 added ``dp_cp_gtp_remat`` and
    ``expt_dp_gtp_remat`` (dp_cp / expt_dp times the GTP re-materialisation axis, equal to them
    without GTP), over which ``finalize_model_grads`` reduces."""
    base = ("dp", "dp_cp", "intra_dp_cp", "expt_dp", "intra_expt_dp")
    return base + (("dp_cp_gtp_remat", "expt_dp_gtp_remat") if at_least("0.19") else ())


# -- checkpoints -----------------------------------------------------------------------------------
COMMON_PT = "common.pt"
_COMMON_STATE_KEY = "common_state"


def common_state_format(path: str) -> Optional[str]:
    """Where the torch_dist checkpoint at ``path`` keeps its shared (non-sharded) state:
    ``"common.pt"`` (megatron-core before 0.19), ``"distcp"`` (0.19: a sharded object
    ``common_state`` in the ``.distcp`` files, named in ``.metadata``), or None when neither
    is there (an incomplete checkpoint)."""
    if os.path.isfile(os.path.join(path, COMMON_PT)):
        return "common.pt"
    if not os.path.isfile(os.path.join(path, ".metadata")):
        return None
    try:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(path).read_metadata()
    except Exception:  # a corrupt .metadata: the caller's own reading reports it
        return None
    # the sharded object's key in .metadata is its unique key, "common_state/shard_0_1"
    keys = md.state_dict_metadata or {}
    return "distcp" if any(k == _COMMON_STATE_KEY or k.startswith(_COMMON_STATE_KEY + "/") for k in keys) else None


def checkpoint_unreadable_reason(path: str) -> Optional[str]:
    """Why the installed megatron-core cannot read the torch_dist checkpoint at ``path``, or None.
    A checkpoint of megatron-core 0.19 (shared state in the ``.distcp`` files, no ``common.pt``)
    cannot be read by megatron-core before 0.19, whose loader reads ``common.pt``."""
    if common_state_format(path) == "distcp" and not at_least("0.19"):
        return (f"{path} was written by megatron-core 0.19 or later (its shared state is in the .distcp "
                f"files; it has no {COMMON_PT}), which megatron-core {megatron_core_version()} cannot read. "
                f"Load it with megatron-core 0.19 (Python >= 3.12: PYTHON=python3.12 bash scripts/setup_env.sh); "
                f"a megatron_ppu checkpoint also resumes here without --finetune (its ppu/ part).")
    return None


def read_common_state(path: str) -> dict:
    """The shared state dict (``args``, ``iteration``, ...) of the torch_dist checkpoint at ``path``
    without process groups: ``common.pt`` (before megatron-core 0.19) or the ``common_state``
    sharded object (0.19, read through megatron-core's ``load_common_state_dict``). Raises
    ``ValueError`` with :func:`checkpoint_unreadable_reason` when the installed megatron-core
    cannot read it."""
    reason = checkpoint_unreadable_reason(path)
    if reason:
        raise ValueError(reason)
    f = os.path.join(path, COMMON_PT)
    if os.path.isfile(f):
        import torch

        return torch.load(f, map_location="cpu", weights_only=False)
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(path)


# -- optimizer state -------------------------------------------------------------------------------
#: megatron-core 0.16.1's param_group_identifier_keys (how a saved group finds its current group).
_GROUP_KEYS_016 = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")
#: Schedule bounds that a loaded group takes from the checkpoint (torch's load_state_dict semantics).
_SCHEDULE_BOUNDS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _group_key(group: dict, keys) -> tuple:
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in keys)


def _saved_groups(state: dict) -> List[dict]:
    if "param_groups" in state:  # FP32Optimizer
        return state["param_groups"]
    inner = state.get("optimizer", state.get("optimizer_state_dict"))  # Float16 / Distributed
    return inner["param_groups"]


def load_optimizer_state_dict(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict(state_dict)`` with megatron-core 0.16.1's matching of parameter
    groups on every version.

    megatron-core 0.19 pairs a saved group with the current one by ``max_lr``, ``min_lr``,
    ``start_wd``, ``end_wd``, ``wd_mult`` and ``optimizer`` too, so a resume with another ``--lr``
    stops ("Could not find parameter group") even where the run asks for its own schedule
    (``--override-opt_param-scheduler``). Here each saved group is paired by 0.16.1's keys and
    given the current group's values of the new keys before loading; after loading, the groups
    hold the checkpoint's schedule bounds, as torch's ``load_state_dict`` gives them on 0.16.1
    (the caller then applies ``--override-opt_param-scheduler`` as before)."""
    if not at_least("0.19"):
        optimizer.load_state_dict(state_dict)
        return
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    new_keys = [k for k in param_group_identifier_keys if k not in _GROUP_KEYS_016]
    opts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if len(opts) == 1:
        states = [state_dict]
    else:
        states = [v for _, v in sorted(state_dict.items())] if isinstance(state_dict, dict) else list(state_dict)
    restore: List[Tuple[object, List[Dict]]] = []
    for opt, state in zip(opts, states):
        current = opt.optimizer.param_groups
        saved_bounds = []
        saved = _saved_groups(state)
        for c in current:
            match = [g for g in saved if _group_key(g, _GROUP_KEYS_016) == _group_key(c, _GROUP_KEYS_016)]
            saved_bounds.append({k: match[0][k] for k in _SCHEDULE_BOUNDS if match and match[0].get(k) is not None})
            if any(_group_key(g, param_group_identifier_keys) == _group_key(c, param_group_identifier_keys)
                   for g in saved):
                continue  # 0.19's own matching finds it
            for g in match:
                for k in new_keys:
                    if k in c:
                        g[k] = c[k]
                    else:  # 0.19 matches a missing key as None; a None value would reach the scheduler
                        g.pop(k, None)
        restore.append((opt, saved_bounds))
    optimizer.load_state_dict(state_dict)
    for opt, saved_bounds in restore:
        for group, bounds in zip(opt.optimizer.param_groups, saved_bounds):
            group.update(bounds)


# -- logging ---------------------------------------------------------------------------------------
_DEPRECATION_TEXT = "GPTModel IS DEPRECATED"


class _DropGPTModelDeprecation(logging.Filter):
    """Drops megatron-core 0.19's "GPTModel IS DEPRECATED ..." record (see
    :func:`quiet_gpt_model_deprecation`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _DEPRECATION_TEXT not in str(record.msg)


def quiet_gpt_model_deprecation() -> None:
    """Silence megatron-core 0.19's warning, logged at every ``GPTModel`` construction, that
    ``GPTModel`` is deprecated in favour of ``HybridModel`` (idempotent; nothing before 0.19).

    megatron_ppu keeps ``GPTModel`` on every version (one code path): its parameter names are
    those of the GPT checkpoints of Megatron-LM and of earlier megatron_ppu runs, which must keep
    loading, and megatron-core 0.19 still takes bug fixes for it. The warning asks nothing of a
    user, so it is dropped rather than repeated at every model build."""
    if not at_least("0.19"):
        return
    mc_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    if not any(isinstance(f, _DropGPTModelDeprecation) for f in mc_logger.filters):
        mc_logger.addFilter(_DropGPTModelDeprecation())
