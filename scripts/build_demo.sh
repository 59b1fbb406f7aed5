#!/usr/bin/env bash
# Rebuild the built-in demo model (genvl/assets/demo) from scratch with genvl's own commands.
# About an hour on a 2-core CPU; a GPU makes it minutes. Run from the repository root.
#   bash scripts/build_demo.sh [RUN_DIR]
set -euo pipefail
RUN=${1:-runs/demo}
[ -f data/emoji/metadata.jsonl ] || genvl data emoji data/emoji
genvl train clip    --data data/emoji --out "$RUN" --config configs/demo-clip.yaml
genvl train prior   --data data/emoji --init "$RUN" --out "$RUN" --config configs/demo-prior.yaml
genvl train decoder --data data/emoji --init "$RUN" --out "$RUN" --config configs/demo-decoder.yaml
# an independent judge CLIP for the evaluation (another seed and loss)
genvl train clip    --data data/emoji --out "$RUN-judge" --config configs/demo-judge-clip.yaml
genvl evaluate retrieval  --model "$RUN" --data data/emoji --limit 1000
genvl evaluate generation --model "$RUN" --prompts configs/demo-prompts.txt --clip "$RUN-judge" \
    --data data/emoji --limit 2000 --num-images 4 --seed 0 --json "$RUN-generation.json"
python scripts/package_demo.py "$RUN" genvl/assets/demo --generation "$RUN-generation.json"
