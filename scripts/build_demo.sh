#!/usr/bin/env bash
# Rebuild the built-in demo model (genvl/assets/demo) from scratch with genvl's own commands.
# About 1.5 hours on a 2-core CPU (CLIP ~9 min, prior ~13, decoder ~40, VQ-VAE + token LM ~30);
# a GPU makes it minutes. Run from the repository root:
#   bash scripts/build_demo.sh [RUN_DIR]
set -euo pipefail
RUN=${1:-runs/demo}
[ -f data/emoji/metadata.jsonl ] || genvl data emoji data/emoji
# text-to-image (DALL-E 2 style): CLIP core, prior, decoder, one directory
genvl train clip    --data data/emoji --out "$RUN" --config configs/demo-clip.yaml
genvl train prior   --data data/emoji --init "$RUN" --out "$RUN" --config configs/demo-prior.yaml
genvl train decoder --data data/emoji --init "$RUN" --out "$RUN" --config configs/demo-decoder.yaml
# autoregressive (Parti style): VQ-VAE + token LM sharing the CLIP's text tokenizer
genvl train vqvae   --data data/emoji --init "$RUN" --out "$RUN-ar" --config configs/demo-vqvae.yaml
genvl train lm      --data data/emoji --init "$RUN-ar" --out "$RUN-ar" --config configs/demo-lm.yaml
# an independent judge CLIP for the evaluation (another seed and loss)
genvl train clip    --data data/emoji --out "$RUN-judge" --config configs/demo-judge-clip.yaml
genvl evaluate retrieval      --model "$RUN" --data data/emoji --limit 1000
genvl evaluate reconstruction --model "$RUN-ar" --data data/emoji --limit 1000
genvl evaluate generation     --model "$RUN" --prompts configs/demo-prompts.txt --clip "$RUN-judge" \
    --data data/emoji --limit 2000 --num-images 4 --seed 0 --json "$RUN-generation.json"
python scripts/package_demo.py "$RUN" genvl/assets/demo --extra "$RUN-ar" --half \
    --generation "$RUN-generation.json"
