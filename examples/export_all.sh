#!/usr/bin/env bash
# Grow every example on its embedded data and export it for deployment into exported_models/:
#   bash examples/export_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
growc grow examples/digits_mlp.py --quiet
growc export exported_models/digits_mlp/model.safetensors --int8 static
growc grow examples/digits_cnn.py --quiet
growc export exported_models/digits_cnn/model.safetensors --int8 static --data examples/digits_cnn.py
