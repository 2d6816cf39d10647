#!/usr/bin/env bash
# The GPU checks and figures of one short GPU lease, in one call (about 5 minutes on one H100/H200):
#   1. the CUDA tests (graph replays against eager and float32, a server on CUDA);
#   2. the model alone on the standard mix (packed, varlen attention) and one 32-token sequence
#      eager vs a replayed CUDA graph;
#   3. the served benchmark (--quick phases), clients sending text, then token ids (which takes
#      the server's tokenizer out of the path);
#   4. ab-ids, ab-text: the served phases of bench_ab.py (one-text clients, 64-text requests from
#      16 and 64 clients, one request at a time, the bare gRPC round trip), clients sending ids or
#      text; where BEFORE names a folder holding the server/ and client/ of another version (say,
#      `git archive REV server client | tar -x -C DIR`), a server of that version side by side.
# STEPS picks some of: tests model text ids ab-ids ab-text (default: tests model ab-ids ab-text).
# Results and logs go to bench/results/gpu, and as one gpu-results.tar.gz into $OUT when that is
# set (the device tool brings back few files). DEVICE=cpu SIZE=tiny dry-runs it on a CPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
RESULTS=bench/results/gpu
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-large}
PY=${PYTHON:-python3}
STEPS=${STEPS:-tests model ab-ids ab-text}
rm -rf "$RESULTS"; mkdir -p "$RESULTS"
export PYTHONPATH=$PWD/server:$PWD/client${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

step() { echo; echo "=== $* ($(date +%T))"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
# Results so far go back after every step, so a cut-short lease still returns them.
save() { if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu-results.tar.gz" -C bench/results gpu; fi; }
served() {  # NAME INPUTS [server flags]
  local name=$1 inputs=$2; shift 2
  step "served: random:$SIZE bfloat16, clients send $inputs ${*:-}"
  timeout 170 $PY bench/bench_server.py --quick --model "random:$SIZE" --device "$DEVICE" \
    --dtype bfloat16 --bulk-concurrency 16 --sweep 1,16,64 --inputs "$inputs" \
    ${1:+--server-arg "$*"} --out-dir "$RESULTS/$name" 2>&1 \
    | tee "$RESULTS/server-$name.txt" | grep -v ' INFO '
  save
}

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$RESULTS/gpu.txt"
$PY -c 'import torch, grpc, google.protobuf as pb; print("torch", torch.__version__, "grpc", grpc.__version__, "protobuf", pb.__version__, "cuda", torch.cuda.is_available())'

if want tests; then
  step "CUDA tests and tokenizer processes"
  timeout 150 $PY -m pytest -q -ra -p no:cacheprovider tests/test_cuda_graphs.py \
    tests/test_tokenize_workers.py 2>&1 | tee "$RESULTS/pytest.txt" | tail -15
  save
fi

if want model; then
  step "model alone: random:$SIZE bfloat16, standard mix, batches <= 16384 tokens"
  timeout 120 $PY bench/bench_model.py --device "$DEVICE" --size "$SIZE" --dtypes bfloat16 \
    --budget 16384 --ceiling 128x128 --seconds 15 --out "$RESULTS/model.json" 2>&1 \
    | tee "$RESULTS/model.txt" | grep -v ' INFO '
  save
fi

ab() {  # INPUTS PHASES CONFIG...
  local inputs=$1 phases=$2; shift 2
  local configs=()
  if [ -n "${BEFORE:-}" ]; then
    configs+=(--config "before=PYTHONPATH=$BEFORE/server:$BEFORE/client:$PYTHONPATH")
  fi
  for c in "$@"; do configs+=(--config "$c"); done
  step "configurations side by side: random:$SIZE bfloat16, clients send $inputs"
  timeout 240 $PY bench/bench_ab.py --model "random:$SIZE" --device "$DEVICE" --dtype bfloat16 \
    --inputs "$inputs" --phases "$phases" --rounds 2 --seconds 4 "${configs[@]}" \
    --out "$RESULTS/ab-$inputs.json" 2>&1 | tee "$RESULTS/ab-$inputs.txt" | grep -v ' INFO '
  save
}

want text && served text text
want ids && served ids ids
want ab-ids && ab ids b,c16,c64,e,f "now="
want ab-text && ab text b,c16,c64 "now="
step done
