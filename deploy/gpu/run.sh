#!/usr/bin/env bash
# maxwhisper's GPU checks on a bare GPU machine (Python 3.12 with PyTorch, no network), fed
# with the pieces deploy/gpu/pack.sh made, one per device call (docs/GPU.md):
#
#   bash deploy/gpu/run.sh stage    # a call carrying .gpu/pK: keep its piece in $MW_GPU_WORK
#   bash deploy/gpu/run.sh check    # the last call: unpack, then the steps below; results in $OUT
#
# The steps, in order of what a GPU session most needs, each with a time limit; past the
# call's budget (MW_GPU_SECONDS, default 540 s) the rest are skipped, and the graph store
# always goes out last so that the next run compiles nothing. MW_GPU_STEPS picks the steps
# (default "1 2 3 4 5 6 7 8"; "1 9 10" is a throughput session, MW_GPU_MODELS its models):
#   1. the machine: GPU, driver, Python, MAX sees the accelerator
#   2. tiny.en's graphs for the GPU (`--warmup`: compiled in parallel processes, or loaded)
#   3. the Quick start sample and the long clip transcribed on the GPU, tokens against the CPU's
#   4. device graphs: replayed steps against launched ones (test_kvcache), and tiny.en's step
#      times both ways (scaling.json)
#   5. the kernel op tests on the GPU, then tests/attention_gpu_check.mojo (built by pack.sh)
#   6. tiny.en parity with openai-whisper on the GPU (test_parity.TinyEnParityTest), its beam
#      and word-timing graphs compiled first, at once; then batches of audios (transcribe_batch,
#      transcribe_each, prompts of different lengths left-padded) and the server's scheduler,
#      against one audio at a time
#   7. random-weight parity with openai-whisper at tiny.en and large-v3-turbo shapes
#   8. a bfloat16 model's encoder on the GPU (test_precision's test_encoder_products_in_bfloat16)
#   9. step times at the throughput models' shapes, bfloat16, both ways (scaling-models.json)
#  10. bench.py throughput: random large-v3-turbo and large-v3 against transformers and
#      openai-whisper, batches 1-64, bfloat16 (throughput.json)
#  11. the graph store, as graphs.tar.xz.N pieces of 15 MiB
# $OUT gets results.md (a table of the steps, the token comparison), log.txt and the pieces.
# MW_GPU_DRY=1 runs the same steps on this CPU with this checkout's .venv (a rehearsal).
set -uo pipefail
cd "$(dirname "$0")/../.."
W=${MW_GPU_WORK:-/tmp/mwgpu}
OUT=${OUT:-$W/out}
case "${1:-}" in
  stage) mkdir -p "$W/parts" && cp .gpu/p*/part.* "$W/parts/" && ls -l "$W/parts"; exit ;;
  check) ;;
  *) echo "usage: $0 stage|check" >&2; exit 2 ;;
esac

deadline=$(( $(date +%s) + ${MW_GPU_SECONDS:-540} ))
mkdir -p "$OUT" "$W/graphs"
exec > >(tee -a "$OUT/log.txt") 2>&1
results=$OUT/results.md
echo "| step | result | seconds |" > "$results"
echo "| --- | --- | --- |" >> "$results"

# xz, or Python's lzma where the image lacks xz
unxz() {
  if command -v xz >/dev/null; then xz -dc; else python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)'; fi
}
toxz() {
  if command -v xz >/dev/null; then xz -6 -T0; else python3 -c 'import lzma, shutil, sys; f = lzma.open(sys.stdout.buffer, "w", preset=6); shutil.copyfileobj(sys.stdin.buffer, f); f.close()'; fi
}

