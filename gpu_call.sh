#!/usr/bin/env bash
# temporary: one device call, two GPUs: variant A (this tree) on GPU 0, variant B (alt/) on GPU 1
export PYTHONUNBUFFERED=1
ROOT=$OUT
mkdir -p $ROOT/g0 $ROOT/g1
run() {  # $1 gpu, $2 pythonpath
  export CUDA_VISIBLE_DEVICES=$1 OUT=$ROOT/g$1 PYTHONPATH=$2
  timeout 200 python -m retro_compile.bench op --out $OUT/bench_op_h200.json > $OUT/bench_op.log 2>&1
  timeout 170 python scripts/tune_stages.py --stages attend --shapes 1x8192 1x131072 8x131072 --out $OUT/tune_attend.json > $OUT/tune_attend.log 2>&1
  if [ $1 = 0 ]; then
    timeout 150 python scripts/tune_stages.py --stages select --shapes 4x131072 8x65536 8x131072 --out $OUT/tune_select.json > $OUT/tune_select.log 2>&1
  fi
  echo g$1 done
}
run 0 $PWD > $ROOT/g0.log 2>&1 &
run 1 $PWD/alt > $ROOT/g1.log 2>&1 &
wait
for g in 0 1; do python - $ROOT/g$g <<'P'
import json,sys
d=json.load(open(sys.argv[1]+'/bench_op_h200.json'))
print(sys.argv[1])
for r in d['results']:
    print({k:(round(v,1) if isinstance(v,float) else v) for k,v in r.items() if k in('batch','context') or k in ('quest_us','quest_layer_us','retro_w2_us','retro_w2_layer_us','stage_select_us','stage_attend_us')})
P
grep "B=" $ROOT/g$g/tune_*.log | sed 's/.*INFO//' ; done
rm -f $ROOT/g*/*.png
