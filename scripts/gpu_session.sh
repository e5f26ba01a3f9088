#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in two device calls that fit one session's
# device time (15 min, cold start included). Here, once:  bash ../shared/device/prepare.sh
# Then, with the device tool (carry [".devenv"], timeout_s 590), one right after the other:
#   source .devenv/setup.sh; bash scripts/gpu_session.sh 1 $OUT   # CUDA tests + step vs chip
#   source .devenv/setup.sh; bash scripts/gpu_session.sh 2 $OUT   # end to end, stream, TopK
# Logs and JSON land in $OUT (8 files at most come back); each step has its own time limit, so
# one that hangs or fails leaves the others' results.
set -u
part=${1:?part 1 or 2}
out=${2:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s) =="
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - t0)) s"
  tail -n 25 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if [ "$part" = 1 ]; then
  step gpu_tests 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
  step peak 330 python3 scripts/bench.py --device cuda --sections 8 --json "$out/peak.json"
else
  export SWEEP_E2E_SHARES=${SWEEP_E2E_SHARES:-auto,1}
  step e2e 330 python3 scripts/bench.py --device cuda --sections 6 --json "$out/e2e.json"
  step feed_topk 200 python3 scripts/bench.py --device cuda --sections 3,7 --json "$out/feed.json"
fi
