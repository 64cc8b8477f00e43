"""The checkpoint format: which files a checkpoint has, when it is complete, which one ``--load`` finds.

::

    SAVE/
      latest_checkpointed_iteration.txt   Megatron-LM's tracker file (the iteration, or "release")
      iter_0000100/                       a complete checkpoint (appears by rename only)
        metadata.json, common.pt, .metadata, __R_0.distcp
                                            the model, via megatron.core.dist_checkpointing,
                                            in Megatron's full layout under key "model"
                                            (replicated tensors written once, by one rank);
                                            common.pt holds Megatron-LM's "args" (megatron_lm_args)
        ppu/run.json                        iteration, data position, layout, plan summary
        ppu/rank_00003.pt                   per rank: LR scheduler, ownership plan, RNG states,
                                            and this rank's share of its replica's state
      .iter_0000200.tmp-<nonce>/          a save in progress: never read, removed later

This module owns the names and the rules of reading them: the tracker and ``iter_*`` names
(Megatron-LM's), :data:`FORMAT_VERSION` of the ``ppu/`` part, what makes a folder a complete
checkpoint (megatron_ppu's ``ppu/run.json``, written last, or Megatron-LM's torch_dist
``metadata.json`` + ``common.pt``: :func:`is_complete`), which checkpoint a ``--load`` folder
names (:func:`find_checkpoint`, one rank's view; :func:`resolve_checkpoint`, global rank 0's
choice for every rank), reading ``ppu/run.json`` and a rank's ``ppu/rank_*.pt``, what a
checkpoint must match to be resumed (:func:`check_compatible`), whether a rank sees the whole
model part (:func:`check_model_part`), and the ``args`` entry of ``common.pt`` in Megatron-LM's
form (:func:`megatron_lm_args`, :func:`read_checkpoint_args`). Writing the files is
:mod:`.save_load`'s; what the Megatron-LM entries hold and how they are loaded is
:mod:`.megatron_lm`'s.

What ``--load`` finds (:func:`resolve_checkpoint`):

* ``--save D --load D`` with D absent or without any checkpoint: a first launch (None); the
  run starts from scratch (Megatron-LM's usual auto-resume idiom).
* ``--load D`` (D not the ``--save`` folder) or ``--finetune`` that finds nothing to load, a
  tracker pointing at a missing folder, or ``iter_*`` folders none of which is complete:
  ``CheckpointError`` (the user meant a checkpoint; never a silent fresh start).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import uuid
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from ...patches import compat
from .verdicts import SHARED_FS_FIX, CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 2
RELEASE = "release"
#: Megatron-LM's ``checkpoint_version`` of its torch_dist checkpoints (megatron/training/checkpointing.py).
MEGATRON_CHECKPOINT_VERSION = 3.0


def iter_dir_name(iteration: int) -> str:
    """Megatron-LM's name of the folder of ``iteration``."""
    return f"iter_{iteration:07d}"


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, fsynced, then renamed over it)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(path: str) -> bool:
    """Whether ``path`` is a complete checkpoint: megatron_ppu's (``ppu/run.json``, written last)
    or Megatron-LM's torch_dist one (``metadata.json``, which dist_checkpointing writes after
    every shard, and ``common.pt``, or with megatron-core 0.19 the shared state in the ``.distcp``
    files: :func:`megatron_ppu.patches.compat.common_state_format`)."""
    return os.path.isfile(os.path.join(path, "ppu", "run.json")) or (
        os.path.isfile(os.path.join(path, "metadata.json")) and compat.common_state_format(path) is not None)


def is_ours(path: str) -> bool:
    """Whether the checkpoint at ``path`` has megatron_ppu's ``ppu/`` part (else it is Megatron-LM's)."""
    return os.path.isfile(os.path.join(path, "ppu", "run.json"))


