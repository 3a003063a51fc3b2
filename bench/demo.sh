#!/usr/bin/env bash
# Time the README's demo the way a newcomer meets it: fresh clone, `make demo` (one-time
# install into a new .venv included), then a second `make demo` (nothing left to do).
# Prints wall-clock seconds per phase and the per-rule timings Snakemake recorded.
#
#   bench/demo.sh            # clone of the committed HEAD into a temporary folder
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/loramill"
cd "$work/loramill"

seconds() { local start=$SECONDS; "$@" >"$work/$1.log" 2>&1; echo $((SECONDS - start)); }
install=$(seconds make install)
start=$SECONDS
.venv/bin/dvc pull -q
.venv/bin/snakemake --cores 1 train_all >"$work/workflow.log" 2>&1
workflow=$((SECONDS - start))
again=$(seconds make demo)

echo "install (fresh .venv)        ${install} s"
echo "dvc pull + train_all         ${workflow} s"
echo "demo total, install included $((install + workflow)) s"
echo "second make demo (no-op)     ${again} s"
echo "per rule (s, from benchmarks/):"
for f in benchmarks/*/*.tsv; do
    printf '  %-40s %s\n' "${f#benchmarks/}" "$(tail -n 1 "$f" | cut -f1)"
done
