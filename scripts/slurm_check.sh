#!/usr/bin/env bash
# On a real SLURM cluster: does launch/slurm.sbatch survive a plain `scancel` (what a
# pre-emption sends too) with every ensemble checkpointed, and does the resubmitted job end
# bit-identical to an uninterrupted one? Three jobs: a sweep cancelled mid-training, its
# resubmission, and an uninterrupted reference; then the dictionaries are compared.
#
#   bash scripts/slurm_check.sh /scratch/$USER/slurm-check [sbatch options, e.g. -p debug]
#
# Needs the project's venv (SWEEP_VENV, default ./.venv) on the nodes and a folder they share.
# About 10 minutes on two CPU cores; the sbatch options default to one node, 2 CPUs, no GPU.
set -euo pipefail
dir=$(realpath -m "${1:?a folder the nodes share}")
shift
opts=("$@")
[ ${#opts[@]} -gt 0 ] || opts=(--nodes=1 --cpus-per-task=2 --gpus-per-node=0 --time=30)
script=$(dirname "$0")/../launch/slurm.sbatch
args=(data=synthetic data.width=128 data.rows=3000000 'grid.l1=[1e-2,3e-2]' 'grid.dict_ratio=[16,4]')
mkdir -p "$dir"
rm -rf "$dir/cancelled" "$dir/reference"

submit() {  # submit NAME: the job id
  sbatch --parsable "${opts[@]}" --output="$dir/%j.out" "$script" sweep_dir="$dir/$1" "${args[@]}"
}
wait_job() { while squeue -h -j "$1" 2>/dev/null | grep -q .; do sleep 5; done; }
trained() { cat "$dir/cancelled"/runs/r16-*/metrics.jsonl 2>/dev/null | wc -l; }

job=$(submit cancelled)
echo "job $job: training, then a plain scancel"
until [ "$(trained)" -ge 20 ]; do
  squeue -h -j "$job" | grep -q . || { echo "job $job ended before training (see $dir/$job.out)"; exit 1; }
  sleep 5
done
scancel "$job"
wait_job "$job"
grep -E "interrupted|did not checkpoint" "$dir/$job.out" || true
job=$(submit cancelled)
ref=$(submit reference)
echo "jobs $job (resumed) and $ref (uninterrupted): waiting"
wait_job "$job"
wait_job "$ref"
same=0
for run in "$dir"/reference/runs/*/; do
  name=$(basename "$run")
  if cmp -s "$run/sae.safetensors" "$dir/cancelled/runs/$name/sae.safetensors"; then
    echo "$name: bit-identical"
    same=$((same + 1))
  else
    echo "$name: DIFFERS (or missing)"
  fi
done
[ "$same" = 4 ] && echo "OK: cancelled, resumed, identical" || { echo "FAILED"; exit 1; }
