#!/usr/bin/env bash
# Create .venv (if needed) with PyTorch 2.13.0 and MedAdvRobustness installed in editable mode with its test extras.
# pip's output goes to .venv/setup.log and is shown only if something fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
log=.venv/setup.log
install() {
    if ! .venv/bin/python -m pip install "$@" >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "setup failed: pip install $*" >&2
        exit 1
    fi
}
: >"$log"
echo "Setting up .venv (log: $log)"
install --upgrade pip
install "torch==2.13.0"
install -e ".[test]"
# Independent reference implementation for the attack tests; it needs no torchvision, so skip its pins.
install --no-deps "torchattacks==3.5.1"
# nnU-Net models: their networks come from dynamic-network-architectures (its U-Nets need neither timm nor
# torchvision, which would replace the CPU torch); nnunetv2 itself is the reference of the nnU-Net tests, with the
# dependencies its predictor imports.
install --no-deps "dynamic-network-architectures==0.4.4" "nnunetv2==2.8.1"
install "acvl-utils==0.2.6" "batchgenerators==0.25.5" "batchgeneratorsv2==0.3.6" SimpleITK scikit-image \
    scikit-learn pandas tqdm seaborn yacs einops blosc2 tifffile requests graphviz imagecodecs
install "torch==2.13.0"  # the pin again, should anything above have moved it
