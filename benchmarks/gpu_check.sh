#!/usr/bin/env bash
# The GPU check: one command, ≤ 8 minutes on one H100/H200, figures in OUTDIR (≤ 8 files).
#
#   bash benchmarks/gpu_check.sh OUTDIR          # on the GPU machine (the device tool: carry [".whl"])
#   bash benchmarks/gpu_check.sh OUTDIR --cpu    # the same steps on a CPU with the tiny pipeline
#
# What it runs, each step's output in OUTDIR/gpu_check.log, a failed step recorded and the
# next one run all the same:
#   1. benchmarks/gpu_rollout.py: our sampler vs diffusers' loop on an SD3.5-medium-sized
#      transformer (512 px, bf16, 10 steps, CFG 4.5; batches 1 4 16) and the LoRA r32 learner
#      step (the project's default targets) at micro-batch 1 2 4: images/s, samples/s, peak
#      memory, MFU → OUTDIR/rollout.json (CPU: --tiny);
#   2. `fmrl make-random-sd3 --size medium` into /tmp (5.4 GB: made here, too large to carry;
#      CPU: --size tiny), then benchmarks/gpu_e2e.py: 4 iterations of rollout → reward →
#      learner update → publish/apply with the project's Sampler, RewardStage and Learner in one
#      process, no Ray (CPU: --cpu, 2 iterations) → OUTDIR/e2e.json;
#   3. benchmarks/memory_plan.py --measured: the plan's estimates beside the measured peaks
#      → OUTDIR/memory_plan.md;
#   4. OUTDIR/gpu_check.json: device, versions, every step's status and seconds, and steps 1-3's figures.
#
# The GPU image has torch, transformers, peft, safetensors, huggingface-hub, pyyaml, pillow but
# not diffusers nor pydantic: they travel as wheels in .whl/ (git-ignored), made here once with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing-extensions==4.16.0
# (the versions in .venv; 9.2 MB) and installed below with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# The project itself is not pip-installed: PYTHONPATH holds the repository root.
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [--cpu]}
MODE=${2:-gpu}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
STEPS=$OUT/.steps.tsv  # step, status, seconds (folded into gpu_check.json, then removed)
: >"$LOG"
: >"$STEPS"
PY=${PYTHON:-python3}
[ "$MODE" = "--cpu" ] && [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

step() {  # step NAME COMMAND...: run it, its output to the log (and stdout), its status and time recorded
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STEPS"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  return 0
}

if [ "$MODE" != "--cpu" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  step install "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$ROOT"/.whl/*.whl
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
cd "$ROOT" || exit 1
step versions "$PY" -c "import sys, torch, transformers, peft, diffusers, pydantic; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, \
'diffusers', diffusers.__version__, 'pydantic', pydantic.__version__); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
[ "$MODE" != "--cpu" ] && step nvidia-smi nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

PIPE=/tmp/fmrl-gpu-check-sd3
rm -rf "$PIPE"
if [ "$MODE" = "--cpu" ]; then
  step rollout "$PY" benchmarks/gpu_rollout.py --tiny --parts sampler diffusers learner --repeats 1 \
    --lora-targets to_q to_k to_v to_out.0 --results "$OUT/rollout.json"
  step make "$PY" -m services.cli make-random-sd3 --size tiny --out "$PIPE"
  step e2e "$PY" benchmarks/gpu_e2e.py --cpu --pipeline "$PIPE" --results "$OUT/e2e.json"
else
  step rollout timeout 200 "$PY" benchmarks/gpu_rollout.py --parts sampler diffusers learner --batches 1 4 16 \
    --learner-batches 1 2 4 --repeats 3 --lora-targets to_q to_k to_v to_out.0 --results "$OUT/rollout.json"
  step make timeout 120 "$PY" -m services.cli make-random-sd3 --size medium --out "$PIPE"
  step e2e timeout 150 "$PY" benchmarks/gpu_e2e.py --pipeline "$PIPE" --results "$OUT/e2e.json"
fi
rm -rf "$PIPE"

# gpu_check.json first (the plan reads the measured learner peaks from it), then the plan beside them
fold() {
  "$PY" - "$OUT" "$STEPS" <<'EOF'
import json, platform, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), Path(sys.argv[2])
import torch
data = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "steps": [{"step": s, "exit": int(rc), "seconds": int(sec)}
                  for s, rc, sec in (ln.split("\t") for ln in steps.read_text().splitlines())]}
for key, name in (("rollout", "rollout.json"), ("e2e", "e2e.json"), ("memory_plan", "memory_plan.json")):
    f = out / name
    data[key] = json.loads(f.read_text()) if f.is_file() else None
try:
    import diffusers
    data["diffusers"] = diffusers.__version__
except ImportError:
    data["diffusers"] = None
(out / "gpu_check.json").write_text(json.dumps(data, indent=1) + "\n")
print(f"wrote {out / 'gpu_check.json'}: " + ", ".join(f"{s['step']} exit {s['exit']} ({s['seconds']} s)" for s in data["steps"]))
EOF
}
fold
step memory_plan bash -c "'$PY' benchmarks/memory_plan.py --measured '$OUT/gpu_check.json' --json '$OUT/memory_plan.json' >'$OUT/memory_plan.md'; rc=\$?; cat '$OUT/memory_plan.md'; exit \$rc"
fold | tee -a "$LOG"
rm -f "$STEPS" "$OUT/memory_plan.json"  # folded into gpu_check.json
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