def find_checkpoint(load_dir: str) -> Optional[str]:
    """The complete checkpoint in ``load_dir`` (this rank's view), or None if the folder is
    absent or holds no checkpoint.

    As Megatron-LM: the tracker file names the iteration (``iter_NNNNNNN``) or ``release``
    (the ``release/`` folder). Without a tracker, the newest complete ``iter_*`` (a Megatron-LM
    run whose tracker was lost, or a copied folder). A checkpoint is megatron_ppu's or
    Megatron-LM's (:func:`is_complete`). Raises ``CheckpointError`` for a tracker that points at
    a missing or incomplete folder or holds neither, and for ``iter_*`` folders none of which is
    complete."""
    if not os.path.isdir(load_dir):
        return None
    tracker = os.path.join(load_dir, TRACKER)
    if os.path.isfile(tracker):
        text = open(tracker, encoding="utf-8").read().strip()
        if not text.isdigit() and text != RELEASE:
            raise CheckpointError(f"{tracker} contains neither an iteration number nor 'release' ({text!r}); "
                                  f"remove it to fall back to the newest complete iter_* directory.")
        path = os.path.join(load_dir, RELEASE if text == RELEASE else iter_dir_name(int(text)))
        if not is_complete(path):
            raise CheckpointError(f"{tracker} points at {path}, which is missing or incomplete (neither "
                                  f"megatron_ppu's ppu/run.json nor a torch_dist checkpoint's metadata.json + "
                                  f"common.pt); point the tracker at a complete checkpoint, or remove it to "
                                  f"fall back to the newest complete iter_* directory.")
        return path
    names = [n for n in os.listdir(load_dir) if n.startswith("iter_")]
    complete = sorted(n for n in names if is_complete(os.path.join(load_dir, n)))
    if names and not complete:
        raise CheckpointError(f"{load_dir} has {len(names)} iter_* folder(s) ({sorted(names)[-1]}, ...) but none "
                              f"is a complete checkpoint (megatron_ppu's ppu/run.json, or a torch_dist "
                              f"checkpoint's metadata.json + common.pt); point --load at a folder with a complete "
                              f"checkpoint, or remove the incomplete ones to start from scratch.")
    return os.path.join(load_dir, complete[-1]) if complete else None


