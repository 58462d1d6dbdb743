#!/usr/bin/env bash
# The device check of a session lent a GPU (../shared/GPU.md), as one call well inside its
# 10 minutes: the CUDA tests (every rule and preset trains in fp32 and bf16-mixed; a GPU run
# audited on the CPU gives the same report), the README's ladder table with 12 runs at a
# time, then every rule's step against its reference loop and the batched passes (make bench).
# RUN picks the parts (default tests,bench: the ladder table is already measured; all three
# take ~13 min, over one call's 10). Everything it reports lands in $OUT. Needs the
# hydra/omegaconf/antlr wheels in .whl/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/scripts PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
want() { [[ ",${RUN:-tests,bench}," == *",$1,"* ]]; }
want tests && timeout "${CUDA_TESTS_S:-170}" python3 -m pytest -q -p no:cacheprovider -n 6 tests/test_cuda.py \
  2>&1 | tail -n 30 | tee "$OUT/cuda_tests.txt"
want ladder && timeout "${LADDER_S:-360}" python3 scripts/ladder_credit.py --jobs "${JOBS:-12}" --device cuda \
  --epochs 4 --out "$OUT/ladder_credit" --runs /tmp/ladder_runs 2>&1 | tail -n 45
# make bench DEVICE=cuda's two scripts (their tables go into the README: --render-only there)
want bench && timeout "${BENCH_S:-300}" python3 scripts/bench.py --device cuda --steps 100 --protocol-repeats 1 \
  --out "$OUT/bench_cuda" 2>&1 | tail -n 40
want bench && timeout 60 python3 scripts/bench_batched.py --device cuda --out "$OUT/bench_batched_cuda" 2>&1 | tail -n 12
want ladder && tar czf "$OUT/ladder_runs.tgz" -C /tmp ladder_runs 2>/dev/null
ls -la "$OUT"
