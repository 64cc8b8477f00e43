"""Atomic, exact checkpoints in Megatron's directory layout, on shared or node-local disks.

A checkpoint is Megatron-LM's ``iter_NNNNNNN`` folder: the model in Megatron's full layout
(``megatron.core.dist_checkpointing``, readable by Megatron-LM, which can resume or fine-tune
from it) plus megatron_ppu's ``ppu/`` part (``run.json`` and one file per rank), written
atomically (a crash leaves the previous checkpoint and the tracker intact), with each replica's
state written once, split over its inner-DP ranks. Resuming requires the same parallel layout,
model and PPU/DiLoCo plan (anything else is a ``CheckpointError`` naming the difference);
``--finetune`` loads the weights into any layout; Megatron-LM's own checkpoints load with its
rules.

The parts, each the one owner of its decision:

=====================  ==============================================================================
:mod:`.verdicts`       :class:`CheckpointError`; one verdict on every rank (:func:`agreed`,
                       :func:`same_everywhere`)
:mod:`.storage`        which ranks see which folder (:func:`probe_views`, node-local disks) and
                       copying files between views (:func:`copy_to_views`, also the dataset index cache)
:mod:`.format`         the files of a checkpoint, when it is complete, which one ``--load`` finds,
                       what a resume must match, the ``args`` entry in Megatron-LM's form
:mod:`.sharding`       replica state split over the inner-DP ranks (:func:`shard_state`,
                       :func:`unshard_state`)
:mod:`.megatron_lm`    Megatron-LM interop: its entries in our checkpoints, loading its checkpoints,
                       ``--use-checkpoint-args``
:mod:`.state`          the :class:`TrainingState` saved and loaded, the :class:`RunShape` it is recorded
                       with, the :class:`Restored` position a load returns, the RNG states
:mod:`.save_load`      writing a state (atomically) and reading it back
:mod:`.checkpointer`   the resume policy: the :class:`Checkpointer` the trainer holds
=====================  ==============================================================================

**File systems that are not shared.** At start-up every rank writes a nonce file into
``--save`` (and ``--load``, when it exists), and after a barrier lists which ranks' files it
sees: ranks that see each other's files share a *view* (typically a node with a local disk).
Saving: every rank creates the temp folder it writes into; each view's lowest rank writes
``ppu/run.json`` in its view, renames the temp folder and updates the tracker there, so every
view holds a complete checkpoint marker and the files of its own ranks (copying the views'
``SAVE/`` folders into one gives an ordinary, complete checkpoint). Resuming reads only
``ppu/run.json`` and the rank's own ``ppu/rank_*.pt``, so node-local folders resume as long as
every rank runs on a node that holds its files. The model part is complete only where all views
are gathered: ``--finetune`` (which reads only it) checks that every rank sees all of its files
and otherwise names the missing files and the fix. The dataset index cache
(``--data-cache-path``) is probed the same way by ``training/data.py``: megatron-core builds
index caches on global rank 0 only, so where the folder is not shared, :func:`copy_to_views`
sends every file another view lacks to that view's lowest rank.
"""
from .checkpointer import Checkpointer
from .format import (FORMAT_VERSION, MEGATRON_CHECKPOINT_VERSION, RELEASE, TRACKER, check_compatible,
                     check_model_part, checkpoint_kind, find_checkpoint, is_complete, is_ours, iter_dir_name,
                     load_rank_state, megatron_lm_args, read_checkpoint_args, read_run_info, resolve_checkpoint)
from .megatron_lm import (CHECKPOINT_ARGS, apply_checkpoint_args, ignore_constant_wd_length,
                          load_megatron_lm_checkpoint, megatron_lm_entries, megatron_rng_state,
                          scheduler_to_iterations, scheduler_to_samples)
from .save_load import load_model_weights, load_optimizer, rank_contents, restore, save_checkpoint
from .sharding import _TensorRef, shard_state, unshard_state  # noqa: F401 (_TensorRef: pickled by this name)
from .state import Restored, RunShape, TrainingState, rng_state, set_rng_state
from .storage import PROBE_PREFIX, StorageViews, copy_to_views, probe_views
from .verdicts import SHARED_FS_FIX, CheckpointError, agreed, same_everywhere

__all__ = [
    "CHECKPOINT_ARGS", "FORMAT_VERSION", "MEGATRON_CHECKPOINT_VERSION", "PROBE_PREFIX", "RELEASE", "SHARED_FS_FIX",
    "TRACKER", "CheckpointError", "Checkpointer", "Restored", "RunShape", "StorageViews", "TrainingState", "agreed",
    "apply_checkpoint_args", "check_compatible", "check_model_part", "checkpoint_kind", "copy_to_views",
    "find_checkpoint", "ignore_constant_wd_length", "is_complete", "is_ours", "iter_dir_name",
    "load_megatron_lm_checkpoint", "load_model_weights", "load_optimizer", "load_rank_state", "megatron_lm_args",
    "megatron_lm_entries", "megatron_rng_state", "probe_views", "rank_contents", "read_checkpoint_args",
    "read_run_info", "resolve_checkpoint", "restore", "rng_state", "same_everywhere", "save_checkpoint",
    "scheduler_to_iterations", "scheduler_to_samples", "set_rng_state", "shard_state", "unshard_state",
]
