#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job headless on the bundled sample: generate the
# synthetic sample series with its ground truth, detect and track spines with the shipped model,
# score the result against the truth, and compute spine dynamics. Outputs go to ./demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cli=.venv/bin/napari-spine-tracker
$cli synth --preset sample --seed 7 --out demo
$cli detect demo/series.tif --out demo/series.spines.csv
echo "accuracy against the generator's truth (tolerance 1 µm):"
$cli evaluate demo/series.spines.csv demo/truth.csv --voxel-size 0.5 0.1 0.1
$cli dynamics demo/series.spines.csv --image demo/series.tif --out demo/dynamics
echo "done: see demo/ (series.tif, truth.csv, series.spines.csv, dynamics/)"
