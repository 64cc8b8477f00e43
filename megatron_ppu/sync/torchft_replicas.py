"""Replicas as independent jobs: the fault-tolerant :class:`ReplicaTransport` over torchft 0.2.0.

``--fault-tolerance torchft``: every replica is its own torchrun job (its world: TP x PP x
inner-DP) in a stable slot K (``--ft-replica-id``). Each rank has one torchft ``Manager``; local rank
0 of the replica hosts the replica's manager server (as torchft does), which joins the run's
lighthouse. The "other replicas" of a rank are the ranks with its coordinate (its rank in its
replica's world) in every live replica; they meet on a torchft-reconfigured gloo process group
(torchft recommends gloo for the fault-tolerant dimension; CUDA payloads are staged through host
memory).

One sync (the :class:`ReplicaTransport` contract):

* :meth:`begin_sync`: a quorum (``Manager.start_quorum``, synchronous). A replica behind the others
  (new, restarted, or one that discarded a sync the others committed) heals here from a live peer
  over torchft's HTTP checkpoint transport (bound to ``--ft-bind-address``): the state registered
  with :meth:`register_state` (the outer loop's θ(t), outer momentum and schedule position) is
  checked against its checksum and the run's settings before it is loaded. Then one small
  all-reduce of the membership row of every slot (present, contributing, settings digests): the live
  slots are the quorum's members that contribute (a replica that healed in this quorum contributes
  nothing to this sync). A member with different settings refuses itself with a ``ValueError``
  naming every differing setting; the others close that quorum without a commit and ask for another
  one (no further collective with it; their contributions to the sync are kept, nothing is
  discarded). The same for a slot claimed twice (refused on the newcomer once it persists) and for a
  replica that trained apart from the run. A replica behind the others heals in the middle of an
  older sync of its own (void on it), and joins the others' sync contributing nothing; they ask for
  another quorum and meet it there (:meth:`take_rejoin`, :meth:`observe_next`).
* :meth:`sum_`: the SUM over the live replicas, an all-reduce in the buffer's dtype or our own int8 /
  fp8 path (:func:`megatron_ppu.sync.compress.quantized_all_reduce_`, which works on CPU; torchft's
  own quantization needs Triton + CUDA and silently falls back to full precision without them). A
  failed collective (a member died) is reported to the Manager and aborts this rank's group (meant to
  let a live member still waiting on this one fail then rather than after ``--ft-timeout``); the
  remaining calls of the sync are no-ops, and the next quorum configures a new group.
* :meth:`agree`: the non-finite verdict of every rank of every live replica (MAX over the replica's
  own ranks, then over the cross-replica group) combined with torchft's commit vote
  (``should_commit``: False on every rank of a replica if any of its ranks saw an error). A sync in
  flight when a member dies is discarded by every survivor that saw the failure; a survivor that
  still committed it is ahead of one that did not, and the one behind heals from it at the next
  quorum (torchft's step rule), so no sync stays applied on some replicas only.

With a delayed sync (τ > 0) :meth:`begin_sync` (quorum, heal) runs on the training thread at the
launch and blocks it for the quorum's time; :meth:`sum_` and :meth:`agree` run on the background
thread (:meth:`for_background`: the same state, a clone of the replica's consensus group). A member
that dies while the reduction is in flight fails it there: every survivor that saw the failure
discards the sync when it is due (θ(t) kept for its fragment); one that committed it is ahead and
the others heal from it at the next quorum, as for τ = 0.

The membership history (the live slots of every committed sync) is part of the healed and the
checkpointed state (:meth:`state_dict`).
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..config import FaultToleranceConfig, _host_port
from . import compress
from .replicas import ReplicaTransport, clone_on_every_rank

logger = logging.getLogger(__name__)

#: torchft replica ids are ``ppu_slot_<K>``: torchft derives a member's global rank from the id's
#: trailing digits (``K x ranks per replica + rank``), which is how the slots of a quorum are known.
REPLICA_ID_PREFIX = "ppu_slot_"
_DIGEST_MASK = (1 << 62) - 1
#: the membership row: present, contributing, inner step, θ(t) digest, #settings, names digest, then one
#: digest per setting (from column _SET on)
_SET = 6
#: consecutive quorums in which a slot appears twice before the newcomer gives up (a dead predecessor
#: leaves the quorums after the lighthouse's heartbeat timeout)
_DUPLICATE_QUORUMS = 5
#: quorums :meth:`TorchFTReplicas.begin_sync` asks for in a row while a member that is not the run's is in
#: them (it refuses itself and leaves; a taken slot's newcomer after _DUPLICATE_QUORUMS) before it voids
_RETRIED_QUORUMS = 2 * _DUPLICATE_QUORUMS


def _digest(value) -> int:
    """A stable 62-bit digest of ``repr(value)`` (fits an int64 sum of K of them)."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little") & _DIGEST_MASK


