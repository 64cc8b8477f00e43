"""Save and load: a :class:`~.state.TrainingState` written to a checkpoint folder and read back.

This module owns what a checkpoint holds for each rank and the order in which it is written.
:func:`rank_contents` divides a rank's state in two: its *own* state (position, scheduler, plan,
RNG states, and, with ``--use-distributed-optimizer``, its shard of the optimizer) and the
*replica* state, identical on the inner-DP ranks of its replica (the synchroniser's state, the
local weights, the inner optimizer without ``--use-distributed-optimizer``), which is written
split over those ranks (:mod:`.sharding`). :func:`save_checkpoint` writes one checkpoint
atomically:

* every rank creates the temporary folder it writes into (node-local disks: see
  :mod:`.storage`); the model part goes through ``megatron.core.dist_checkpointing`` in
  Megatron's full layout, with Megatron-LM's entries (:mod:`.megatron_lm`); then each rank's
  ``ppu/rank_*.pt``; then each view's lowest rank writes ``ppu/run.json`` (the completeness
  marker, :mod:`.format`);
* the outcome is all-gathered: on any failure every rank raises the same ``CheckpointError``
  and the temporary folder is removed; otherwise each view's lowest rank renames it to
  ``iter_NNNNNNN`` and replaces the tracker atomically. A crash at any point leaves the previous
  checkpoint and the tracker intact.

Loading is the reverse on a state whose objects already exist: :func:`restore` puts a rank's
own and replica state back (optimizer: :func:`load_optimizer`; the learning-rate schedule
checked by megatron-core) and returns the position (:class:`~.state.Restored`);
:func:`load_model_weights` reads the model part alone (``--finetune``). Which checkpoint is
read, and which flags say what to restore, is :mod:`.checkpointer`'s.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import uuid
from typing import Optional

import torch
import torch.distributed as dist

from ...optimizer import InnerOptimizerView
from ...patches import compat
from .format import FORMAT_VERSION, MEGATRON_CHECKPOINT_VERSION, TRACKER, atomic_write_text, iter_dir_name
from .megatron_lm import ignore_constant_wd_length
from .sharding import shard_state
from .state import Restored, TrainingState, rng_state, set_rng_state
from .storage import StorageViews, probe_views
from .verdicts import CheckpointError

logger = logging.getLogger(__name__)


def rank_contents(state: TrainingState, *, use_distributed_optimizer: bool) -> dict:
    """What a checkpoint holds for this rank: ``{"rank": own state, "replica": state
    identical on the inner-DP ranks of this replica}`` (the latter is written split over
    them, see :func:`.sharding.shard_state`)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # "diloco": the synchroniser's state (the key keeps its name for older checkpoints)
    replica = {"diloco": state.sync.state_dict(),
               "local_model": {k: v for k, v in state.model.state_dict().items() if isinstance(v, torch.Tensor)}}
    own = {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
           "scheduler": state.scheduler.state_dict(), "plan": state.plan.to_dict(), "rng": rng_state()}
    membership = state.transport.state_dict() if state.transport is not None else {}
    if membership:  # --fault-tolerance torchft: which slots contributed to each committed sync
        own["fault_tolerance"] = membership
    if use_distributed_optimizer:
        # Megatron's distributed optimizer: each inner-DP rank holds its own shard of the fp32
        # masters and moments ("dp_reshardable" form: this rank's bucket ranges, as they are).
        own["optimizer"] = state.optimizer.state_dict()
        own["optimizer_shards"] = [o.get_parameter_state_dp_reshardable() if isinstance(o, DistributedOptimizer)
                                   else None for o in getattr(state.optimizer, "chained_optimizers",
                                                              [state.optimizer])]
    else:
        replica["optimizer"] = state.optimizer.state_dict()
    return {"rank": own, "replica": replica}


