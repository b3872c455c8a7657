#!/usr/bin/env bash
# The exact commands that produced the weights shipped in src/exitwise/weights/.
# Run from the repository root with exitwise installed; CIFAR-10 path as the first argument.
set -euo pipefail
cifar=${1:-../shared/data/cifar10-jpg.tar.gz}

# digits-convnet: the `make demo` model (scikit-learn digits, 30 epochs, about 20 s on 2 CPU cores)
exitwise train --dataset digits --model digits-convnet --out runs/digits-convnet
python scripts/ship_weights.py runs/digits-convnet digits-convnet

# seed-branchynet: the founding architecture trained by exitwise on CIFAR-10 train (45k; 5k held out)
exitwise train --dataset cifar10 --data-dir "$cifar" --model seed-branchynet --epochs 50 --lr 0.05 \
    --out runs/seed-branchynet
python scripts/ship_weights.py runs/seed-branchynet seed-branchynet --check-data "$cifar"

# b-resnet11: a residual network with three side exits (64 epochs with cutout, about 100 minutes on 2 CPU cores)
exitwise train --dataset cifar10 --data-dir "$cifar" --model b-resnet11 --epochs 64 --cutout 8 --out runs/b-resnet11
# stored as float16 (per-exit test accuracy within 0.03 points of the model card's) in two shards, each under 8 MiB
python scripts/ship_weights.py runs/b-resnet11 b-resnet11 --float16 --check-data "$cifar"

# b-resnet11-large: ResNet-9's widths with three side exits, the 91% model (45 epochs with cutout, about 2 hours
# on 2 CPU cores); float16 in four shards, each under 8 MiB
exitwise train --dataset cifar10 --data-dir "$cifar" --model b-resnet11-large --epochs 45 --cutout 8 \
    --out runs/b-resnet11-large
python scripts/ship_weights.py runs/b-resnet11-large b-resnet11-large --float16 --check-data "$cifar"

# each CIFAR card's `calibrated` setting (what `exitwise serve --model NAME` serves): a study of the shipped weights
for name in seed-branchynet b-resnet11 b-resnet11-large; do
    exitwise study --dataset cifar10 --data-dir "$cifar" --model "$name" --out "runs/$name-study"
    python scripts/card_calibrated.py "runs/$name-study"
done