def state_checksum(state) -> str:
    """sha256 over a (nested) state: tensors by dtype, shape and bytes, everything else by ``repr``."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(state)
    return h.hexdigest()


def _make_gloo_group(timeout: timedelta, bind_address: str, group_world_size: int):
    """torchft's reconfigurable gloo process group, on a gloo device for ``bind_address`` and
    remembering each quorum's slots (a subclass: torchft builds the group in ``_create_pg`` and
    hands the quorum's members to ``configure``)."""
    from torchft.process_group import ProcessGroupGloo as FTGloo

    class SlotGloo(FTGloo):
        """The cross-replica group of one rank (see :func:`_make_gloo_group`)."""

        def __init__(self):
            super().__init__(timeout=timeout)
            self.quorum_slots: Tuple[int, ...] = ()
            self.quorum_rank = 0

        def configure(self, store_addr, replica_id, rank, world_size, quorum_id=None, group_rank=None,
                      group_world_size=None, global_ranks=None):
            super().configure(store_addr, replica_id, rank, world_size, quorum_id, group_rank, group_world_size,
                              global_ranks)
            self.quorum_slots = tuple(sorted(r // group_world_size for r in (global_ranks or ())))
            self.quorum_rank = rank

        def _create_pg(self, store, rank, world_size):
            pg = dist.ProcessGroup(store, rank, world_size)
            pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_address)]
            backend = dist.ProcessGroupGloo(store, rank, world_size, opts)
            backend._set_sequence_number_for_group()
            pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
            return pg

    return SlotGloo()