def load_optimizer(optimizer, own: dict, replica: dict) -> None:
    """Load the inner optimizer's state written by :func:`rank_contents` (the replica's copy, or
    with ``--use-distributed-optimizer`` this rank's shard) into ``optimizer``."""
    if "optimizer_shards" not in own:
        compat.load_optimizer_state_dict(optimizer, replica["optimizer"])
        return
    # compat: megatron-core 0.19 also matches param groups by max_lr/min_lr/... (see there)
    compat.load_optimizer_state_dict(optimizer, own["optimizer"])  # allocates the shards' state (dummy values)
    view = InnerOptimizerView(optimizer)
    view.untie_step_tensors()  # megatron-core's loader shares one Adam "step" tensor between parameters
    for o, shard in zip(view.parts, own["optimizer_shards"]):
        if shard is None:
            continue
        for gbuf_idx, by_dtype in shard.items():
            if isinstance(gbuf_idx, int):
                for buckets in by_dtype.values():
                    for bucket in buckets:
                        for elem in bucket:
                            elem.setdefault("padding", False)  # the key megatron-core's loader filters on
        with torch.no_grad():  # megatron-core copies into its fp32 shard masters (views of leaves)
            o.load_parameter_state_from_dp_reshardable(shard)


def restore(state: TrainingState, own: dict, replica: dict, *, path: str, load_optim: bool, load_rng: bool,
            override_scheduler: bool) -> Restored:
    """Put a rank's state read from the checkpoint at ``path`` (``own``; ``replica``, already
    unsharded) back into ``state``'s objects: the local weights always; the optimizer, the
    learning-rate schedule and the synchroniser's state when ``load_optim`` (else they start
    fresh from the weights, Megatron's ``--no-load-optim``); the RNG states when ``load_rng``.
    ``override_scheduler`` (``--override-opt_param-scheduler``) keeps this run's schedule bounds.
    Returns the position to continue from."""
    missing = state.model.load_state_dict(replica["local_model"], strict=False)
    assert not missing.unexpected_keys, missing
    # The optimizer's state dict carries each parameter group's schedule bounds (max_lr/min_lr),
    # which megatron-core's scheduler reads before its own; --override-opt_param-scheduler means
    # this run's schedule, so this run's bounds are put back after loading.
    bounds = [{k: g[k] for k in ("max_lr", "min_lr") if k in g} for g in state.optimizer.param_groups]
    if not load_optim:  # Megatron's --no-load-optim: fresh optimizer (and DiLoCo state) from the weights
        state.weights_replaced()
    else:
        load_optimizer(state.optimizer, own, replica)
    if override_scheduler:
        for g, b in zip(state.optimizer.param_groups, bounds):
            g.update(b)
    try:
        if load_optim:
            state.scheduler.load_state_dict(ignore_constant_wd_length(own["scheduler"], state.scheduler))
    except AssertionError as e:  # megatron-core's "... do not match" check of a schedule value
        raise CheckpointError(
            f"{path}: the learning-rate schedule of this run differs from the checkpoint's ({e}); resume "
            "with the same --lr/--min-lr/--lr-warmup-*/--lr-decay-*/--weight-decay flags, or pass "
            "--override-opt_param-scheduler (this run's values) or --use-checkpoint-opt_param-scheduler "
            "(the checkpoint's values), as in Megatron-LM.") from e
    if load_optim:
        state.sync.load_state_dict(replica["diloco"])
    if state.transport is not None and "fault_tolerance" in own:
        state.transport.load_state_dict(own["fault_tolerance"])
    if load_rng:
        set_rng_state(own["rng"])
    return Restored(own["iteration"], own["consumed_samples"], f"iteration {own['iteration']}")


def _rank_files_bytes(folder: str, rank: int) -> int:
    """Bytes of the model-part files this rank wrote into ``folder`` (dist_checkpointing:
    ``__<rank>_<i>.distcp``; the coordinator also writes the metadata and ``common.pt``)."""
    total = 0
    for n in os.listdir(folder):
        if n.startswith(f"__{rank}_") or (rank == 0 and n in ("common.pt", "metadata.json", ".metadata")):
            total += os.path.getsize(os.path.join(folder, n))
    return total


