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
