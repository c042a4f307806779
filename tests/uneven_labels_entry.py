"""``bigtrain train`` whose training samples carry a loss on a varying number of tokens (leading
tokens masked with -100, a different count per sample), so micro-batches and ranks hold uneven label
counts: token-weighting and a mean of per-micro-batch means then give different gradients. Used by
tests/test_train.py's loss-normalisation test."""

import sys

import bigtrain.train as train_module
from bigtrain.cli import main

_build_data = train_module.build_data


def build_data(cfg, tokenizer, local_rank):
    data = _build_data(cfg, tokenizer, local_rank)
    labels = data.train.clone()
    seq = labels.shape[1]
    for i in range(labels.shape[0]):
        labels[i, :(i * 7) % (seq - 2)] = -100  # 0 .. seq-3 masked: 2 to seq labelled positions
    data.train_labels = labels
    return data


train_module.build_data = build_data

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
