#!/usr/bin/env bash
# Debian packages the test suite needs: Chromium (and a font for the page's text in its screenshots) for the browser
# viewer's end-to-end tests, and Mesa's EGL (llvmpipe) so that VTK renders headless without an X server. Installs
# only what is missing.
set -euo pipefail
packages=(chromium fonts-dejavu-core libegl1 libegl-mesa0 libgl1-mesa-dri)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "Installing Debian packages: ${missing[*]}"
log=$(mktemp)
if ! { $sudo apt-get update && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "could not install ${missing[*]}" >&2
    exit 1
fi