# step NAME LIMIT COMMAND...: run it within LIMIT seconds and what is left of the budget
# (when MW_GPU_STEPS names its number)
step() {
  local name=$1 limit=$2 left start rc
  shift 2
  case " ${MW_GPU_STEPS:-1 2 3 4 5 6 7 8} " in *" ${name%%.*} "*) ;; *) return ;; esac
  left=$(( deadline - $(date +%s) - 45 ))               # 45 s kept for the graph store
  if [ "$left" -lt 30 ]; then
    echo "| $name | skipped: the call's time is spent | |" >> "$results"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (at most $limit s)"
  start=$(date +%s)
  timeout -k 10 "$limit" "$@"
  rc=$?
  local verdict="ok"
  [ "$rc" = 124 ] && verdict="timed out after $limit s"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && verdict="failed (exit $rc)"
  echo "| $name | $verdict | $(( $(date +%s) - start )) |" >> "$results"
}

P=$W/payload
if [ ! -d "$P/site" ]; then
  start=$(date +%s)
  mkdir -p "$P"
  if cat "$W"/parts/part.* | unxz | tar -x -C "$P"; then verdict=ok; else verdict="failed: are all the pieces staged?"; fi
  echo "| unpack the pieces | $verdict | $(( $(date +%s) - start )) |" >> "$results"
fi
if [ "${MW_GPU_DRY:-}" = 1 ]; then         # this checkout's .venv instead of the carried packages
  PY=$PWD/.venv/bin/python DEVICE=cpu DTYPE=float32 BATCH=${MW_GPU_BATCH:-1,2} MODELS=${MW_GPU_MODELS:-tiny.en}
else
  PY=python3 DEVICE=gpu DTYPE=bfloat16 BATCH=${MW_GPU_BATCH:-1,8,16,32,64} MODELS=${MW_GPU_MODELS:-large-v3-turbo,large-v3}
  export PYTHONPATH="$P/site"
fi
export PYTHONUNBUFFERED=1 MODULAR_CACHE_DIR="$W/modular" MAXWHISPER_GRAPH_CACHE="$W/graphs" \
       XDG_CACHE_HOME="$W/cache" MW_TEST_LONG_CLIP="$P/long.wav" MW_TEST_DEVICE=$DEVICE
if ls "$P"/graphs/graphs.tar.xz.* >/dev/null 2>&1; then
  cat "$P"/graphs/graphs.tar.xz.* | unxz | tar -x -C "$W/graphs" && echo "graphs carried in: $(ls "$W/graphs" | wc -l) files"
fi

step "1. the machine" 60 sh -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null;
  $PY -c 'import sys, max.driver as d; print(sys.version.split()[0], \"accelerators:\", d.accelerator_count())'"
step "2. tiny.en graphs (--warmup)" 420 "$PY" -m maxwhisper --model tiny.en --device "$DEVICE" --warmup
sample=$("$PY" -c 'import pytest_audioeval as p; print(p.__path__[0])')/samples/audio/en/quick_brown_fox.wav
step "3. transcripts on the $DEVICE" 120 "$PY" -m maxwhisper "$sample" "$P/long.wav" --model tiny.en \
  --device "$DEVICE" --temperature 0 --temperature_increment_on_fallback none \
  --output_format json --output_dir "$W/transcripts"
[ -d "$W/transcripts" ] && "$PY" - "$P/expected" "$W/transcripts" >> "$results" <<'PYEOF'
import json, sys
from pathlib import Path
for want in sorted(Path(sys.argv[1]).glob("*.json")):
    got = Path(sys.argv[2]) / want.name
    if not got.exists():
        print(f"| {want.stem} | no transcript | |")
        continue
    a, b = (json.loads(p.read_text()) for p in (want, got))
    ta, tb = ([t for s in r["segments"] for t in s["tokens"]] for r in (a, b))
    first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None if len(ta) == len(tb) else min(len(ta), len(tb)))
    verdict = "the CPU's tokens" if first is None else f"differs from the CPU's at token {first} of {len(ta)}"
    print(f"| {want.stem}: {len(tb)} tokens | {verdict}: {b['text'][:70]!r} | |")
