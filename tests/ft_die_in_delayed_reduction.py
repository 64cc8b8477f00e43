"""The trainer (``pretrain_gpt_ppu.py``) with one injected fault, for
``tests/test_fault_tolerance_delayed.py``: this rank SIGKILLs itself in the middle of a delayed outer
sync's reduction (τ > 0) once the others are in it.

The fault: the first cross-replica ``sum_`` on the delayed sync's background thread
(``diloco-outer-sync``) of a sync whose quorum held every slot and was taken at inner step >=
``FT_TEST_DIE_AT_STEP``. Every member has passed that quorum (its membership all-reduce needs all of
them), so the others start the same reduction on their background threads and block in it waiting for
this rank's contribution; after ``FT_TEST_DIE_PAUSE_S`` (default 1 s) this rank dies without
contributing. One line ``fault injection: ...`` names the inner step of that sync's launch.

The wrapper lives here, in the tests (not a library patch): it wraps ``TorchFTReplicas.sum_`` in this
process only, then runs ``pretrain_gpt_ppu.py`` with the same arguments.
"""
import os
import pathlib
import runpy
import signal
import sys
import threading
import time

from megatron_ppu.sync import torchft_replicas

DIE_AT = int(os.environ["FT_TEST_DIE_AT_STEP"])
PAUSE_S = float(os.environ.get("FT_TEST_DIE_PAUSE_S", "1.0"))
_real_sum = torchft_replicas.TorchFTReplicas.sum_


def _sum_then_die(self, buf, **kw):
    background = threading.current_thread().name.startswith("diloco-outer-sync")
    if background and self.peer_step >= DIE_AT and tuple(self.live) == tuple(range(self.num_slots)):
        print(f"fault injection: slot {self.slot} SIGKILLs itself in the delayed reduction launched at inner "
              f"step {self.peer_step} (live slots {list(self.live)})", flush=True)
        time.sleep(PAUSE_S)  # the others are blocked in this reduction, waiting for this rank
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_sum(self, buf, **kw)


torchft_replicas.TorchFTReplicas.sum_ = _sum_then_die

if __name__ == "__main__":
    script = pathlib.Path(__file__).resolve().parents[1] / "pretrain_gpt_ppu.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")
