#!/usr/bin/env bash
# The wheels an offline GPU machine with transformers 5.17 (torch 2.11, huggingface_hub 1.33, no datasets) needs
# for ka_hf and benchmarks/gpu_check.py, for Python 3.12 on x86-64 (docs/benchmarks.md, "GPU check").
#     tools/gpu_wheels.sh DIR                 # here, with network access
#     python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
dir=${1:?usage: tools/gpu_wheels.sh DIR}
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" \
    transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 hf_xet==1.8.0 \
    kernels==0.19.1 tomlkit==0.15.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls "$dir"
