# Sourced by scripts/setup_env.sh and scripts/test.sh: picks the interpreter and its venv folder.
#   PYTHON unset:        python3 (Python 3.11 here: megatron-core 0.16.1), venv .venv
#   PYTHON=python3.12:   that interpreter (megatron-core 0.19.x), venv .venv-py3.12
# A pyenv shim that is not the active version ("pyenv: python3.12: command not found") is
# resolved to the pyenv installation of that name.
PY=${PYTHON:-python3}
if ! "$PY" -c "" 2>/dev/null && command -v pyenv >/dev/null 2>&1; then
  for cand in "$(pyenv root)"/versions/*/bin/"$PY"; do
    if [ -x "$cand" ] && "$cand" -c "" 2>/dev/null; then PY=$cand; break; fi
  done
fi
if ! "$PY" -c "" 2>/dev/null; then
  echo "[setup] cannot run the interpreter '$PY' (PYTHON=${PYTHON:-})" >&2
  exit 2
fi
if [ -n "${PYTHON:-}" ]; then
  VENV=.venv-py$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
else
  VENV=.venv
fi
