#!/usr/bin/env bash
# Incremental developer build: (re)installs genkernels in editable mode from the persistent
# build directory build/dev, so only changed sources recompile. A lock serialises concurrent
# builds from several shells. Extra arguments go to pip (e.g. -Ccmake.define.GK_KERNELS=merge).
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/genkernels-dev-build.lock \
  pip install --no-build-isolation --no-deps -q -e . -Cbuild-dir=build/dev "$@"
