#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages named as arguments when they are missing.
# Uses apt-get directly as root, through sudo otherwise. Says what it does.
set -euo pipefail

missing=()
for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "[setup] system packages present: $*"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] missing system packages: ${missing[*]}" >&2
    echo "[setup] this is not a Debian/Ubuntu system (no apt-get): install the equivalents of those packages by hand, then re-run." >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
    echo "[setup] using sudo to install system packages"
else
    echo "[setup] missing system packages: ${missing[*]}; run as root or install sudo" >&2
    exit 1
fi

echo "[setup] installing missing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "[setup] installed: ${missing[*]}"
