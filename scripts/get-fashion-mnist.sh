#!/usr/bin/env bash
# Install Debian's Fashion-MNIST (IDX files under /usr/share/datasets/fashion-mnist) where apt is available.
# Exits 0 when the data is present afterwards, 1 when it could not be installed.
set -u
dir=/usr/share/datasets/fashion-mnist
present() { [ -e "$dir/t10k-labels-idx1-ubyte.gz" ] || [ -e "$dir/t10k-labels-idx1-ubyte" ]; }
present && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "get-fashion-mnist: no apt-get here; put the four Fashion-MNIST IDX files in a directory and pass it" \
       "with --data-dir" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo -n"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
  || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }
if present; then
  echo "get-fashion-mnist: installed Debian's dataset-fashion-mnist into $dir"
  exit 0
fi
echo "get-fashion-mnist: could not install dataset-fashion-mnist (try: sudo apt-get install dataset-fashion-mnist)" >&2
exit 1
