"""The resume policy: the :class:`Checkpointer` a trainer holds.

A run's checkpoint flags (``--save``, ``--load``, ``--finetune``, ``--no-load-optim``,
``--no-load-rng``, ``--override-opt_param-scheduler``) are interpreted here and nowhere else.
The :class:`Checkpointer` probes the ``--save`` / ``--load`` folders once at start-up
(:mod:`.storage`: node-local disks are found then, not at the first save), writes a
:class:`~.state.TrainingState` when the trainer asks (:mod:`.save_load`, with Megatron-LM's
entries from :mod:`.megatron_lm`), and on ``--load`` decides what is read:

* nothing, for a first launch (``--save D --load D``, nothing in D): the run starts from scratch;
* a Megatron-LM checkpoint (no ``ppu/`` part): Megatron-LM's rules (:func:`.megatron_lm.load_megatron_lm_checkpoint`);
* ``--finetune``: the model part alone, into any layout, and a fresh optimizer from it;
* otherwise an exact resume: ``ppu/run.json`` must match this run (:func:`.format.check_compatible`),
  every rank reads its own file, the verdicts are collective (:mod:`.verdicts`), the replica
  state is all-gathered inside the replica (:mod:`.sharding`) and restored.

Loading is decided collectively, so ranks never disagree: global rank 0 picks the checkpoint
(tracker or newest complete ``iter_*`` in its view) and broadcasts it; every rank then reads
what it needs, and the verdicts (found / missing / corrupt / incompatible) are all-gathered, so
a file missing on one node is the same ``CheckpointError`` on every rank within seconds, never
a hang in a collective. :meth:`Checkpointer.load` fills the state's objects in place and returns
the position to continue from (:class:`~.state.Restored`); the trainer, which owns the
position, applies it.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Optional

from .format import (check_compatible, check_model_part, checkpoint_kind, load_rank_state, read_run_info,
                     resolve_checkpoint)
from .megatron_lm import load_megatron_lm_checkpoint, megatron_lm_entries
from .save_load import load_model_weights, rank_contents, restore, save_checkpoint
from .sharding import unshard_state
from .state import Restored, RunShape, TrainingState
from .storage import StorageViews, probe_views
from .verdicts import SHARED_FS_FIX, CheckpointError, agreed, same_everywhere

logger = logging.getLogger(__name__)


class Checkpointer:
    """A run's checkpoints: the storage probe, :meth:`save` and :meth:`load` (resume,
    ``--finetune``, Megatron-LM checkpoints), by the run's flags.

    Args:
        run: the run's fixed facts (flags, derived sizes, what a resume must match).
        layout: the replica layout (:class:`~megatron_ppu.parallel.ReplicaLayout`): replica state is
            written split over ``layout.inner_dp_group``.
        log: where the start-up, save and load lines go (the trainer's logging rank).

    Attributes:
        storage_views: ``{"--save": ..., "--load": ...}`` of the probed folders (None before the probe).
        last_save: what the last :meth:`save` wrote (``{"path", "rank_bytes", "total_bytes"}``).

    Collective: constructing it probes ``--save`` / ``--load`` when either is given.
    """

    def __init__(self, run: RunShape, layout, log: Callable[[str], None] = logger.info):
        self.run, self.layout, self.log = run, layout, log
        self.storage_views: Optional[Dict[str, StorageViews]] = None
        self.last_save: Optional[dict] = None
        c = run.args.checkpoint
        if c.save or c.load:
            self.probe_storage()  # node-local --save/--load folders: found now, not at the first save

    def probe_storage(self) -> None:
        """Collective: which ranks see the same --save / --load folder (node-local disks);
        --save is created on every rank."""
        c = self.run.args.checkpoint
        self.storage_views = {}
        if c.save:
            v = probe_views(c.save, create=True)
            if v.unwritable:
                raise CheckpointError(f"--save {c.save}: " + "; ".join(
                    f"rank {r}: {e}" for r, e in sorted(v.unwritable.items())) + ". Give --save a folder every "
                    "rank can create and write (a shared file system, or a node-local path present on every node).")
            self.storage_views["--save"] = v
        if c.load and (not c.save or os.path.abspath(c.load) != os.path.abspath(c.save)):
            self.storage_views["--load"] = probe_views(c.load, create=False)
        elif c.load:
            self.storage_views["--load"] = self.storage_views["--save"]
        for flag, v in self.storage_views.items():
            self.log(v.describe(flag) + ("" if v.shared else " (each view keeps its own ranks' checkpoint files)"))

    def save(self, state: TrainingState) -> str:
        """Collective: write a checkpoint of ``state`` into ``--save`` at ``state.iteration``;
        returns its path (the bytes written are in :attr:`last_save`)."""
        state.sync.before_save()  # forward-masked SDP: bring non-held parts up to date
        if "--save" not in (self.storage_views or {}):
            self.probe_storage()
        a = self.run.args
        st = rank_contents(state, use_distributed_optimizer=a.parallel.use_distributed_optimizer)
        self.last_save = save_checkpoint(
            a.checkpoint.save, state.iteration, state.model,
            dict(self.run.run_info, consumed_samples=state.consumed_samples), st["rank"],
            views=self.storage_views["--save"], replica_state=st["replica"], replica_group=self.layout.inner_dp_group,
            megatron=megatron_lm_entries(state, self.run))
        s = self.last_save
        self.log(f"saved checkpoint {s['path']} | bytes written: this rank {s['rank_bytes']}, all ranks "
                 f"{s['total_bytes']} (replica state split over {self.layout.inner_dp} inner-DP rank(s))")
        return s["path"]

    def load(self, state: TrainingState) -> Optional[Restored]:
        """Collective: load what ``--load`` holds into ``state``'s objects by the run's flags; returns
        the position to continue from (its ``None`` fields: unchanged), or None for a first launch."""
        c = self.run.args.checkpoint
        if self.storage_views is None:
            self.probe_storage()
        path = resolve_checkpoint(c.load, save_dir=c.save, finetune=c.finetune)
        if path is None:
            self.log(f"--save {c.save} --load {c.load}: no checkpoint there yet (first launch), starting from scratch")
            return None
        if checkpoint_kind(path) == "megatron-lm":  # no ppu/ part: Megatron-LM's rules
            restored = load_megatron_lm_checkpoint(state, self.run, path, finetune=c.finetune,
                                                   no_load_optim=c.no_load_optim, no_load_rng=c.no_load_rng)
            self.log(f"loaded the Megatron-LM checkpoint {path}: {restored.description}")
            return restored
        if c.finetune:
            agreed(lambda: check_model_part(path), f"--finetune from {path}", SHARED_FS_FIX)
            load_model_weights(path, state.model)
            state.weights_replaced()
            self.log(f"loaded model weights from {path} (--finetune: new run from them)")
            return Restored(None, None, "model weights (--finetune)")

        def read():
            info = read_run_info(path)
            check_compatible(info, self.run.run_info)
            st = load_rank_state(path)
            if st.get("save_nonce") != info.get("save_nonce"):
                raise CheckpointError(f"{path}: this rank's file and ppu/run.json come from different saves.")
            if st["rank"]["plan"] != state.plan.to_dict():
                raise CheckpointError(f"{path}: this rank's ownership plan differs from the checkpoint's; resume "
                                      "with the same --ppu-slices/--diloco-replicas/layout or use --finetune.")
            return st

        st = agreed(read, f"resuming from {path}", SHARED_FS_FIX)
        same_everywhere(st["save_nonce"], f"{path}: the ranks' files come from different saves (node-local "
                                          f"folders of different runs?); {SHARED_FS_FIX}")
        replica = unshard_state(st["replica_shard"], self.layout.inner_dp_group)
        restored = restore(state, st["rank"], replica, path=path, load_optim=not c.no_load_optim,
                           load_rng=not c.no_load_rng,
                           override_scheduler=self.run.args.training.override_opt_param_scheduler)
        self.log(f"resumed from {path} at iteration {restored.iteration}")
        return restored
