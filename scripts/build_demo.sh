#!/usr/bin/env bash
# Rebuild the built-in demo model (genvl/assets/demo) from scratch with genvl's own commands.
# About 5.5 hours on a 2-core CPU (CLIP ~9 min, prior ~14 + ~49, decoder ~65 + ~70 + ~2 + ~28 + ~14, token LM ~30,
# interleaved ~10, upsampler ~25, judge ~3);
# a GPU makes it minutes. Run from the repository root:
#   bash scripts/build_demo.sh [RUN_DIR]
# Directories: RUN (clip, prior, first decoder), RUN2 (the text-to-image model that ships),
# RUN-ar / RUN-ar2 (VQ-VAE and token LM), RUN-interleaved (added to the demo), RUN-judge (evaluation only).
set -euo pipefail
RUN=${1:-runs/demo}
T2I=${RUN}2
# the emoji image-caption set (npm packages; scripts/emoji_set.py), with and without skin-tone variations
[ -f data/emoji/metadata.jsonl ] || python scripts/emoji_set.py data/emoji
[ -f data/emoji-base/metadata.jsonl ] || python scripts/emoji_set.py data/emoji-base --no-skin-tones
# text-to-image (DALL-E 2 style): CLIP core, prior, decoder, one directory
genvl train clip    --data data/emoji --out "$RUN" --config demo-clip
genvl train prior   --data data/emoji --init "$RUN" --out "$RUN" --config demo-prior
genvl train decoder --data data/emoji --init "$RUN" --out "$RUN" --config demo-decoder
# the shipped decoder then trained 1,500 steps more (a second cosine cycle from the step-4000 checkpoint)
genvl train decoder --data data/emoji --init "$RUN" --out "$RUN" --config demo-decoder \
    --resume latest --set max_steps=5500
# then 5,000 steps more on the emoji without skin-tone variations (each object seen twice as often)
genvl train decoder --data data/emoji-base --init "$RUN" --out "$T2I" --config demo-decoder-base
# the prior then trained 5,000 steps more (a fresh cosine cycle), and the decoder got its coarse layout path
# (only that path trains, on the image embeddings and on 2 prior samples per image; the UNet is untouched)
genvl train prior   --data data/emoji --init "$T2I" --out "$T2I" --config demo-prior --set max_steps=5000
genvl train decoder --data data/emoji-base --init "$T2I" --out "$T2I" --config demo-decoder-layout
# then the whole decoder trained 2,500 steps more on the image embeddings and the prior's samples
genvl train decoder --data data/emoji-base --init "$T2I" --out "$T2I" --config demo-decoder-prior
# and last its layout path was replaced by a 4-layout mixture (one sharp layout per style instead of their
# blur; only the path trains, the UNet is untouched; ~14 min)
genvl train decoder --data data/emoji-base --init "$T2I" --out "$T2I" --config demo-decoder-mixture
# recommended sampling settings (measured with the sweep in the model card): decoder guidance 1.5, prior 2;
# coarse start 0.6 (CLIP score / prompt retrieval on the evaluation prompts, README table: 57.6 / 69% at 0.7,
# 59.0 / 72% at 0.6, 59.1 / 73% at 0.5 with a slightly worse FD); DPM-Solver++ with 15 decoder, 10 prior and
# 8 super-resolution steps: 3x faster than DDIM 50 / 25 / 25 at FD and CLIP score within the spread of
# seeds (benchmarks/cpu_sampling.py)
python - "$T2I" <<'PY'
import json, sys
p = f"{sys.argv[1]}/genvl.json"
m = json.load(open(p))
m["sampling"] = {"steps": 15, "prior_steps": 10, "guidance": 1.5, "prior_guidance": 2.0, "scheduler": "dpm++",
                 "prior_candidates": 8, "coarse_start": 0.6, "sr_steps": 8}
json.dump(m, open(p, "w"), indent=2)
PY
# autoregressive (Parti style): VQ-VAE + token LM sharing the CLIP's text tokenizer, on pre-encoded codes;
# the LM's second command continues it with a fresh schedule
genvl train vqvae   --data data/emoji --init "$RUN" --out "$RUN-ar" --config demo-vqvae
genvl evaluate reconstruction --model "$RUN-ar" --data data/emoji --limit 1000
genvl data tokenize data/emoji --model "$RUN-ar" --out data/emoji-codes.safetensors
genvl train lm      --data data/emoji-codes.safetensors --init "$RUN-ar" --out "$RUN-ar" --config demo-lm
genvl train lm      --data data/emoji-codes.safetensors --init "$RUN-ar" --out "$RUN-ar2" --config demo-lm \
    --set max_steps=1500 --set warmup_steps=100
# interleaved (Emu style): one causal LM over text and regressed CLIP image embeddings, drawn by the decoder
genvl train interleaved --data data/emoji --init "$T2I" --out "$RUN-interleaved" --config demo-interleaved
genvl evaluate interleaved --model "$RUN-interleaved" --data data/emoji --limit 400
# the 32 -> 64 px upsampler (trained on crops of the 64 px emoji within a 25-minute budget)
genvl train sr --data data/emoji --init "$T2I" --out "$RUN-sr" --config demo-sr
# an independent judge CLIP for the evaluation (another seed and loss)
genvl train clip    --data data/emoji --out "$RUN-judge" --config demo-judge-clip
genvl evaluate retrieval      --model "$T2I" --data data/emoji --limit 1000
genvl evaluate generation     --model "$T2I" --prompts configs/demo-prompts.txt --clip "$RUN-judge" \
    --data data/emoji --num-images 4 --seed 0 --json "$RUN-generation.json"
python scripts/package_demo.py "$T2I" genvl/assets/demo --extra "$RUN-ar2" \
    --extra "$RUN-interleaved" --extra "$RUN-sr" --half --generation "$RUN-generation.json" --grid configs/demo-prompts.txt \
    --summary "For prompts that name emoji (\"a red heart\", \"a cat face\", \"a dog face\", \"a red apple\", \"a star\", \"a snowman\", \"a rocket\", \"a slice of pizza\") it draws recognisable emoji. Its decoder starts from a coarse 16x16 layout that its layout path proposes from the image embedding (sampling setting coarse_start 0.6). That path proposes 4 layouts and hands on the best-scored one, so a prompt that names no style gets a Twemoji-like or a Noto-like layout rather than a blur of both. Pizza comes out as pizza slices, with crust and pepperoni, some cluttered with stray colours; bananas as yellow curved shapes. Naming the Twemoji style (\"a slice of pizza, twitter twemoji style\") gives clean slices more often: the Noto pizza is the one the decoder has not learned. The decoder trained in 5 parts; the last one trained only the layout path, so the UNet's weights are those of the fourth part."
