#!/usr/bin/env bash
# Build solo-learn's GitHub main into .solo-learn/ (outside the package, git-ignored) and run the
# solo-learn tests against it. `make test` then runs them too (tests/conftest.py puts
# .solo-learn on the path when it exists); without it they are skipped.
#   bash scripts/solo_learn.sh                      # from GitHub (needs access to github.com)
#   bash scripts/solo_learn.sh /path/to/solo-learn  # from a checkout
# solo-learn's legacy setup.py imports pkg_resources and pins old packages: it is built with
# setuptools<81 (a PIP_CONSTRAINT only applies with --use-pep517) and --no-deps (lightning,
# hydra-core, timm, scipy come with neco-loss[solo]).
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE="${1:-git+https://github.com/vturrisi/solo-learn.git}"
TARGET=.solo-learn
bash scripts/setup.sh
constraint="$(mktemp)"
trap 'rm -f "$constraint"' EXIT
echo "setuptools<81" >"$constraint"
rm -rf "$TARGET"
PIP_CONSTRAINT="$constraint" .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --use-pep517 --no-deps --target "$TARGET" "$SOURCE"
echo "solo-learn built into $TARGET"
.venv/bin/python -m pytest -q tests/test_solo_learn_real.py tests/test_solo_learn_docs.py