def save_checkpoint(save_dir: str, iteration: int, model, run_info: dict, rank_state: dict, *,
                    views: Optional[StorageViews] = None, replica_state=None, replica_group=None,
                    megatron: Optional[dict] = None) -> dict:
    """Collective: write a complete checkpoint for ``iteration`` and point the tracker at it.

    ``rank_state`` is this rank's own state; ``replica_state`` (identical on the ranks of
    ``replica_group``) is written split over them (see :func:`.sharding.shard_state`). ``views``
    (from :func:`probe_views`; probed here when None) says which ranks share a folder.
    ``megatron`` (from :func:`.megatron_lm.megatron_lm_entries`) adds Megatron-LM's own entries (``args``,
    ``rng_state``, ``optimizer``, ``opt_param_scheduler``, ...) to the model part.
    Returns ``{"path", "rank_bytes", "total_bytes"}``.
    """
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    if views is None:
        views = probe_views(save_dir, create=True)
    nonce = [uuid.uuid4().hex[:8] if rank == 0 else None]
    dist.broadcast_object_list(nonce, src=0)
    final = os.path.join(save_dir, iter_dir_name(iteration))
    tmp = os.path.join(save_dir, f".{iter_dir_name(iteration)}.tmp-{nonce[0]}")
    leader = views.is_leader(rank)
    nbytes, err = 0, None
    try:
        os.makedirs(tmp, exist_ok=True)  # every rank creates what it writes (node-local disks)
        # ppu/ only after the model part: dist_checkpointing warns about an old incomplete
        # checkpoint when the folder it is given is not empty.
        sd = {"model": model.sharded_state_dict(), "iteration": iteration,
              "checkpoint_version": MEGATRON_CHECKPOINT_VERSION}
        megatron = megatron or {}
        sd.update(megatron.get("state", {}))
        if megatron.get("optimizer") is not None:  # Megatron's sharded optimizer state, keyed by the model's
            sd["optimizer"] = megatron["optimizer"].sharded_state_dict(
                sd, is_loading=False, metadata=megatron["optimizer_metadata"])
        dist_checkpointing.save(sd, tmp, content_metadata=megatron.get("content_metadata"))
        nbytes += _rank_files_bytes(tmp, rank)
        os.makedirs(os.path.join(tmp, "ppu"), exist_ok=True)
        state = {"format_version": FORMAT_VERSION, "save_nonce": nonce[0], "rank": rank_state,
                 "replica_shard": shard_state(replica_state, replica_group) if replica_state is not None else None}
        path = os.path.join(tmp, "ppu", f"rank_{rank:05d}.pt")
        torch.save(state, path + ".part")
        os.replace(path + ".part", path)
        nbytes += os.path.getsize(path)
        if leader:
            info = dict(run_info, iteration=iteration, format_version=FORMAT_VERSION, save_nonce=nonce[0])
            text = json.dumps(info, indent=1, sort_keys=True)
            atomic_write_text(os.path.join(tmp, "ppu", "run.json"), text)
            nbytes += len(text.encode())
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        logger.exception("checkpoint save failed on rank %d", rank)
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (err, nbytes, socket.gethostname()))
    failed = [(r, e, h) for r, (e, _, h) in enumerate(verdicts) if e is not None]
    if failed:
        if leader:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        lines = "\n  ".join(f"rank {r} ({h}): {e}" for r, e, h in failed)
        raise CheckpointError(f"saving checkpoint {final} failed; the previous checkpoint is intact:\n  {lines}")
    if leader:  # one rank per view finalises that view
        # (A folder that looked node-local but is shared, the probe having seen a stale listing:
        # another view's leader may have finalised this very save already.)
        if _save_nonce(final) != nonce[0]:
            try:
                if os.path.exists(final):  # re-save of the same iteration: swap, then drop the old one
                    old = f"{tmp}.old"
                    os.rename(final, old)
                    os.rename(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, final)
            except FileNotFoundError:
                if _save_nonce(final) != nonce[0]:
                    raise
        atomic_write_text(os.path.join(save_dir, TRACKER), f"{iteration}\n")
        for name in os.listdir(save_dir):  # leftovers of crashed saves
            if name.startswith(".iter_") and ".tmp-" in name:
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    dist.barrier()
    return {"path": final, "rank_bytes": nbytes, "total_bytes": sum(b for _, b, _ in verdicts)}


def _save_nonce(path: str) -> Optional[str]:
    try:
        with open(os.path.join(path, "ppu", "run.json"), encoding="utf-8") as f:
            return json.load(f).get("save_nonce")
    except (OSError, ValueError):
        return None


def load_model_weights(path: str, model) -> None:
    """Collective: load the model part of a checkpoint (Megatron full layout) into ``model``."""
    from megatron.core import dist_checkpointing

    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    except Exception as e:
        raise CheckpointError(f"could not load the model weights from {path}: {type(e).__name__}: {e}. "
                              f"Is it a checkpoint of the same model architecture?") from e
    model.load_state_dict(loaded["model"])

