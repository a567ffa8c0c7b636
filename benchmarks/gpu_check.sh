#!/usr/bin/env bash
# One short GPU session: correctness on CUDA, the examples with --device cuda, and the GPU
# benchmarks. Expects the data files in .devdata/ (git-ignored) and writes to $OUT.
# Usage on the GPU machine: OUT=/some/folder bash benchmarks/gpu_check.sh
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
timeout 100 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_growth_math.py tests/test_conv_sites.py tests/test_depth.py 2>&1 | tail -4
for example in digits_mlp digits_cnn; do
  timeout 50 python -m growc grow "examples/$example.py" --device cuda --quiet --out "$OUT/$example" 2>&1 | tail -2
done
timeout 120 python -m benchmarks overhead --device cuda --data-dir .devdata --out "$OUT" 2>&1 | tail -12
timeout 180 python -m benchmarks mnist-mlp --device cuda --data-dir .devdata --out "$OUT" --large-epochs 5 2>&1 | tail -22
