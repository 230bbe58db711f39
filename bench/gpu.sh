#!/usr/bin/env bash
# Every benchmark's GPU setting in one go (issue 22), within 8 minutes, into one markdown file.
#
#   bash bench/gpu.sh                  # writes bench/out/gpu.md (+ each bench's json/md/log in bench/out/gpu/)
#   PY=python3 bash bench/gpu.sh       # another interpreter (default: .venv/bin/python if present, else python3)
#
# Runs, each under its own `timeout` (seconds; override with the environment variables named), capped so that
# the whole script ends within TOTAL_S (default 480):
#   core      CORE_S=110      bench/core.py --device cuda --batch 64 --ks 1,16,64 --rank 16 (mixed batch B=K=64 vs peft)
#   scale     SCALE_S=110     bench/scale.py --device cuda (N up to 4,096, serving loop; peft past its budget registered directly)
#   zeroshot  ZEROSHOT_S=150  bench/zeroshot.py --device cuda --models vit-b-32 (full size, against clip_benchmark)
#   asr       ASR_S=50        bench/asr.py (streaming; the bench has no --device flag: it runs on the CPU)
#   video     VIDEO_S=50      bench/video.py (decoding is CPU work: the bench has no --device flag)
# A bench that fails or times out is reported as such in the table; the others still run. Needs an NVIDIA GPU
# and a CUDA build of torch: without them it stops at once with exit status 2. Exit status 1: some bench failed,
# timed out or was not run (the table says which).
set -uo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-bench/out/gpu}
MD=${MD:-bench/out/gpu.md}
TOTAL_S=${TOTAL_S:-480}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "bench/gpu.sh: nvidia-smi not found: this script needs an NVIDIA GPU (CUDA is absent here); nothing was run" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: $PY: torch.cuda.is_available() is False (torch without CUDA, or no usable GPU); nothing was run" >&2
  exit 2
fi
CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)
mkdir -p "$OUT"
START=$(date +%s)
ROWS=()
SECTIONS=()
FAILED=0

# run NAME LIMIT_S SCRIPT ARGS...: one bench under its time limit (capped by what is left of TOTAL_S).
run() {
  local name=$1 want=$2 script=$3
  shift 3
  local left=$(( TOTAL_S - ($(date +%s) - START) - 5 ))
  local limit=$(( want < left ? want : left ))
  local cmd="$PY $script $* --out $OUT/$name"
  if (( left < 10 )); then
    ROWS+=("| $name | \`$cmd\` | **not run**: the ${TOTAL_S} s total was spent | 0 |")
    FAILED=$(( FAILED + 1 ))
    SECTIONS+=("## $name"$'\n\n'"Not run: the ${TOTAL_S} s total was spent."$'\n')
    return
  fi
  echo "== $name (limit ${limit} s): $cmd" >&2
  local t0 rc status
  t0=$(date +%s)
  timeout -k 3 "$limit" "$PY" "$script" "$@" --out "$OUT/$name" >"$OUT/$name.log" 2>&1
  rc=$?
  local wall=$(( $(date +%s) - t0 ))
  case $rc in
    0) status="ok" ;;
    124|137) status="**timed out** after ${limit} s"; FAILED=$(( FAILED + 1 )) ;;
    *) status="**failed** (exit $rc)"; FAILED=$(( FAILED + 1 )) ;;
  esac
  ROWS+=("| $name | \`$cmd\` | $status | $wall |")
  if [[ $rc -eq 0 && -f "$OUT/$name.md" ]]; then
    SECTIONS+=("## $name"$'\n\n'"$(cat "$OUT/$name.md")"$'\n')
  else
    SECTIONS+=("## $name"$'\n\n'"$status; last lines of $OUT/$name.log:"$'\n\n```\n'"$(tail -n 15 "$OUT/$name.log")"$'\n```\n')
  fi
}

run core "${CORE_S:-110}" bench/core.py --device cuda --batch 64 --ks 1,16,64 --rank 16
run scale "${SCALE_S:-110}" bench/scale.py --device cuda --reps 10 --peft-budget 15 --peft-direct
run zeroshot "${ZEROSHOT_S:-150}" bench/zeroshot.py --device cuda --models vit-b-32
run asr "${ASR_S:-50}" bench/asr.py --reps 3
run video "${VIDEO_S:-50}" bench/video.py --reps 3

{
  echo "# GPU benchmarks: $CARD"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(nproc) CPUs," \
       "total $(( $(date +%s) - START )) s (limit ${TOTAL_S} s). asr and video run on the CPU (their benches have no --device flag)."
  echo
  echo "| bench | command | status | wall s |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  printf '%s\n' "${SECTIONS[@]}"
} >"$MD.tmp" && mv "$MD.tmp" "$MD"
cat "$MD"
echo "bench/gpu.sh: wrote $MD ($CARD); $FAILED bench(es) failed, timed out or not run" >&2
exit $(( FAILED > 0 ))
