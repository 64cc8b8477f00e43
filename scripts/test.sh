#!/usr/bin/env bash
# Run the test suite (sets up the venv first). Extra arguments go to pytest.
#   bash scripts/test.sh                          Python 3.11, megatron-core 0.16.1 (.venv)
#   PYTHON=python3.12 bash scripts/test.sh        Python 3.12, megatron-core 0.19.x (.venv-py3.12)
#   PYTHON=python3.12 bash scripts/test.sh -m mcore_gate   only the tests of the version gates
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/venv.sh
exec "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider --timeout=600 "$@"
