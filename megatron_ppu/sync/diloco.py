"""The outer loop of Algorithm 1: DiLoCo / Streaming DiLoCo with count-normalised
partial synchronisation, as a :class:`~megatron_ppu.sync.base.Synchroniser`: the
orchestrator :class:`DiLoCoSync` (this module) decides when, agrees on skips and keeps the
counters; each :class:`~megatron_ppu.sync.fragment.Fragment` owns its parameter handles
(:mod:`~megatron_ppu.sync.handles`), snapshot θ(t), outer optimizer, schedule offset and state,
and does its sync (torchft's ``DiLoCo`` / ``_StreamingDiLoCoFragment`` shape). Every
collective across replicas goes through one :class:`~megatron_ppu.sync.replicas.ReplicaTransport`
(static sub-groups: :class:`~megatron_ppu.sync.replicas.StaticReplicas`); the delayed sync's
thread is :mod:`~megatron_ppu.sync.delayed`, the merge diagnostic :mod:`~megatron_ppu.sync.diagnostic`,
the reports :mod:`~megatron_ppu.sync.reports`, the live counts m :mod:`~megatron_ppu.sync.counts`.

Per fragment f (all parameters when F = 1), on every rank:

* ``prepare``: Δ_k = θ_k − θ(t) over the fragment, in Megatron's full layout, **on the
  owned set of replica k only** (its slice of every sliced weight, every unsliced
  parameter it trains; see :class:`megatron_ppu.ownership.OwnershipPlan`), read from
  the inner optimizer's fp32 values (its master weights under bf16/fp16); exactly 0
  everywhere else. One rule for every plan: the frozen part of a sliced weight and a
  block the replica does not hold (SDP blocks plan) contribute 0, not the rounding
  error of their bf16/fp16 storage (they have no fp32 master: the model stores θ(t)
  rounded to its dtype, while the snapshot keeps θ(t) in fp32).
  With Megatron's distributed optimizer each inner-DP rank holds the fp32 master of
  only its shard; it fills Δ_k on that shard, and the inner-DP ranks' contributions
  (disjoint) are summed inside the replica (fast links) before the outer all-reduce.
* ``reduce``: one sum of the flattened Δ_k over the live replicas through the transport
  (static: an all-reduce over the *replica group*, the ranks holding the same TP/PP shard
  in every replica; never across TP or PP), then elementwise division by the count vector
  m: the live replicas owning the element (all K live: K/N for a sliced parameter, K
  otherwise; see :mod:`megatron_ppu.sync.counts`). An element no live replica owns gets no
  outer step and keeps its momentum.
* ``apply``: the pseudo-gradient g = θ(t) − (θ(t) + Δ) = −Δ feeds
  ``torch.optim.SGD(lr, momentum, nesterov)`` whose parameters *are* the host
  snapshot θ(t); after its step the snapshot holds θ(t+1), which is written back
  into the model (frozen slices included) and into the inner optimizer's fp32
  master weights (the distributed optimizer's shard masters: each rank writes its
  shard, so no master is ever rebuilt from the rounded model weights). Every replica
  then holds the same θ(t+1).

If the reduced Δ is not finite on any rank, every rank skips the outer step for
that fragment, restores θ(t), and logs it (the decision is the transport's ``agree``,
so all replicas and all TP/PP shards agree). The inner optimizer's moments on the replica
that produced the non-finite values are non-finite too (bf16 has no overflow check),
so restoring the parameters alone would make every later round non-finite again.
Therefore, at a skip, every rank also (1) returns every *other* fragment whose local
values are non-finite to its last synchronised θ (only on that rank: healthy ranks
keep their progress) and (2) resets every inner-optimizer state entry that holds a
non-finite value (Adam's moments and step count) to that of a fresh optimizer; state
entries that are finite are kept. Keeping a copy of the state at θ(t) to restore
instead would double the optimizer memory; a fresh Adam state costs nothing and only
the poisoned parameters restart their moments.

Payload (``--diloco-allreduce-dtype``): fp32 or bf16, a plain all-reduce in that dtype; int8 or
fp8, :func:`megatron_ppu.sync.compress.quantized_all_reduce_` (per-block scales; the transport's
``sum_``) on the same share, optionally with error feedback (one residual per fragment per rank, in
:meth:`DiLoCoSync.state_dict`). ``SyncReport.bytes_handed`` counts what this rank handed to the
cross-replica collectives. Delayed syncs (``--diloco-sync-delay`` τ > 0, ``--diloco-merge-alpha``
α): the reduction overlaps the next τ inner steps on a background thread over dedicated channels,
then the outer step is applied and merged into the local parameters; exact semantics in
``docs/overlap.md``. τ = 0 is the synchronous sync described here.

Schedule: fragment f syncs after inner step s (s = 1, 2, ...) when
``s mod H == offset_f`` with ``offset_f = ((f + 1) * H // F) mod H``; so with F = 1
everything syncs at s = H, 2H, ...; with F > 1 the F syncs of a round are spread
evenly over its H steps and each fragment's round is H steps long (its first
one may be shorter).

End of training (:meth:`DiLoCoSync.finish`): every fragment with inner steps since its
last sync (a partial round: ``--train-iters`` not a multiple of H, or with F > 1
the fragments that are mid-round) gets one final sync, a normal sync of a shorter
round: the same count-normalised Δ and the same Nesterov outer step with the same
momentum buffer. Afterwards every replica holds the one global model, which is what
the final evaluation scores and the final checkpoint stores (Megatron-format weights
that ``--finetune`` and Megatron-LM read). The trainer calls it after the last
iteration and before an ``--exit-interval`` exit without ``--save`` (nothing can
resume that run, so it ends there). An ``--exit-interval`` exit with ``--save``, and
every mid-run checkpoint, keep the replicas' local state (mid-round progress, inner
optimizer, snapshot and momentum) so that a resumed run reproduces the uninterrupted
one exactly; a run that is stopped for good at such a checkpoint is finished by
resuming it to its ``--train-iters``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from datetime import timedelta
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional

import torch
import torch.distributed as dist

from ..config import DiLoCoConfig
from ..optimizer import InnerOptimizerView
from ..ownership import OwnershipPlan
from .base import Synchroniser
from .counts import OwnerCounts
from .delayed import DelayedReduction, InFlight
from .diagnostic import MergeProbe
from .fragment import (Channels, Fragment, FragmentPlan, OuterOptimizer, Reduction, build_fragment_plan, put_back,
                       syncs_after)
from .handles import ParamHandle
from .replicas import ReplicaTransport, StaticReplicas
from .reports import DiLoCoStats, MergeDiagnostic, SyncObservation, SyncReport

logger = logging.getLogger(__name__)

__all__ = ["DiLoCoSync", "Fragment", "FragmentPlan", "OuterOptimizer", "build_fragment_plan", "syncs_after",
           "SyncReport", "SyncObservation", "MergeDiagnostic", "DiLoCoStats", "StaticReplicas", "ReplicaTransport"]


class DiLoCoSync(Synchroniser):
    """Outer loop of Algorithm 1 for one rank: the orchestrator over the :class:`Fragment` objects;
    it decides when each fragment syncs (``after_inner_step``, :meth:`finish`), agrees on a skip
    for non-finite deltas, runs the delayed syncs (τ > 0, ``docs/overlap.md``) and keeps the counters.

    Args:
        model: the (unwrapped) model chunk this rank holds; parameters are named as
            in its ``state_dict`` (Megatron's full layout).
        plan: this rank's :class:`OwnershipPlan` (who owns what; m per parameter).
        transport: the other replicas (:class:`~megatron_ppu.sync.replicas.ReplicaTransport`;
            ``StaticReplicas(layout.replica_group, timeout=layout.timeout)`` for one torchrun world:
            its replica group is the ranks holding the same TP/PP shard, its consensus group the
            world). Every collective across replicas goes through it.
        config: outer-loop settings.
        inner_optimizer: Megatron optimizer of the inner loop, to keep its fp32 master
            weights in step with θ(t+1) (optional; read through
            :class:`~megatron_ppu.optimizer.InnerOptimizerView`).
        inner_group: the replica's inner data-parallel group, when a replica has
            several DP ranks. Their Δ are identical (they all-reduce gradients every
            step), so each reduces only its 1/inner_dp share of the payload across
            replicas (slow links) and the shares are all-gathered inside the replica
            (fast links): slow-link traffic per rank falls by the inner-DP size.
        timeout: timeout of the inner-DP group's clone created when ``config.sync_delay`` > 0
            (None: torch's default); give the run's group timeout.
        holders_fn: the SDP blocks plan's ``holders(name)`` (which slots hold an unsliced
            parameter), for the live counts; None: every slot holds every unsliced parameter.

    With ``config.sync_delay`` τ > 0 the constructor is collective over the world: the
    transport's background instance (static: clones of the replica and consensus groups) and a
    clone of the inner-DP group, in the same order on every rank; the background reduction runs
    on those only (:class:`~megatron_ppu.sync.delayed.DelayedReduction`). With τ = 0 no group is
    created.

    The settings are validated at parse time; the one schedule error that depends on the model
    (more fragments than the stage has layers) raises ``ValueError`` here.
    Call :meth:`after_inner_step` (the loop: :meth:`after_optimizer_step`) once after every
    inner optimizer step.
    """

    def __init__(self, model: torch.nn.Module, plan: OwnershipPlan, transport: ReplicaTransport, config: DiLoCoConfig,
                 inner_optimizer=None, inner_group=None, timeout: Optional[timedelta] = None,
                 holders_fn: Optional[Callable[[str], FrozenSet[int]]] = None):
        # The settings were validated once, at parse time (megatron_ppu.config.validate_diloco_config).
        assert config.enabled and config.eval_model in ("global", "local"), config
        assert isinstance(transport, ReplicaTransport), type(transport)
        self.config = config
        self.plan = plan
        self.model = model
        self.transport = transport
        self.inner_group = inner_group if inner_group is not None and dist.get_world_size(inner_group) > 1 else None
        self.optimizer_view = InnerOptimizerView(inner_optimizer)
        self.evaluated_model = config.eval_model  # what evaluation scores: "global" (every θ(t)) or "local"
        self.num_replicas = transport.num_slots
        assert self.num_replicas == plan.num_replicas, (self.num_replicas, plan.num_replicas)
        self.counts = OwnerCounts(plan, self.num_replicas, config.owner_damping, holders_fn)
        self.sharded = self.optimizer_view.is_distributed
        self.channels = Channels(transport, self.inner_group, self.sharded, config.allreduce_dtype,
                                 config.quantization_block)
        self._merge_probe: Optional[MergeProbe] = None
        self._observers: List[Callable[[SyncObservation], None]] = []
        self.delayed = DelayedReduction(self.channels, timeout) if config.sync_delay > 0 else None
        self._build_fragments()
        if self.delayed is not None and self.fragments:
            self.delayed.use_device(self.fragments[0].device)

    @property
    def _in_flight(self) -> Optional[InFlight]:
        return self.delayed.in_flight if self.delayed is not None else None

    def _build_fragments(self) -> None:
        """Handles, fragments (snapshots from the current weights, fresh outer optimizers) and
        counters; at construction and after the weights were replaced from outside."""
        assert self._in_flight is None, "the weights were replaced while an outer sync was in flight"
        view = self.optimizer_view
        masters = view.masters()
        shards = view.shards() if self.sharded else {}
        self.handles: Dict[str, ParamHandle] = {}
        for name, own in self.plan.params.items():
            if own.owners == 0:
                continue  # not trained by anyone: never changes
            h = ParamHandle(self.plan.tensors(name), own, masters, shards)
            for p, m, trained in zip(h.parts, h.masters, h.trained):
                if trained and not self.sharded and m is None and p.dtype != torch.float32:
                    raise ValueError(
                        f"DiLoCo: {name} is trained in {p.dtype} but the inner optimizer holds no fp32 master "
                        f"for it, so the outer step would round every sync; pass Megatron's optimizer "
                        f"(built with bf16/fp16=True) as inner_optimizer.")
            self.handles[name] = h
        cfg = self.config
        self.fragment_plan = build_fragment_plan(list(self.handles), cfg.streaming_fragments, cfg.local_steps)
        self.fragments = [Fragment(f, names, self.handles, self.fragment_plan.offset(f), cfg.local_steps, cfg,
                                   self.channels, self.counts)
                          for f, names in enumerate(self.fragment_plan.fragments)]
        self.step = 0
        self.totals = DiLoCoStats()

    # -- the synchroniser's hooks ---------------------------------------------------
    def after_optimizer_step(self) -> None:
        self.after_inner_step()

    def attach_merge_probe(self, probe: Callable[[], float], on_report: Callable[[SyncReport], None]) -> None:
        """The merge diagnostic: at every sync, ``probe()`` (collective inside the replica, no
        gradients) scores the model's current weights on a fixed probe batch (this replica's loss,
        the same on each of its ranks), three times (local models, plain merge, after the outer
        step; :class:`MergeDiagnostic`), each averaged over the live replicas by the transport,
        and ``on_report(report)`` receives the sync's report with them (``report.merge``)."""
        self._merge_probe = MergeProbe(probe, on_report, self.transport)

    def add_sync_observer(self, observer: Callable[[SyncObservation], None]) -> None:
        """Call ``observer(observation)`` after every outer sync of a fragment on this rank, applied,
        skipped or not committed (:class:`SyncObservation`: the report, the fragment's parameter names,
        the local values Δ_k came from, θ(t) and the outer momentum before and after; host copies).
        For checks against a reference and for tracing; without an observer nothing is copied."""
        self._observers.append(observer)

    def _observe_before(self, frag: Fragment, local: bool = True):
        if not self._observers:
            return None
        return ([h.read() for h in frag.handles] if local else None, self._outer_state(frag))

    def _outer_state(self, frag: Fragment):
        bufs = [frag.outer.sgd.state.get(p, {}).get("momentum_buffer") for p in frag.snapshot]
        return [p.data.clone() for p in frag.snapshot], [None if b is None else b.clone() for b in bufs]

    def _notify(self, frag: Fragment, report: SyncReport, before) -> SyncReport:
        if before is not None:
            (local, (theta, mom)), (theta_after, mom_after) = before, self._outer_state(frag)
            seen = SyncObservation(report, list(frag.names), local, theta, theta_after, mom, mom_after)
            for observer in self._observers:
                observer(seen)
        return report

    def evaluation_weights(self):
        return self.global_weights() if self.evaluated_model == "global" else contextlib.nullcontext()

    def weights_changed(self) -> None:
        """New weights (``--finetune``): θ(0) is read from them; the outer state starts afresh."""
        self._build_fragments()

    def close(self) -> None:
        """The delayed sync's thread and the transport's connections (torchft: its manager, servers and
        reconfigured group), before interpreter teardown."""
        if self.delayed is not None:
            self.delayed.executor.shutdown(wait=True)
        self.transport.close()

    def before_save(self) -> None:
        """A checkpoint is next: wait for the reduction in flight (its result is kept, not applied:
        :meth:`state_dict` stores it and the outer step happens at its due step, as without the save)."""
        if self.delayed is not None:
            self.delayed.wait(self.totals)

    def stats(self) -> Dict[str, float]:
        """Counters since the start of the run: ``outer_bytes_sent`` (bytes on the wire per rank,
        2 (K-1)/K x the bytes handed to the cross-replica collectives: the ring all-reduce of an
        fp32 / bf16 payload, or compress's all-to-all + all-gather of an int8 / fp8 one, counted
        from what :func:`compress.quantized_all_reduce_` returns), ``bytes_handed`` (what was handed
        to them: payload + scales) and ``payload_bytes``; ``comm_wait_s``: seconds the training
        thread waited for cross-replica reductions; ``comm_background_s`` (τ > 0): seconds the
        background reductions took on their thread (a wait remains where this exceeds τ steps)."""
        t = self.totals
        return {"syncs": t.syncs, "skipped": t.skipped, "payload_bytes": t.payload_bytes,
                "bytes_handed": t.bytes_handed, "outer_bytes_sent": t.ring_bytes_sent,
                "comm_wait_s": t.comm_wait_s, "comm_background_s": t.comm_background_s}

    def describe(self) -> str:
        c = self.config
        extra = (f", sync delay {c.sync_delay} (merge alpha {c.merge_alpha})" if c.sync_delay else "") + \
            (f", {c.allreduce_dtype} payload" if c.allreduce_dtype != "fp32" else "") + \
            (" with error feedback" if c.error_feedback else "")
        return f"DiLoCo H={c.local_steps}, F={c.streaming_fragments}" + extra

    def run_info(self) -> dict:
        return {"diloco_fragments": self.config.streaming_fragments}

    # -- schedule ---------------------------------------------------------------
    def after_inner_step(self) -> List[SyncReport]:
        """Advance the inner-step counter; apply the delayed sync in flight if it is due after this
        step; then sync (τ = 0) or launch (τ > 0) the fragments that are due. Returns the reports
        of the outer steps applied now."""
        self.step += 1
        reports = []
        if self._in_flight is not None:
            assert self._in_flight.due >= self.step, (self._in_flight.due, self.step)
            if self._in_flight.due == self.step:
                reports.append(self._complete())
        for f in self.fragments:
            if f.due(self.step):
                if self.delayed is not None:
                    self._launch(f.index)
                else:
                    reports.append(self.sync(f.index))
        return reports

    def finish(self) -> List[SyncReport]:
        """Final synchronisation at the end of training: first the delayed sync in flight, if any,
        is waited for and applied now; then one sync (a normal, synchronous outer step of a
        shorter round) of every fragment with inner steps since its last sync, so that every
        replica holds the one global model. A fragment whose in-flight sync was just applied with
        α > 0 always gets that final sync (its merged local values differ between replicas, even
        when it was launched at this very step). Collective over all ranks; returns the reports."""
        reports, merged = [], None
        if self._in_flight is not None:
            reports.append(self._complete())
            if not reports[0].skipped and self.config.merge_alpha > 0:
                merged = reports[0].fragment
        return reports + [self.sync(f.index) for f in self.fragments if f.last_sync < self.step or f.index == merged]

    # -- one fragment -------------------------------------------------------------
    def _report(self, frag: Fragment, step: int, red: Reduction) -> SyncReport:
        """The report of ``frag``'s sync whose Δ is of inner step ``step``: what this rank sent
        into the cross-replica reduction ``red``, and who took part."""
        k, handed = self.num_replicas, red.bytes_handed
        return SyncReport(step=step, fragment=frag.index, payload_bytes=red.payload_bytes, bytes_handed=handed,
                          ring_bytes_sent=int(2 * (k - 1) / k * handed) if k > 1 else 0, applied_step=self.step,
                          live=list(red.live))

    def _account(self, frag: Fragment, report: SyncReport, finite: bool) -> SyncReport:
        """Skip bookkeeping (the recovery of the module docstring) and the counters, after the outer
        step (or its skip) was applied."""
        if not finite:
            report.skipped = True
            self.totals.skipped += 1
            report.restored_fragments, report.reset_states = self._recover(frag.index)
            logger.warning("DiLoCo: outer sync of fragment %d launched after inner step %d discarded after inner step "
                           "%d (a non-finite outer delta, or not committed by the transport: a member failed during "
                           "it); outer step skipped on every replica that discarded it, parameters restored to the "
                           "last synchronised values; on this rank %d other "
                           "non-finite fragment(s) restored and %d non-finite inner optimizer state(s) reset",
                           frag.index, report.step, report.applied_step, len(report.restored_fragments),
                           report.reset_states)
        self.totals.count(report)
        return report

    def sync(self, f: int) -> SyncReport:
        """Synchronise fragment ``f`` now (prepare, reduce, agree, apply): Algorithm 1's synchronous sync."""
        assert self._in_flight is None, "a synchronous sync while a delayed one is in flight"
        frag = self.fragments[f]
        t0 = time.perf_counter()
        live = self.transport.begin_sync()  # before Δ_k: a fault-tolerant transport may heal θ(t) here
        quorum_s = time.perf_counter() - t0
        before = self._observe_before(frag)  # after a heal: the θ(t) and local values this sync uses
        deltas = frag.prepare()
        t0 = time.perf_counter()
        red = frag.reduce(deltas, self.channels, live)
        report = self._report(frag, self.step, red)
        finite = self.transport.agree(red.finite_here())
        self.totals.comm_wait_s += quorum_s + time.perf_counter() - t0
        averaged = red.averaged if finite else None
        local, plain = self._probe_before(frag, averaged)
        frag.apply(averaged, red.unowned)
        frag.last_sync = self.step
        self._probe_after(report, local, plain)
        return self._notify(frag, self._account(frag, report, finite), before)

    def _probe_before(self, frag: Fragment, averaged: Optional[List[torch.Tensor]]):
        if self._merge_probe is None:
            return None, None
        return self._merge_probe.before(frag, averaged)

    def _probe_after(self, report: SyncReport, local: Optional[float], plain: Optional[float]) -> None:
        if self._merge_probe is not None:
            self._merge_probe.after(report, local, plain)


    # -- delayed syncs (τ > 0) ------------------------------------------------------
    def _launch(self, f: int) -> None:
        """``begin_sync`` (who takes part: under torchft the quorum, and a heal that writes θ(t) into
        the model, so on this thread, which owns the model) and Δ_k now, on this thread; the reduction
        (inner-DP sum / share / all-gather, the cross-replica sum over the live slots, division by m,
        the finite agreement) on the background thread over its own channels
        (:class:`DelayedReduction`); returns once the quorum is done. Applied after inner step ``step + τ``."""
        frag = self.fragments[f]
        t0 = time.perf_counter()
        live = self.transport.begin_sync()
        self.totals.comm_wait_s += time.perf_counter() - t0
        self.delayed.launch(frag, frag.prepare(), live, self.step, self.step + self.config.sync_delay)

    def join_sync(self, f: int) -> Optional[SyncReport]:
        """Take part in fragment ``f``'s sync that the other replicas start after this inner step
        (``self.step``): a joiner whose transport already holds the sync's live set (torchft:
        ``prime``). τ = 0: synchronous, returns its report; τ > 0: launched now and applied after
        inner step ``step + τ`` (with α), as on the others; returns None."""
        if self.delayed is not None:
            self._launch(f)
            return None
        return self.sync(f)

    def skip_to(self, step: int) -> None:
        """Continue the schedule at inner step ``step`` (a replica that healed forward to the running
        replicas' position in the middle of its own, older sync). A delayed sync of its own still in
        flight was voided on every member of its quorum (no one applies it): it is dropped and its
        fragment keeps the healed θ(t)."""
        assert step >= self.step, (step, self.step)
        if self._in_flight is not None:
            p = self.delayed.take(self.totals)
            assert p.result.averaged is None, "a sync in flight across a heal was not voided"
            self.fragments[p.fragment].restore()
            logger.warning("DiLoCo: the delayed sync of fragment %d launched at step %d was voided; dropped "
                           "(healed to step %d)", p.fragment, p.launched, step)
        self.step = step

    def _complete(self) -> SyncReport:
        """Wait for the sync in flight and apply it now: the outer step from θ(t) (the snapshot)
        gives θ(t+1), the new snapshot; the local parameters, τ steps further, are merged
        (:meth:`Fragment.merge`). A non-finite result: θ(t) is restored on every replica (the
        fragment's last τ steps are dropped) and the skip recovery runs."""
        p = self.delayed.take(self.totals)
        res = p.result
        frag = self.fragments[p.fragment]
        before = self._observe_before(frag, local=False)
        report = self._report(frag, p.launched, res)
        local, plain = self._probe_before(frag, res.averaged)
        if res.averaged is not None:
            frag.outer.step(res.averaged, res.unowned)
            frag.merge(self.config.merge_alpha, self.inner_group)
        else:
            frag.restore()
        self._probe_after(report, local, plain)
        # Inner steps since the last sync: with α > 0 the local values keep (a share of) the progress
        # since the launch, so the fragment counts as synchronised at the launch; otherwise at the merge.
        frag.last_sync = p.launched if res.averaged is not None and self.config.merge_alpha > 0 else self.step
        return self._notify(frag, self._account(frag, report, res.averaged is not None), before)

    def _recover(self, skipped: int):
        """After a skipped sync (this rank only, no collective): return every other fragment whose
        local values are non-finite to its snapshot, and reset the non-finite inner optimizer state
        (see the module docstring). Returns (restored fragments, number of states reset)."""
        restored = []
        for g in self.fragments:
            if g.index != skipped and not g.locally_finite():
                g.restore()
                restored.append(g.index)
        return restored, self.optimizer_view.reset_nonfinite_state()

    # -- evaluation -----------------------------------------------------------------
    @contextlib.contextmanager
    def global_weights(self) -> Iterator[None]:
        """Within the block the model holds the global model: every fragment's latest
        synchronised parameters θ(t) (its snapshot), the same on every replica, instead of
        this replica's local weights (which are up to H steps past θ(t) mid-round). A delayed
        sync in flight (τ > 0) is not applied yet: its fragment shows the θ(t) it was launched
        from. Only the model's tensors are swapped (not the inner optimizer's fp32 masters), and
        the local values are put back on exit, bit for bit. For evaluation (no gradients)."""
        saved = []
        with torch.no_grad():
            for frag in self.fragments:
                saved += frag.swap_in()
        try:
            yield
        finally:
            with torch.no_grad():
                put_back(saved)

    # -- checkpointing --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Snapshot θ(t), outer momentum, step counter and fragment schedule (host tensors); with
        error feedback each fragment's residual; with a delayed sync in flight, its reduced result
        (waited for here, not applied) and its due step. Identical on a replica's inner-DP ranks."""
        t = self.totals
        return {
            "step": self.step,
            "last_sync": [f.last_sync for f in self.fragments],
            "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            "fragments": [list(f.names) for f in self.fragments],
            "snapshots": [[p.data.clone() for p in f.snapshot] for f in self.fragments],
            "outer_optimizers": [f.outer.sgd.state_dict() for f in self.fragments],
            "stats": {"syncs": t.syncs, "skipped": t.skipped, "payload_bytes": t.payload_bytes,
                      "ring_bytes_sent": t.ring_bytes_sent, "bytes_handed": t.bytes_handed},
            "residuals": [f.residual.to("cpu", copy=True) if f.residual is not None else None
                          for f in self.fragments],
            "in_flight": self.delayed.record(t) if self.delayed is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` if the fragment layout differs."""
        if state["fragments"] != [list(f.names) for f in self.fragments]:
            raise ValueError(
                "the checkpoint's DiLoCo fragments do not match this run's parameters/"
                "--diloco-streaming-fragments; resume with the same model and fragment count."
            )
        assert self._in_flight is None, "load_state_dict while an outer sync is in flight"
        self.step = int(state["step"])
        if "last_sync" in state:
            last = [int(x) for x in state["last_sync"]]
        else:  # older checkpoints: every sync happened on the schedule
            H = self.config.local_steps
            last = [s if s >= 1 else 0 for s in (self.step - (self.step - f.offset) % H for f in self.fragments)]
        for frag, s, snaps, sgd_state in zip(self.fragments, last, state["snapshots"], state["outer_optimizers"]):
            frag.last_sync = s
            for p, v in zip(frag.snapshot, snaps):
                p.data.copy_(v)
            frag.outer.sgd.load_state_dict(sgd_state)
        residuals = state.get("residuals") or [None] * len(self.fragments)
        for frag, r in zip(self.fragments, residuals):
            if frag.residual is None:
                continue  # this run keeps no residual (e.g. --diloco-error-feedback dropped)
            if r is None:
                frag.residual.zero_()  # the checkpoint kept none: start error feedback afresh
            elif tuple(r.shape) != tuple(frag.residual.shape):
                raise ValueError(
                    f"the checkpoint's error-feedback residual of DiLoCo fragment {frag.index} has shape "
                    f"{tuple(r.shape)}, this run needs {tuple(frag.residual.shape)} (another inner-DP size or "
                    "model); resume with the checkpoint's layout or drop --diloco-error-feedback.")
            else:
                frag.residual.copy_(r)
        fl = state.get("in_flight")
        if fl is not None:
            if self.delayed is None:
                raise ValueError("the checkpoint holds a delayed DiLoCo sync in flight but this run has "
                                 "--diloco-sync-delay 0; resume with the checkpoint's --diloco-sync-delay.")
            self.delayed.restore(fl)
        st = state.get("stats", {})
        self.totals = DiLoCoStats(syncs=st.get("syncs", 0), skipped=st.get("skipped", 0),
                                  payload_bytes=st.get("payload_bytes", 0),
                                  ring_bytes_sent=st.get("ring_bytes_sent", 0),
                                  bytes_handed=st.get("bytes_handed", 0))

    def outer_state_bytes(self) -> int:
        """Host bytes held by the snapshots and the outer momentum."""
        return sum(f.state_bytes() for f in self.fragments)