PYEOF
# step times: random weights of the shapes, the kernel step, batch 1 and 8, replayed and launched
SCALING="bench.py scaling --weights random --device $DEVICE --kernels on --device-graphs both"
SCALING="$SCALING --batch 1,8 --positions 10,100,400 --steps 20"
# shellcheck disable=SC2086
step "4. device graphs: replays against launches, tiny.en step times" 300 sh -c "$PY -m unittest discover \
  -s tests -p test_kvcache.py; rc=\$?; $PY $SCALING --model tiny.en --json '$OUT/scaling.json' || exit 1; exit \$rc"
# then the ops' standalone check: errors against float64, and µs per call of each op and of the
# split-key candidate for few rows (a batch-1 step's cross-attention), beside the op
CHECK="LD_LIBRARY_PATH='$P/site/modular/lib' '$P/attention_gpu_check'"
[ "$DEVICE" = gpu ] || CHECK=true                        # a CPU has nothing to run it on
step "5. kernel op tests" 240 sh -c "$PY -m unittest discover -s tests -p test_kernels.py; rc=\$?
  $CHECK || exit 1; exit \$rc"
# beam search's and word timing's graphs first, compiled at once (with cold caches, in turn
# they would take most of the step's limit)
step "6. tiny.en parity with openai-whisper, batches, the server" 420 sh -c "$PY -m maxwhisper --model tiny.en \
  --device $DEVICE --warmup --beam_size 5 --word_timestamps True || exit 1; rc=0
  $PY -m unittest discover -s tests -p test_parity.py -k TinyEnParityTest || rc=1
  $PY -m unittest discover -s tests -p test_transcribe.py -k TranscribeBatchTest -k PaddedPromptsTest -k ChunkedTest || rc=1
  $PY -m unittest discover -s tests -p test_server.py -k test_batched_concurrent -k test_a_failing -k test_chunking || rc=1
  exit \$rc"
step "7. random-weight parity, tiny.en and large-v3-turbo shapes" 600 "$PY" -m unittest discover -s tests \
  -p test_checkpoints.py -k test_tiny_en -k test_large_v3_turbo_and_its_transcript
step "8. bfloat16 encoder" 240 "$PY" -m unittest discover -s tests -p test_precision.py -k test_encoder_products_in_bfloat16
# shellcheck disable=SC2086
step "9. step times at $MODELS shapes" 300 "$PY" $SCALING --model "$MODELS" --dtype "$DTYPE" \
  --json "$OUT/scaling-models.json"
step "10. throughput against transformers and openai-whisper" 570 "$PY" bench.py throughput --model "$MODELS" \
  --device "$DEVICE" --dtype "$DTYPE" --batch "$BATCH" --engines "${MW_GPU_ENGINES:-maxwhisper,transformers,openai}" \
  --windows 8 --tokens 100 --repeats 2 --json "$OUT/throughput.json"

[ -d "$W/transcripts" ] && tar -C "$W" -cf "$OUT/transcripts.tar" transcripts
start=$(date +%s)                          # whatever the budget: the next run needs no compile
# the compiled graphs and their compile times, oldest first (tiny.en's), not the weight images
graphs=$(cd "$W/graphs" && ls -tr -- *.mef compile-seconds.json 2>/dev/null)
# shellcheck disable=SC2086
if (cd "$W/graphs" && tar -cf - $graphs) | toxz | split -b 15M -d -a 1 - "$OUT/graphs.tar.xz."; then
  verdict="ok: $(echo "$graphs" | grep -c mef) graphs"
else
  verdict=failed
fi
# $OUT returns 8 files: the pieces are what the others leave (the first graphs whole)
keep=$(( 8 - $(find "$OUT" -maxdepth 1 -type f ! -name 'graphs.tar.xz.*' | wc -l) ))
for piece in "$OUT"/graphs.tar.xz.*; do
  [ -e "$piece" ] && [ "${piece##*.}" -ge "$keep" ] && rm "$piece" && verdict="cut to $keep pieces of 15 MiB"
done
echo "| 11. the graph store out | $verdict | $(( $(date +%s) - start )) |" >> "$results"
cat "$results"