class TorchFTReplicas(ReplicaTransport):
    """The cross-replica communication of one rank of a replica job, over torchft (see the module
    docstring).

    Args:
        config: the ``--ft-*`` settings (:class:`~megatron_ppu.config.FaultToleranceConfig`).
        num_slots: K (``--diloco-replicas``).
        settings: name -> value of every setting a joining replica must share with the running ones
            (model shape, slices, fragments, H, outer optimizer, payload, data, seed, version); compared
            at every quorum by digest, by value on a heal.
        replica_group: this replica's own ranks (its torchrun world; None: the default group when one
            is initialised, else a single-process replica). Local rank 0 opens the replica's store.
        consensus_group: the group the non-finite verdict is combined over inside the replica (None:
            ``replica_group``).
    """

    def __init__(self, config: FaultToleranceConfig, num_slots: int, settings: Dict[str, object], *,
                 replica_group=None, consensus_group=None):
        from torchft.manager import Manager

        from ..patches.torchft import apply_torchft_patches

        assert config.enabled and config.replica_id is not None and 0 <= config.replica_id < num_slots
        apply_torchft_patches(config.bind_address)
        self.config, self.num_slots, self.slot = config, num_slots, config.replica_id
        self.settings = {k: settings[k] for k in sorted(settings)}
        self._setting_digests = [_digest(self.settings[k]) for k in self.settings]
        self._names_digest = _digest(tuple(self.settings))
        if replica_group is None and dist.is_initialized():
            replica_group = dist.group.WORLD
        self.replica_group = replica_group
        self.consensus_group = consensus_group if consensus_group is not None else replica_group
        self.group_rank = dist.get_rank(replica_group) if replica_group is not None else 0
        self.group_world_size = dist.get_world_size(replica_group) if replica_group is not None else 1
        self._store, self._store_port = self._open_store()
        sec = lambda s: timedelta(seconds=s)  # noqa: E731
        self._pg = _make_gloo_group(sec(config.timeout), config.bind_address, self.group_world_size)
        host, port = _host_port(config.lighthouse)
        self._user: Optional[Tuple[Callable[[], dict], Callable[[dict], None]]] = None
        self._pending: Optional[dict] = None  # a healed state, loaded once the settings check passed
        self.history: List[Tuple[int, Tuple[int, ...]]] = []  # (sync number, live slots) of committed syncs
        self.heals = 0
        self.last_quorum_s = 0.0
        self._live: Tuple[int, ...] = ()
        self._void = False
        self._retry = False  # the last quorum held a member that is not the run's: ask again
        # the commit vote waits for every rank of the replica: one of them may still be in a collective that
        # fails only after --ft-timeout, so the vote waits longer than that (else it raises on the others)
        self._vote_timeout = timedelta(seconds=2 * config.timeout + 30)
        self._rejoin = False  # healed while behind: the others wait in a sync of theirs (take_rejoin)
        self._observing = False  # the next quorum: present, contributing nothing (observe_next)
        self._primed = False
        self._twice = 0  # consecutive quorums with a slot claimed twice
        self._healed_step: Optional[int] = None
        self._position: Callable[[], Tuple[int, int]] = lambda: (-1, 0)
        self._joined = False
        self.peer_step = -1  # the running members' inner step at the last quorum (-1: none running)
        self.manager = Manager(
            pg=self._pg, load_state_dict=self._load_healed, state_dict=self._heal_state, min_replica_size=config.min_replicas,
            use_async_quorum=False, timeout=sec(config.timeout), quorum_timeout=sec(config.quorum_timeout),
            connect_timeout=sec(config.connect_timeout), rank=self.group_rank, world_size=self.group_world_size,
            store_addr=config.bind_address, store_port=self._store_port, lighthouse_addr=f"http://{host}:{port}",
            replica_id=f"{REPLICA_ID_PREFIX}{self.slot}", port=0, hostname=config.bind_address,
            heartbeat_interval=sec(config.heartbeat_interval), init_sync=False)

    # ------------------------------------------------------------------ set-up
    def _open_store(self):
        """The replica's TCPStore (torchft's manager address for the replica's ranks, and the
        rendezvous of the cross-replica groups when this replica leads a quorum): opened by rank 0
        on the bind address, its port shared over the replica's group."""
        store = None
        port = [0]
        if self.group_rank == 0:
            store = dist.TCPStore(self.config.bind_address, 0, is_master=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=self.config.connect_timeout))
            port = [store.port]
        if self.group_world_size > 1:
            dist.broadcast_object_list(port, src=dist.get_global_rank(self.replica_group, 0), group=self.replica_group)
        return store, port[0]

    def register_state(self, state_dict: Callable[[], dict], load_state_dict: Callable[[dict], None],
                       position: Callable[[], Tuple[int, int]]) -> None:
        """The replica state a joiner heals from a live peer (the outer loop's θ(t), outer momentum,
        schedule position): ``state_dict()`` is called on the peer when someone needs it,
        ``load_state_dict`` on the joiner after the settings and the checksum are verified.
        ``position()``: (the outer loop's inner step, a digest of every fragment's θ(t)), the same on
        every running replica at each quorum (compared; a difference is an error); until
        :meth:`mark_joined` this replica reports (-1, 0) (joining: contributes nothing)."""
        self._user = (state_dict, load_state_dict)
        self._position = position

    def note_healed_step(self, step: int) -> None:
        """The loader of :meth:`register_state` records the inner step of the state it healed; the
        trainer takes it (:meth:`take_healed_step`) once the sync in which it healed is over."""
        self._healed_step = step

    def take_healed_step(self) -> Optional[int]:
        """The inner step of the state healed since the last call (None: no heal)."""
        step, self._healed_step = self._healed_step, None
        return step

    def take_rejoin(self) -> bool:
        """Whether this replica healed while behind since the last call: the others then wait for it in
        the sync due at the healed inner step (they asked for another quorum), which it joins with
        :meth:`observe_next`."""
        rejoin, self._rejoin = self._rejoin, False
        return rejoin

    def observe_next(self) -> None:
        """The next quorum: take part in the sync contributing nothing (not counted in the live set)."""
        self._observing = True

    def mark_joined(self) -> None:
        """This replica is in step with the run (its join quorum is done): from now on it contributes."""
        self._joined = True

    # ------------------------------------------------------------------ healing
    def _heal_state(self) -> dict:
        user = self._user[0]() if self._user is not None else {}
        return {"settings": self.settings, "history": list(self.history), "syncs": self.syncs,
                "user": user, "checksum": state_checksum(user)}

    def _load_healed(self, state: dict) -> None:
        # Called by torchft inside the quorum: only stash it; begin_sync checks the settings with
        # every member first, then the checksum, then loads.
        self._pending = state

    def _apply_healed(self) -> None:
        state, self._pending = self._pending, None
        diff = [f"{k} (this replica: {self.settings.get(k)!r}, the running replicas: {state['settings'].get(k)!r})"
                for k in sorted(set(self.settings) | set(state["settings"]))
                if self.settings.get(k) != state["settings"].get(k)]
        if diff:
            raise ValueError("this replica's settings differ from the running replicas' in " + "; ".join(diff)
                             + ". Start it with the run's flags (only --ft-replica-id and --ft-bind-address differ "
                               "between replicas).")
        got = state_checksum(state["user"])
        if got != state["checksum"]:
            raise RuntimeError(f"the state healed from a live peer fails its checksum ({got} != {state['checksum']}); "
                               "the transfer was corrupted. Restart this replica to heal again.")
        self.history = [(int(s), tuple(live)) for s, live in state["history"]]
        if self._user is not None:
            self._user[1](state["user"])
        self.heals += 1
        logger.info("slot %d healed from a live peer at sync %d", self.slot, self.syncs)

    # ------------------------------------------------------------------ the transport
    def prime(self) -> None:
        """The next :meth:`begin_sync` continues the sync the last one started (a joiner that learnt
        at its join quorum which fragment the others are syncing takes part in that sync)."""
        self._primed = True

    def begin_sync(self) -> Sequence[int]:
        if self._primed:
            self._primed = False
            return self._live
        t0 = time.monotonic()
        for _ in range(_RETRIED_QUORUMS):
            live = self._quorum(t0)
            if not self._retry:
                return live
            # Only a member that is not the run's (other settings, a taken slot, trained apart) spoilt this
            # quorum, and it refuses itself. Close the quorum without a commit and ask again: the sync keeps
            # every running replica's contribution (nothing is discarded); the price is the wait until the
            # lighthouse forms a quorum without the refused member (at most its join timeout).
            self.manager.report_error(RuntimeError("quorum retried without a refused member"))
            self.manager.should_commit(timeout=self._vote_timeout)
        logger.warning("sync voided: %d quorums in a row held a refused member", _RETRIED_QUORUMS)
        self._void, self._live = True, ()
        return self._live

    def _quorum(self, t0: float) -> Sequence[int]:
        """One quorum of :meth:`begin_sync`; sets ``_retry`` when it must be asked again (see there)."""
        self._void = self._retry = False
        step, theta = self._position() if self._joined else (-1, 0)
        self.manager.start_quorum(allow_heal=True)
        self.last_quorum_s = time.monotonic() - t0
        healed = self._pending is not None
        quorum = self._pg.quorum_slots
        n_set = len(self._setting_digests)
        table = torch.zeros(self.num_slots, _SET + n_set, dtype=torch.int64)
        observing, self._observing = self._observing, False
        table[self.slot, :_SET] = torch.tensor([1, 0 if healed or step < 0 or observing else 1, step,
                                                theta & _DIGEST_MASK, n_set, self._names_digest])
        table[self.slot, _SET:] = torch.tensor(self._setting_digests, dtype=torch.int64)
        if not self._collective(lambda: self._pg.parent.allreduce([table.view(-1)], dist.ReduceOp.SUM)):
            self._live = ()
            return self._live  # errored: agree() discards it on this member
        present = [k for k in range(self.num_slots) if table[k, 0] > 0]
        assert set(present) == set(quorum), (present, quorum)
        twice = [k for k in present if table[k, 0] > 1]
        self._twice = self._twice + 1 if twice else 0
        if twice:
            # Two members in one slot: a restarted replica meeting its dead predecessor (which asked for
            # this quorum just before it died; gone after the heartbeat timeout) or a second job given a
            # taken slot. Ask again; the newcomer gives up only when it persists.
            if (healed or self.syncs == 0) and self._twice >= _DUPLICATE_QUORUMS:
                raise ValueError(f"--ft-replica-id {self.slot} is already taken by a running replica; give this "
                                 "job a free slot (0 <= K < --diloco-replicas) or stop the other one.")
            logger.warning("slot(s) %s appear twice in the quorum (a restart meeting its predecessor?): quorum "
                           "asked again", twice)
            self._retry = True
        ref = self._reference_row(table, present)
        if not self._retry and not torch.equal(table[self.slot, _SET - 2:], ref):
            mine = table[self.slot, _SET - 2:]
            if mine[0] != ref[0] or mine[1] != ref[1]:
                names = ["the set of settings (a different megatron_ppu version)"]
            else:
                names = [k for i, k in enumerate(self.settings) if mine[2 + i] != ref[2 + i]]
            raise ValueError(f"replica slot {self.slot} cannot join: its settings differ from the running replicas' "
                             f"in {', '.join(names)}. Start it with the run's flags.")
        if not self._retry and any(not torch.equal(table[k, _SET - 2:], ref) for k in present):
            logger.warning("a member of the quorum %s was refused (other settings): quorum asked again", present)
            self._retry = True  # it refuses itself; nobody sums with it
        if self._retry:
            self._live = ()
            return self._live
        running = [k for k in present if table[k, 1] > 0]
        self.peer_step = int(max(table[k, 2] for k in running)) if running else -1
        behind = [k for k in present if table[k, 1] == 0 and 0 <= table[k, 2] != self.peer_step]
        if behind and running:
            # A replica that fell behind (left out of a quorum while slow, or one that discarded a sync
            # the others committed) heals here in the middle of its own, older sync: it cannot take part
            # in this one's collectives (another fragment, other sizes). Its own sync is void; the trainer
            # moves it to the healed position (realign) and it joins the others' sync there, contributing
            # nothing (:meth:`observe_next`). The others ask for another quorum (theirs is kept, nothing
            # discarded) and meet it there.
            if self.slot in behind:
                logger.warning("slot %d healed in the middle of its own older sync (inner step %d, the others' %d): "
                               "that sync is void; it joins theirs", self.slot, step, self.peer_step)
                self._apply_healed()
                self._void, self._rejoin = True, True
            else:
                logger.warning("slots %s healed in the middle of an older sync of theirs (inner steps %s, the others' "
                               "%d): quorum asked again, they join it", behind, [int(table[k, 2]) for k in behind],
                               self.peer_step)
                self._retry = True
            self._live = ()
            return self._live
        groups: Dict[Tuple[int, int], List[int]] = {}
        for k in running:
            groups.setdefault((int(table[k, 2]), int(table[k, 3])), []).append(k)
        if len(groups) > 1:
            # Running replicas whose (inner step, θ(t)) differ trained apart (e.g. two that started at the
            # same moment each formed a quorum alone): the larger group (ties: the one with the lowest slot)
            # is the run; a replica of another group stops here (restarted, it heals from the run), the
            # others ask for another quorum.
            ref = max(groups.values(), key=lambda ks: (len(ks), -min(ks)))
            if self.slot not in ref:
                raise RuntimeError(
                    f"replica slot {self.slot} trained apart from the run (slots {ref}): (slot, inner step, θ(t) "
                    f"digest) = {[(k, int(table[k, 2]), int(table[k, 3])) for k in running]}. Restart it: it heals "
                    "from the running replicas (torchrun --max-restarts does it). Avoid it with the lighthouse's "
                    "--min_replicas above K/2.")
            logger.warning("slots %s trained apart from the run %s (they stop): quorum asked again",
                           sorted(set(running) - set(ref)), ref)
            self._retry = True
            self._live = ()
            return self._live
        if healed:
            self._apply_healed()
        self._live = tuple(running)
        # the digest is this rank's shard of θ(t) (TP / PP ranks hold different shards): name the rank
        logger.info("fault tolerance: quorum at inner step %d: live slots %s%s (quorum %.2f s), θ(t) digest %015x%s",
                    self.peer_step, list(self._live), " (this replica healed)" if healed else "",
                    self.last_quorum_s, int(table[running[0], 3]) if running else 0,
                    f" on rank {self.group_rank}" if self.group_world_size > 1 else "")
        return self._live

    def _reference_row(self, table: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        """The settings columns most members share (ties: the lowest slot's): the running replicas'."""
        rows = [table[k, _SET - 2:] for k in present]
        best = max(range(len(rows)), key=lambda i: (sum(torch.equal(rows[i], o) for o in rows), -present[i]))
        return rows[best]

    def _collective(self, launch) -> bool:
        """Run one collective over the cross-replica group; a failure (a member died) is reported to
        torchft (the sync will not commit) and makes the remaining collectives of the sync no-ops."""
        if self.manager.errored() is not None:
            return False
        try:
            launch().wait()
            return True
        except Exception as e:  # noqa: BLE001 - any failure of a peer lands here; torchft decides
            logger.warning("cross-replica collective failed (a member left?): %s", e)
            self.manager.report_error(e)
            # Close this rank's connections of the group now: a live member still waiting in the collective
            # for data from this one fails at once instead of after --ft-timeout (gloo's ring: the dead
            # member's neighbours see the failure, the others would wait for them). The next quorum
            # configures a new group.
            try:
                self._pg.abort()
            except Exception as abort_error:  # noqa: BLE001 - best effort; the next configure replaces it
                logger.debug("aborting the cross-replica group failed: %s", abort_error)
            return False

    def sum_(self, buf: torch.Tensor, *, kind: str = "fp32", block: int = compress.DEFAULT_BLOCK,
             residual: Optional[torch.Tensor] = None) -> int:
        if not self._live or self.manager.errored() is not None:
            return 0
        if self.slot not in self._live:  # a member that does not contribute (healed now) adds nothing
            buf.zero_()
            residual = None
        host = buf if buf.device.type == "cpu" else buf.to("cpu")
        res = residual if residual is None or residual.device.type == "cpu" else residual.to("cpu")
        handed = [0]

        if kind in compress.QUANTIZED_KINDS:
            def run():
                handed[0] = compress.quantized_all_reduce_(host, self._pg.parent, kind, block, res)
                return _Done()
        else:
            def run():
                handed[0] = host.numel() * host.element_size()
                return self._pg.parent.allreduce([host], dist.ReduceOp.SUM)
        if self._collective(run):
            if host is not buf:
                buf.copy_(host)
            if res is not residual:
                residual.copy_(res)
        return handed[0]

    def agree(self, ok: bool) -> bool:
        return self._agree(ok, self.consensus_group)

    def _agree(self, ok: bool, consensus_group) -> bool:
        """:meth:`agree` with the replica's own ranks combined over ``consensus_group`` (the training
        thread's, or the background instance's clone)."""
        bad = torch.tensor([0.0 if ok else 1.0])
        if consensus_group is not None and self.group_world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=consensus_group)
        if self._live:
            self._collective(lambda: self._pg.parent.allreduce([bad], dist.ReduceOp.MAX))
        if self._void:
            self.manager.report_error(RuntimeError("sync voided (a replica behind the others, or refused members "
                                                   "in every retried quorum)"))
        committed = self.manager.should_commit(timeout=self._vote_timeout)
        result = committed and bad.item() == 0.0 and bool(self._live)
        if result:
            self.history.append((self.syncs, self._live))
        elif not committed:
            logger.warning("fault tolerance: slot %d discards the sync of live slots %s (not committed: %s)", self.slot,
                           list(self._live), "voided" if self._void else f"a member failed ({self.manager.errored()})")
        return result

    def mean(self, value: float) -> float:
        t = torch.tensor([value if self.slot in self._live else 0.0, 1.0 if self.slot in self._live else 0.0],
                         dtype=torch.float64)
        if self._live:
            self._collective(lambda: self._pg.parent.allreduce([t], dist.ReduceOp.SUM))
        return float(t[0] / t[1]) if t[1] > 0 else value

    def for_background(self) -> ReplicaTransport:
        """The delayed sync's background instance (τ > 0): the same manager, cross-replica group and
        sync state (the cross-replica group carries only the outer sync's collectives and one sync is
        in flight at a time: ``begin_sync`` runs on the training thread at the launch, then only this
        instance's ``sum_`` and ``agree`` on the background thread), with a clone of the replica's own
        consensus group for :meth:`agree` (collective over the replica's world when it has several
        ranks), so that it never shares a group with the training thread's collectives."""
        clone = clone_on_every_rank(self.consensus_group) if self.group_world_size > 1 else None
        return _Background(self, clone)

    @property
    def voided(self) -> bool:
        """Whether the last :meth:`begin_sync` voided its sync (a member refused, out of step, or a failed
        exchange): nothing is summed and :meth:`agree` returns False on every member."""
        return self._void or self.manager.errored() is not None

    @property
    def store_port(self) -> int:
        """Port of the replica's TCPStore (torch's; it listens on every interface, see patches/torchft.py)."""
        return self._store_port

    @property
    def syncs(self) -> int:
        """Syncs committed by this replica (torchft's step; a healed replica takes its peer's)."""
        return self.manager.current_step()

    @property
    def live(self) -> Tuple[int, ...]:
        """The live (contributing) slots of the current / last sync."""
        return self._live

    def state_dict(self) -> dict:
        """For the replica's own checkpoint: committed syncs and the membership history."""
        return {"syncs": self.syncs, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` from the replica's own checkpoint: the membership history and
        torchft's step, so that replicas restarted together from the same sync resume without a heal
        (one restarted from an older checkpoint is behind and heals to the current θ(t))."""
        self.history = [(int(s), tuple(live)) for s, live in state.get("history", [])]
        self.manager.load_state_dict({"step": int(state.get("syncs", 0)), "batches_committed": 0})

    def close(self) -> None:
        """Stop the manager (heartbeats, servers) and drop the group and the store."""
        self.manager.shutdown(wait=False)
        self._pg.shutdown()
        self._store = None


class _Background(ReplicaTransport):
    """:meth:`TorchFTReplicas.for_background`: ``sum_`` / ``mean`` of the transport, ``agree`` over a
    clone of the consensus group; ``begin_sync`` belongs to the training thread."""

    def __init__(self, parent: TorchFTReplicas, consensus_group):
        self.parent, self.consensus_group = parent, consensus_group
        self.num_slots, self.slot = parent.num_slots, parent.slot

    def begin_sync(self) -> Sequence[int]:
        raise AssertionError("begin_sync runs on the training thread (DiLoCoSync._launch), not the background one")

    def sum_(self, buf: torch.Tensor, **kw) -> int:
        return self.parent.sum_(buf, **kw)

    def agree(self, ok: bool) -> bool:
        return self.parent._agree(ok, self.consensus_group)

    def mean(self, value: float) -> float:
        return self.parent.mean(value)

    def for_background(self) -> ReplicaTransport:
        return self


class _Done:
    """A finished work (the quantized path waits on its own collectives)."""

    def wait(self):
        return True
