#!/usr/bin/env bash
# An old source tree for a same-machine A/B (`python -m suites.core.ab --base-tree DEST`):
# `git archive` of COMMIT's packages into DEST (default _ab/COMMIT, kept out of git through
# .git/info/exclude). Pass DEST's parent folder to the device call's `carry` (an ignored
# folder does not travel otherwise).
#
#   bash scripts/ab_tree.sh 5516880            # -> _ab/5516880
set -euo pipefail
commit=${1:?usage: scripts/ab_tree.sh COMMIT [DEST]}
dest=${2:-_ab/$commit}
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx "/_ab/" "$exclude" 2>/dev/null || echo "/_ab/" >> "$exclude"
rm -rf "$dest"
mkdir -p "$dest"
git archive "$commit" e2f suites baselines run_bench.py pyproject.toml | tar -x -C "$dest"
git rev-parse "$commit^{commit}" > "$dest/COMMIT"  # the commit its records name (suites.core.ab)
echo "$dest"