def resolve_checkpoint(load_dir: str, *, save_dir: Optional[str], finetune: bool) -> Optional[str]:
    """Collective: the checkpoint every rank loads, chosen by global rank 0 in its view of
    ``load_dir`` and broadcast; None for a first launch (``--save D --load D``, nothing in D).
    Raises the same ``CheckpointError`` on every rank when there is nothing to load but the
    user asked for a checkpoint, or when the ranks' views of ``load_dir`` disagree."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local, local_err = None, None
    try:
        local = find_checkpoint(load_dir)
    except CheckpointError as e:
        local_err = str(e)
    choice = [(os.path.basename(local) if local else None, local_err) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    chosen, err0 = choice[0]
    if err0 is not None:
        raise CheckpointError(f"--load {load_dir} (as rank 0 sees it): {err0}")
    if chosen is not None:
        return os.path.join(load_dir, chosen)
    # Rank 0 sees nothing: every rank must agree, or some node has a checkpoint rank 0 lacks.
    views = [None] * world
    dist.all_gather_object(views, (os.path.basename(local) if local else None, local_err, socket.gethostname()))
    others = [(r, c, e, h) for r, (c, e, h) in enumerate(views) if c is not None or e is not None]
    if others:
        lines = "\n  ".join(f"rank {r} ({h}) sees " + (c if c else e) for r, c, e, h in others)
        raise CheckpointError(f"--load {load_dir}: rank 0 sees no checkpoint there, but\n  {lines}\n"
                              f"Ranks disagree about the folder's contents. {SHARED_FS_FIX}")
    where = "does not exist" if not os.path.isdir(load_dir) else "holds no checkpoint"
    if finetune:
        raise CheckpointError(f"--finetune --load {load_dir}: the folder {where}; --finetune needs a checkpoint "
                              f"to take the weights from (a folder with {TRACKER}, or a complete iter_* checkpoint "
                              f"of megatron_ppu or Megatron-LM).")
    if save_dir is None or os.path.abspath(save_dir) != os.path.abspath(load_dir):
        raise CheckpointError(f"--load {load_dir}: the folder {where}. To start a new run, drop --load; to resume "
                              f"automatically whenever a checkpoint exists, give the same folder to --save and "
                              f"--load (--save {load_dir} --load {load_dir}).")
    return None


def read_run_info(path: str) -> dict:
    """``ppu/run.json`` of the checkpoint at ``path``."""
    f = os.path.join(path, "ppu", "run.json")
    if not os.path.isfile(f):
        raise CheckpointError(f"{f} is missing on this rank's view of the checkpoint.")
    with open(f, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f} is corrupt ({e}).") from e


def check_compatible(saved: dict, current: dict) -> None:
    """Raise ``CheckpointError`` if a checkpoint written with ``saved`` run info cannot resume ``current``."""
    if saved.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {saved.get('format_version')} is not {FORMAT_VERSION} "
                              f"(written by another version of megatron_ppu); --finetune still loads its weights.")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
             for k in ("world_size", "layout", "plan", "model", "diloco_fragments")
             if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            "the checkpoint was written by a run with another layout or plan, so its optimizer, "
            "DiLoCo and per-rank state do not apply here:\n  " + "\n  ".join(diffs) +
            "\nResume with the same flags and world size, or pass --finetune to load only the model "
            "weights (Megatron's full layout, valid for any TP/PP/--ppu-slices/--diloco-replicas) "
            "and start a new run from them."
        )


def check_model_part(path: str) -> None:
    """Raise ``CheckpointError`` unless this rank sees every file of the checkpoint's model
    part (``dist_checkpointing``'s metadata, ``common.pt`` (none with megatron-core 0.19) and every
    ``*.distcp`` it names); a checkpoint the installed megatron-core cannot read is refused with
    the reason (:func:`megatron_ppu.patches.compat.checkpoint_unreadable_reason`)."""
    reason = compat.checkpoint_unreadable_reason(path)  # a megatron-core 0.19 checkpoint given to 0.16.1
    if reason:
        raise CheckpointError(reason)
    missing = [n for n in ("metadata.json", ".metadata") if not os.path.isfile(os.path.join(path, n))]
    if not missing and compat.common_state_format(path) is None:
        missing = ["common.pt"]  # megatron-core 0.19 keeps it in the .distcp files instead
    if not missing:
        try:
            md = FileSystemReader(path).read_metadata()
        except Exception as e:
            raise CheckpointError(f"{path}/.metadata is corrupt ({type(e).__name__}: {e}).") from e
        files = sorted({getattr(v, "relative_path", None) for v in (md.storage_data or {}).values()} - {None})
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointError(
            f"{path}: the model part (Megatron's full layout, read by --finetune) is incomplete in this rank's "
            f"view: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} missing. The model part is "
            f"written by ranks on several nodes; copy every node's {os.path.basename(path)} into one folder that "
            f"every rank sees (no file name occurs twice), or save to a file system shared by all nodes.")


def load_rank_state(path: str) -> Dict:
    """This rank's ``ppu/rank_*.pt`` of the checkpoint at ``path`` (raises ``CheckpointError``
    when it is missing or unreadable)."""
    f = os.path.join(path, "ppu", f"rank_{dist.get_rank():05d}.pt")
    if not os.path.isfile(f):
        raise CheckpointError(f"{f} is missing (this rank's view of {path}"
                              + ("" if os.path.isdir(path) else " does not have the folder at all") + ").")
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{f} is corrupt or truncated ({type(e).__name__}: {e}).") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{f} is not a megatron_ppu rank state of format {FORMAT_VERSION}.")
    return state


def checkpoint_kind(path: str) -> str:
    """Collective: ``"ours"`` or ``"megatron-lm"`` for the checkpoint at ``path``, as global rank 0
    sees it (every rank then takes the same path)."""
    kind = ["ours" if is_ours(path) else "megatron-lm"] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(kind, src=0)
    return kind[0]


# -- the args entry of common.pt (Megatron-LM's form) -----------------------------------------------
def _megatron_default(dest: str, value):
    """Megatron-LM's parser default, with the two enum defaults the flag table stores as strings."""
    if dest == "attention_backend":
        from megatron.core.transformer.enums import AttnBackend

        return AttnBackend.auto
    if dest == "exit_signal":
        import signal

        return signal.SIGTERM
    return value


