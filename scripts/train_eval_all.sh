#!/usr/bin/env bash
# Every recipe through the one CLI, as a user runs it: generate a small data set, `mmadapters train <recipe>
# --config configs/<recipe>.yaml`, `mmadapters eval <task>` on the test split with the best/ adapters, then
# `mmadapters report` over all results (table + plots in runs/report/). CPU, a few minutes per recipe on 2 cores.
# Usage: bash scripts/train_eval_all.sh [recipe ...]   (default: all six)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=$(bash scripts/env.sh | tail -1)
mma="$venv/bin/mmadapters"
py="$venv/bin/python"
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(tip-adapter caps-adapter vl-adapter tem-adapter fineclipper lda)
timed() { local start=$SECONDS; "$@"; echo "[$(( SECONDS - start )) s] $*" | tee -a runs/timings.txt >&2; }
mkdir -p runs
for r in "${recipes[@]}"; do
  case $r in
    tip-adapter|caps-adapter)
      timed "$mma" train "$r" --config "configs/$r.yaml" --set trainer.progress=false
      timed "$mma" eval fewshot --adapters "runs/$r/best" --output "runs/$r/test.json" --overwrite --restart --no-progress ;;
    vl-adapter)
      [ -f data/vl/vqa/karpathy_test.json ] || timed "$py" -m mmadapters.vision.synth_vl --out data/vl --n-images 60 --seed 0
      timed "$mma" train vl-adapter --config configs/vl-adapter.yaml --set trainer.progress=false
      for t in vqa gqa nlvr; do
        ann=$(case $t in vqa) echo data/vl/vqa/karpathy_test.json;; gqa) echo data/vl/gqa/testdev.json;; nlvr) echo data/vl/nlvr/test.json;; esac)
        timed "$mma" eval "$t" --annotations "$ann" --features data/vl/features.h5 --adapters runs/vl-adapter/best \
          --output "runs/vl-adapter/${t}_test.json" --overwrite --restart --no-progress
      done
      timed "$mma" eval caption --annotations data/vl/coco/dataset_coco.json --split test --features data/vl/features.h5 \
        --adapters runs/vl-adapter/best --output runs/vl-adapter/caption_test.json --overwrite --restart --no-progress ;;
    tem-adapter)
      [ -d data/motion/videos ] || timed "$py" -m mmadapters.video.synth motion --n 600 --seed 0 --out data/motion --no-progress
      timed "$mma" train tem-adapter --config configs/tem-adapter.yaml --set trainer.progress=false
      timed "$mma" eval videoqa --annotations data/motion/annotations/R2_test.jsonl --video-root data/motion/videos \
        --adapters runs/tem-adapter/best --output runs/tem-adapter/test.json --overwrite --restart --no-progress
      timed "$mma" eval videoqa --annotations data/motion/annotations/R2_test.jsonl --video-root data/motion/videos \
        --output runs/tem-adapter/zeroshot.json --overwrite --restart --no-progress ;;
    fineclipper)
      [ -d data/faces ] || timed "$py" -m mmadapters.video.synth faces --n 70 --seed 0 --frames 8 --no-video --out data/faces --no-progress
      timed "$mma" train fineclipper --config configs/fineclipper.yaml --set trainer.progress=false
      timed "$mma" eval dfer --data-dir data/faces --fold 1 --split test --adapters runs/fineclipper/best \
        --output runs/fineclipper/test.json --overwrite --restart --no-progress ;;
    lda)
      [ -d data/speech_lda ] || timed "$py" -m mmadapters.speech.synth --languages nl,pt --tail-languages nl,pt --utterances 40 \
        --tail-utterances 40 --eval-utterances 10 --unlabeled 0 --seed 0 --quiet --out data/speech_lda
      timed "$mma" train lda --config configs/lda.yaml --set trainer.progress=false
      timed "$mma" eval asr --dataset data/speech_lda --split test --adapters runs/lda/best --output runs/lda/test.json \
        --overwrite --restart --no-progress ;;
    *) echo "unknown recipe $r (known: tip-adapter caps-adapter vl-adapter tem-adapter fineclipper lda)" >&2; exit 2 ;;
  esac
done
"$mma" report runs --markdown runs/report/report.md --csv runs/report/report.csv --plots runs/report
