#!/usr/bin/env bash
# The main job: set up (or reuse) the environment, then, offline, on the tiny CLIP shipped in the package:
#   1. `mmadapters zeroshot` on the generated synth-shapes test split (CLIP_benchmark-style results JSON in out/);
#   2. `mmadapters fewshot-compare`: zero-shot vs Tip-Adapter vs Tip-Adapter-F vs CapS-Adapter, 4 shots per class and
#      3 seeds, on synth-novel: the synth-shapes images with classes named by made-up words the text tower never saw,
#      a task that passes the gate (16-shot linear probe minus zero-shot >= 10 points, recorded in its task.json), so
#      the few shots carry what the prompts miss; tuned on its val split, scored on its test split; it prints the gate
#      and each method's gain over zero-shot (tables in out/fewshot_compare.{json,md}).
# Generated images and cached classifiers go to out/cache, so a fresh clone needs nothing else.
# Extra arguments go to `mmadapters fewshot-compare` (e.g. --seeds 0,1,2 or --methods zeroshot,tip,tip-f,caps).
# The adapter-core demonstration of earlier versions is still there: `mmadapters demo`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$root/scripts/env.sh" | tail -n 1)
cd "$root"
cache=out/cache
"$venv/bin/mmadapters" zeroshot --dataset synth-shapes --cache-dir "$cache" \
  --output "out/{dataset}_{model}_{task}.json" --overwrite
echo
"$venv/bin/mmadapters" fewshot-compare --task synth-novel --shots 4 --methods zeroshot,tip,tip-f,caps --seeds 0,1,2 \
  --cache-dir "$cache" --output out/fewshot_compare.json --markdown out/fewshot_compare.md --overwrite "$@"
