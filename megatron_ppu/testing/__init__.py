"""Support for the tests and the benchmarks, not used by training.

* :mod:`.local_ranks`: run N local ranks of one command (the multi-rank test harness and the
  benchmarks' launcher).
* :mod:`.accounting`: measured and predicted per-rank bytes of gradient buffers and optimizer
  state (what the memory tests and benchmarks compare against the ownership plan).
"""
