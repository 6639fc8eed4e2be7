#!/usr/bin/env bash
# Proto hygiene, offline: `buf lint` (STANDARD rules, protos/buf.yaml), `buf format`,
# and `buf breaking` (FILE rules) against a baseline taken from this clone's git history.
#
# buf is the one pinned in clients/node/package-lock.json: `npm ci --prefix clients/node`.
#
# Baseline (the first that applies):
#   1. $BUF_BREAKING_AGAINST: any buf input (e.g. '.git#branch=main,subdir=protos'),
#      or 'none' to skip the breaking check;
#   2. on a branch other than main: the merge-base with main (local `main`, else `origin/main`),
#      so a feature branch is compared with what it forked from;
#   3. otherwise (on main itself, detached at it, or without a main ref, as in a fresh CI clone of
#      main): the working tree is compared with HEAD when protos/ has uncommitted changes, and
#      HEAD with its parent HEAD~1 when it has none, i.e. the latest commit is checked.
# A baseline without protos/ (history before them) or a shallow clone without the parent
# commit skips the breaking check with a message; lint and format still run.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-clients/node/node_modules/.bin/buf}
if [ ! -x "$BUF" ]; then
  echo "check_protos: $BUF not found: run 'npm ci --prefix clients/node'" >&2
  exit 1
fi

"$BUF" lint protos
"$BUF" format --diff --exit-code protos
echo "check_protos: buf lint and buf format: clean"

against=${BUF_BREAKING_AGAINST:-}
if [ "$against" = none ]; then
  echo "check_protos: breaking-change check skipped (BUF_BREAKING_AGAINST=none)"
  exit 0
fi
if [ -z "$against" ]; then
  if ! git rev-parse --git-dir >/dev/null 2>&1; then
    echo "check_protos: not a git checkout: breaking-change check skipped"
    exit 0
  fi
  head=$(git rev-parse HEAD)
  main=$(git rev-parse -q --verify 'refs/heads/main^{commit}' || git rev-parse -q --verify 'refs/remotes/origin/main^{commit}' || true)
  branch=$(git symbolic-ref -q --short HEAD || true)
  base=""
  what=""
  if [ -n "$main" ] && [ "$main" != "$head" ] && [ "$branch" != main ]; then
    base=$(git merge-base HEAD "$main" || true)
    what="the merge-base with main"
  fi
  if [ -z "$base" ] || [ "$base" = "$head" ]; then
    if ! git diff --quiet HEAD -- protos || [ -n "$(git ls-files --others --exclude-standard -- protos)" ]; then
      base=$head
      what="HEAD (uncommitted changes in protos/)"
    else
      base=$(git rev-parse -q --verify 'HEAD~1^{commit}' || true)
      what="HEAD~1"
    fi
  fi
  if [ -z "$base" ]; then
    echo "check_protos: no parent commit in this clone (shallow or first commit): breaking-change check skipped"
    exit 0
  fi
  if [ -z "$(git ls-tree -r --name-only "$base" -- protos | grep '\.proto$' || true)" ]; then
    echo "check_protos: $what (${base:0:12}) has no .proto files: breaking-change check skipped"
    exit 0
  fi
  against=".git#ref=$base,subdir=protos"
  echo "check_protos: breaking-change baseline: $what (${base:0:12})"
fi
"$BUF" breaking protos --against "$against"
echo "check_protos: buf breaking: no breaking change against $against"
