#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, ordered by what matters most, in three parts
# sized for the device time a session gets (15 min: a cold start of 1-2 min, then one call of
# at most 10 min; later sessions run the parts an earlier one did not reach).
# Here, once:  bash ../shared/device/prepare.sh
# Then the device tool, carry [".devenv"], timeout_s 590:
#   source .devenv/setup.sh; bash scripts/gpu_session.sh main $OUT
# and, if device time is left, at once (the machine stays warm ~30 s), timeout_s <= the rest:
#   source .devenv/setup.sh; bash scripts/gpu_session.sh extra $OUT
# then, in a later call or session, `rest`.
# Each step has its own time limit, so one that hangs or fails leaves the others' results;
# logs and JSON land in $OUT (8 files at most come back).
set -u
part=${1:?main, extra or rest}
out=${2:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s) =="
  local t0=$SECONDS
  timeout -k 20 "$limit" "$@" >"$out/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - t0)) s"
  tail -n 30 "$out/$name.log"
}
tests() {  # tests NAME SECONDS -k EXPR (-v: names stream to the log, so a kill keeps them)
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py \
    tests/test_synthetic.py --timeout=200 -rfE --tb=short --durations=10 "$@"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
data="stream or cuda_generation"
steps="compiled or bf16 or fp32 or every_architecture or resume_is_bit_identical"
bench="python3 scripts/bench.py --device cuda"
tied="[tied or -tied-"  # (sae=tied's test ids, not untied's: -k matches substrings)
notied="not [tied and not -tied-"
if [ "$part" = main ]; then  # ~570 s of limits (+20 s grace each), plus setup.sh
  # first what decides the default: the compiled step's resumes (4 expected to XPASS: two
  # compiles from nothing, the worker with and without CUDA graphs; cold, so ~10 compiles)
  resume="fresh_compile or resume_is_bit_identical"
  tests resume_tests 160 -k "$resume"
  xpass=$(grep -c "XPASS" "$out/resume_tests.log")
  if [ "$xpass" -ge 4 ] && ! grep -q "XFAIL\|FAILED\|ERROR" "$out/resume_tests.log"; then
    # the 20M rows: ~4900 steps per ensemble, checkpoints every 500 (at 8M rows and
    # compiled the sweep took 84 s of wall time in session 26), as the default-to-be runs it:
    # compiled, replayed as CUDA graphs
    echo "   all $xpass compiled resume tests passed: e2e with train.compile=true"
    SWEEP_E2E_COMPILE=true SWEEP_E2E_ROWS=20000000 SWEEP_E2E_SHARES=auto step e2e 200 \
      $bench --sections 6 --json "$out/e2e.json"
  else  # narrow down why a compiled run does not resume exactly (the telling variants first)
    echo "   $xpass compiled resume tests passed: diagnose instead of the e2e"
    step diagnose 110 python3 scripts/diagnose_compile.py
  fi
  # its bf16 copies, CUDA graphs == the compiled step, every architecture: ~20 compiles
  # (Matryoshka's, asked by no issue, run at the end of `extra`)
  tests step_tests 130 -k "($steps) and not ($resume) and not matryoshka and not gated and $notied"
  tests memory_tests 80 -k "memory_model and not matryoshka and not gated and $notied"  # 8 compiles (4 under graphs)
elif [ "$part" = extra ]; then  # in order of what the issues still lack; the call's limit cuts the tail
  step feed 60 $bench --sections 3  # issue 9's generator, then feed (figures in its log)
  # issue 10's targets, held by the graphed step (sizes print as measured: a cut keeps them)
  SWEEP_PEAK_SIZES=128x512,512x4096,768x24576,2304x18432 step peak 300 \
    $bench --quick --sections 8 --json "$out/peak.json"
  tests sweep_tests 180 -k "not ($data or $steps or memory_model or fresh_compile or own_learning)"
  step topk 70 $bench --quick --sections 7 --json "$out/topk.json"  # the eager default's
  step jrelu 60 python3 scripts/jumprelu_speed.py --device cuda  # tf32's cost for log
  tests data_tests 40 -k "$data"
  tests matryoshka_tests 120 -k "matryoshka"  # eager == singles, compiled == eager, memory
  tests lr_axis_tests 60 -k "own_learning"  # grid.lr: each member's rate, eager and compiled
  tests gated_tests 120 -k "gated"  # eager == singles, compiled == eager, bf16 copies, memory
  tests tied_tests 90 -k "$tied"  # its fast step: eager and compiled == singles, bf16 copies, memory
else  # rest: auto packing against fixed shares (issue 9)
  SWEEP_E2E_ROWS=2000000 SWEEP_E2E_RATIOS=4,8,16,32 SWEEP_E2E_SHARES=auto,0.25,0.5,1 \
    step packing 330 $bench --sections 6 --json "$out/packing.json"
fi
