#!/usr/bin/env bash
# The exact commands that produced the weights shipped in src/exitwise/weights/.
# Run from the repository root with exitwise installed; CIFAR-10 path as the first argument.
set -euo pipefail
cifar=${1:-../shared/data/cifar10-jpg.tar.gz}
ship() { cp "$1/model.safetensors" "src/exitwise/weights/$2.safetensors"; cp "$1/model.json" "src/exitwise/weights/$2.json"; }

# digits-convnet: the `make demo` model (scikit-learn digits, 30 epochs, about 20 s on 2 CPU cores)
exitwise train --dataset digits --model digits-convnet --out runs/digits-convnet
ship runs/digits-convnet digits-convnet
