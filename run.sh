#!/usr/bin/env bash
# One entry point for a fresh machine with only Python:
#   bash run.sh          set up .venv (first time) and run the main job on built-in data
#   bash run.sh test     set up .venv (first time) and run the test suite
#   bash run.sh ARGS...  set up .venv and run `densepred ARGS...`
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    # torch first and pinned, so nothing resolves a CUDA build.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
    rm -f "$VENV"/.installed-*; touch "$stamp"
fi
case "${1:-main}" in
    main) shift || true; exec "$VENV/bin/densepred" demo "$@" ;;
    test) shift; exec "$VENV/bin/python" -m pytest "$@" ;;
    *) exec "$VENV/bin/densepred" "$@" ;;
esac