def megatron_lm_args(train_args, *, world_size: int, data_parallel_size: int, padded_vocab_size: int,
                     ffn_hidden_size: int, iteration: int, consumed_train_samples: int, global_batch_size: int,
                     train_iters: int, tokenizer_type: Optional[str] = None, tokenizer_model: Optional[str] = None,
                     saves_optimizer: bool = False, saves_rng: bool = False) -> argparse.Namespace:
    """The ``args`` of a checkpoint, as Megatron-LM stores them in ``common.pt``: an
    ``argparse.Namespace`` holding every dest of Megatron-LM's parser (core_v0.16.1) with its
    default, overridden by this run's values and by what Megatron-LM's ``validate_args`` derives
    (``ffn_hidden_size``, ``kv_channels``, ``padded_vocab_size``, ``params_dtype``, the parallel
    sizes, ``consumed_train_samples``, ...). megatron_ppu's own settings (``ppu_slices``,
    ``diloco_*``, ``subnet_*``) are kept as extra attributes.

    ``saves_optimizer``/``saves_rng`` False set Megatron-LM's markers ``no_save_optim`` /
    ``no_save_rng``: Megatron-LM's ``load_checkpoint`` then does not look for optimizer
    (sharded state) or RNG entries.
    """
    from ..megatron_lm_flags import MEGATRON_LM_FLAGS

    ns = argparse.Namespace(**{dest: _megatron_default(dest, default)
                               for dest, _, _, default in MEGATRON_LM_FLAGS.values()})
    a = train_args
    for group in (a.model, a.training, a.precision, a.parallel, a.data, a.checkpoint, a.ppu, a.diloco, a.subnet):
        for k, v in a.flag_values(group).items():
            setattr(ns, k, v)
    m = a.model
    ns.disable_bias_linear = m.disable_bias_linear
    ns.add_bias_linear = not m.disable_bias_linear
    ns.add_qkv_bias = not m.disable_bias_linear  # validate_args keeps it in sync with add_bias_linear
    ns.layernorm_epsilon = m.norm_epsilon
    del ns.norm_epsilon
    ns.ffn_hidden_size = ffn_hidden_size
    ns.kv_channels = m.kv_channels or m.hidden_size // m.num_attention_heads
    ns.max_position_embeddings = m.max_position_embeddings or m.seq_length
    ns.num_query_groups = m.num_query_groups if m.group_query_attention else m.num_attention_heads
    from megatron.core.transformer.enums import AttnBackend

    # The run's value (megatron_ppu.attention: SDPA for auto/flash/fused, DotProductAttention otherwise): Megatron-LM's
    # validate_args refuses AttnBackend.local without a local --spec, and convert.py copies these args.
    ns.attention_backend = AttnBackend[a.model.attention_backend]
    ns.padded_vocab_size = padded_vocab_size
    ns.params_dtype = torch.bfloat16 if a.precision.bf16 else torch.half if a.precision.fp16 else torch.float
    ns.world_size = world_size
    ns.data_parallel_size = data_parallel_size
    ns.global_batch_size = global_batch_size
    ns.train_iters = train_iters
    ns.iteration = iteration
    ns.consumed_train_samples = consumed_train_samples
    ns.skipped_train_samples = 0
    ns.consumed_valid_samples = 0
    ns.ckpt_format = "torch_dist"
    ns.use_dist_ckpt = True
    ns.transformer_impl = "local"
    ns.use_legacy_models = False
    ns.use_mcore_models = True
    ns.tokenizer_type = tokenizer_type or a.data.tokenizer_type
    ns.tokenizer_model = tokenizer_model or a.data.tokenizer_model
    ns.no_save_optim = True if not saves_optimizer else None
    ns.no_save_rng = True if not saves_rng else None
    return ns



def read_checkpoint_args(load_dir: str) -> Tuple[str, argparse.Namespace]:
    """(path, ``args``) of the checkpoint ``--load load_dir`` finds (this process's view; no
    process group needed, as Megatron-LM reads them before initialising). Raises
    ``CheckpointError`` when there is none or it stores no ``args``."""
    path = find_checkpoint(load_dir)
    if path is None:
        raise CheckpointError(f"--use-checkpoint-args --load {load_dir}: no checkpoint there to take the model "
                              f"flags from; pass the model flags instead, or point --load at a checkpoint.")
    f = os.path.join(path, "common.pt")
    try:
        common = compat.read_common_state(path)  # common.pt, or megatron-core 0.19's .distcp files
    except ValueError as e:
        raise CheckpointError(f"--use-checkpoint-args: {e}") from e
    except Exception as e:
        raise CheckpointError(f"--use-checkpoint-args: cannot read {f} ({type(e).__name__}: {e}).") from e
    ns = common.get("args") if isinstance(common, dict) else None
    if not isinstance(ns, argparse.Namespace):
        raise CheckpointError(f"--use-checkpoint-args: {f} stores no args (written by an older megatron_ppu?); "
                              f"pass the model flags instead.")
    return path, ns

