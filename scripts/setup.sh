#!/usr/bin/env bash
# Installs what dp_jax needs on a Debian machine: the Fashion-MNIST package (the
# offline dataset of the default experiment and of the data tests) and the
# Python package with its test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dataset-fashion-mnist
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test]"
