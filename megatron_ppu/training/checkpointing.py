"""Atomic, exact checkpoints in Megatron's directory layout.

::

    SAVE/
      latest_checkpointed_iteration.txt   Megatron-LM's tracker file (the iteration)
      iter_0000100/                       a complete checkpoint (appears by rename only)
        metadata.json, common.pt, *.distcp  the model, via megatron.core.dist_checkpointing,
                                            in Megatron's full layout under key "model"
        ppu/run.json                        iteration, data position, layout, plan summary
        ppu/rank_00003.pt                   per rank: inner optimizer, LR scheduler,
                                            DiLoCo snapshot + outer momentum + schedule,
                                            ownership plan, RNG states
      .iter_0000200.tmp-<nonce>/          a save in progress: never read, removed later

A crash at any point leaves the previous checkpoint and the tracker file intact:
the new directory only gets its final name after every rank has finished writing,
and the tracker is replaced atomically after that. ``--load`` reads the tracker (or,
without one, the newest complete ``iter_*``), never a ``.tmp`` directory.

Resuming requires the same parallel layout, model and PPU/DiLoCo plan; anything
else is a ``CheckpointError`` naming the difference. ``--finetune`` loads the model
weights only (any TP/PP/N/replica layout: the weights are in Megatron's full
layout) and starts a fresh run from them.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(save_dir: str, iteration: int, model, run_info: dict, rank_state: dict) -> str:
    """Collective: write a complete checkpoint for ``iteration`` and point the tracker at it."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    nonce = [uuid.uuid4().hex[:8] if rank == 0 else None]
    dist.broadcast_object_list(nonce, src=0)
    final = os.path.join(save_dir, iter_dir_name(iteration))
    tmp = os.path.join(save_dir, f".{iter_dir_name(iteration)}.tmp-{nonce[0]}")
    if rank == 0:
        os.makedirs(os.path.join(tmp, "ppu"))
    dist.barrier()
    try:
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": iteration,
                                 "checkpoint_version": 3.0}, tmp)
        path = os.path.join(tmp, "ppu", f"rank_{rank:05d}.pt")
        torch.save(rank_state, path + ".part")
        os.replace(path + ".part", path)
        ok = torch.tensor([1])
    except Exception:
        ok = torch.tensor([0])
        logger.exception("checkpoint save failed on rank %d", rank)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() != 1:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"saving checkpoint {final} failed on some rank; the previous checkpoint is intact.")
    if rank == 0:
        info = dict(run_info, iteration=iteration, format_version=FORMAT_VERSION)
        _atomic_write_text(os.path.join(tmp, "ppu", "run.json"), json.dumps(info, indent=1, sort_keys=True))
        if os.path.exists(final):  # re-save of the same iteration: swap, then drop the old one
            old = f"{tmp}.old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _atomic_write_text(os.path.join(save_dir, TRACKER), f"{iteration}\n")
        for name in os.listdir(save_dir):  # leftovers of crashed saves
            if name.startswith(".iter_") and ".tmp-" in name:
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    dist.barrier()
    return final


def find_checkpoint(load_dir: str) -> Optional[str]:
    """The complete checkpoint ``--load`` should read, or None if the folder has none."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory.")
    tracker = os.path.join(load_dir, TRACKER)
    if os.path.isfile(tracker):
        text = open(tracker, encoding="utf-8").read().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker} does not contain an iteration number ({text!r}); remove it "
                                  f"to fall back to the newest complete iter_* directory.")
        path = os.path.join(load_dir, iter_dir_name(int(text)))
        if not os.path.isfile(os.path.join(path, "ppu", "run.json")):
            raise CheckpointError(f"{tracker} points at {path}, which is missing or incomplete.")
        return path
    complete = sorted(n for n in os.listdir(load_dir)
                      if n.startswith("iter_") and os.path.isfile(os.path.join(load_dir, n, "ppu", "run.json")))
    return os.path.join(load_dir, complete[-1]) if complete else None


def read_run_info(path: str) -> dict:
    with open(os.path.join(path, "ppu", "run.json"), encoding="utf-8") as f:
        return json.load(f)


def check_compatible(saved: dict, current: dict) -> None:
    """Raise ``CheckpointError`` if a checkpoint written with ``saved`` run info cannot resume ``current``."""
    if saved.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {saved.get('format_version')} is not {FORMAT_VERSION}.")
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


def load_model_weights(path: str, model) -> None:
    """Load the model part of a checkpoint (Megatron full layout) into ``model``."""
    from megatron.core import dist_checkpointing

    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    except Exception as e:
        raise CheckpointError(f"could not load the model weights from {path}: {type(e).__name__}: {e}. "
                              f"Is it a checkpoint of the same model architecture?") from e
    model.load_state_dict(loaded["model"])


def load_rank_state(path: str) -> Dict:
    f = os.path.join(path, "ppu", f"rank_{dist.get_rank():05d}.pt")
    if not os.path.isfile(f):
        raise CheckpointError(f"{f} is missing: the checkpoint was written with another world size.")
    return torch.load(f, map_location="cpu", weights_only=False)
