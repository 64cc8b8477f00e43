#!/usr/bin/env bash
# Run the test suite (sets up the venv first). Extra arguments go to pytest.
#   bash scripts/test.sh                          Python 3.11, megatron-core 0.16.1 (.venv)
#   PYTHON=python3.12 bash scripts/test.sh        Python 3.12, megatron-core 0.19.x (.venv-py3.12)
#   PYTHON=python3.12 bash scripts/test.sh -m mcore_gate   only the tests of the version gates
# The whole suite (no arguments) runs in two pytest sessions side by side: the torchft replica-job
# tests (marker ft_jobs: processes that mostly wait on heartbeats and quorums) beside the rest;
# their output follows. PPU_TEST_SERIAL=1: one session, as with arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/venv.sh
PYTEST=("$VENV/bin/python" -m pytest tests -q -p no:cacheprovider --timeout=600)
if [ $# -gt 0 ] || [ -n "${PPU_TEST_SERIAL:-}" ]; then
    exec "${PYTEST[@]}" "$@"
fi
ft_log=$(mktemp)
"${PYTEST[@]}" -m ft_jobs -rfE > "$ft_log" 2>&1 &
ft_pid=$!
rest=0
"${PYTEST[@]}" -m "not ft_jobs" -rfE || rest=$?
ft=0
wait "$ft_pid" || ft=$?
echo "=== the torchft replica-job tests (marker ft_jobs), run beside the others ==="
cat "$ft_log"
rm -f "$ft_log"
echo "tests: the rest exited $rest, the ft_jobs tests $ft"
[ "$rest" -eq 0 ] && [ "$ft" -eq 0 ]
