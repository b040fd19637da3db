#!/usr/bin/env bash
# Copy what a `dipo experiment` folder's report is made of, without checkpoints, Redis files or logs, so that the
# results can be committed or shared: the plan, the report, and each run's record, metrics, ledger and evaluation.
# Copying the export back under an experiment's --out lets `dipo experiment` skip those runs and rebuild the report
# (docs/EXPERIMENTS.md, "Sharing results").
#
#   scripts/export_experiment.sh runs/experiments/cpu docs/results/experiment_cpu
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 EXPERIMENT_DIR DEST" >&2
    exit 2
fi
src=$1
dest=$2
if [[ ! -f "$src/experiment.json" ]]; then
    echo "$src is not a dipo experiment folder (no experiment.json)" >&2
    exit 2
fi

mkdir -p "$dest"
cp "$src/experiment.json" "$src/config.yaml" "$dest/"
if [[ -d "$src/report" ]]; then
    rm -rf "$dest/report"
    cp -r "$src/report" "$dest/report"
fi
copy_light() {  # copy_light FROM TO: the small files of one run (or of the baseline) that exist
    mkdir -p "$2"
    for name in run.json done failed config.yaml metrics.jsonl ledger.jsonl eval.json eval.args.json; do
        if [[ -f "$1/$name" ]]; then
            cp "$1/$name" "$2/$name"
        fi
    done
}
if [[ -d "$src/baseline" ]]; then
    copy_light "$src/baseline" "$dest/baseline"
fi
for run in "$src"/runs/*/; do
    [[ -d "$run" ]] || continue
    copy_light "$run" "$dest/runs/$(basename "$run")"
done
echo "exported $src -> $dest ($(du -sh "$dest" | cut -f1))"
