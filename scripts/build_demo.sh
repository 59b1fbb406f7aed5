#!/usr/bin/env bash
# Rebuild the built-in demo model (genvl/assets/demo) from scratch with genvl's own commands.
# About 1.5 hours on a 2-core CPU (CLIP ~9 min, prior ~14, decoder ~65, judge CLIP ~3);
# a GPU makes it minutes. Run from the repository root:
#   bash scripts/build_demo.sh [RUN_DIR]
set -euo pipefail
RUN=${1:-runs/demo}
[ -f data/emoji/metadata.jsonl ] || genvl data emoji data/emoji
# text-to-image (DALL-E 2 style): CLIP core, prior, decoder, one directory
genvl train clip    --data data/emoji --out "$RUN" --config configs/demo-clip.yaml
genvl train prior   --data data/emoji --init "$RUN" --out "$RUN" --config configs/demo-prior.yaml
genvl train decoder --data data/emoji --init "$RUN" --out "$RUN" --config configs/demo-decoder.yaml
# the shipped decoder then trained 1,500 steps more (a second cosine cycle from the step-4000 checkpoint)
genvl train decoder --data data/emoji --init "$RUN" --out "$RUN" --config configs/demo-decoder.yaml \
    --resume latest --set max_steps=5500
# recommended sampling settings (measured with the sweep in the model card): decoder guidance 1.5, prior 2
python - "$RUN" <<'PY'
import json, sys
p = f"{sys.argv[1]}/genvl.json"
m = json.load(open(p))
m["sampling"] = {"steps": 50, "prior_steps": 25, "guidance": 1.5, "prior_guidance": 2.0, "scheduler": "ddim"}
json.dump(m, open(p, "w"), indent=2)
PY
# autoregressive (Parti style): VQ-VAE + token LM sharing the CLIP's text tokenizer (GENVL_DEMO_AR=1;
# not in the shipped demo yet)
if [ "${GENVL_DEMO_AR:-0}" = 1 ]; then
  genvl train vqvae   --data data/emoji --init "$RUN" --out "$RUN-ar" --config configs/demo-vqvae.yaml
  genvl train lm      --data data/emoji --init "$RUN-ar" --out "$RUN-ar" --config configs/demo-lm.yaml
  genvl evaluate reconstruction --model "$RUN-ar" --data data/emoji --limit 1000
fi
# an independent judge CLIP for the evaluation (another seed and loss)
genvl train clip    --data data/emoji --out "$RUN-judge" --config configs/demo-judge-clip.yaml
genvl evaluate retrieval      --model "$RUN" --data data/emoji --limit 1000
genvl evaluate generation     --model "$RUN" --prompts configs/demo-prompts.txt --clip "$RUN-judge" \
    --data data/emoji --num-images 4 --seed 0 --json "$RUN-generation.json"
EXTRA=()
[ -d "$RUN-ar/lm" ] && EXTRA=(--extra "$RUN-ar")
python scripts/package_demo.py "$RUN" genvl/assets/demo "${EXTRA[@]}" --half --generation "$RUN-generation.json"
