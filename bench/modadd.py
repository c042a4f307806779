"""The modadd task: a + b mod 97 as 4-token samples, the spike benchmark's source of real loss spikes.

The low-loss Adam spike recipe of docs/design.md sec. 3 (modular addition, after the grokking
literature): a 1-layer transformer memorises the table, its loss falls to ~1e-3 and below, and Adam
then spikes 10-100x every ~50-100 steps with no bad data at all. It runs through bigtrain's own
trainer: ``register()`` adds the ``modadd`` data source and model preset, and ``bench/bench_entry.py``
calls it before handing over to bigtrain's CLI:

    python bench/bench_entry.py train model.preset=modadd data.source=modadd data.seq_len=4 ...

bigtrain does not ship this task: a product does not import its benchmark (it would then carry the
benchmark's code, data rules and presets in every install), so the task plugs into the seams bigtrain
offers (``bigtrain.data.register_source``, ``bigtrain.config.register_preset``).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import transformers

from bigtrain.config import register_preset
from bigtrain.data import LABEL, START, DataConfig, DocNames, PackedData, register_source

P = 97
EQ = P  # token id of "="; ids 0..96 are the numbers themselves
SEQ_LEN = 4
TRAIN_FRACTION = 0.5
"""Share of the 9,409 (a, b) pairs used for training; the rest is the eval set. 0.5 is the recipe's
value: half the table is enough to generalise, and the loss then falls low enough for Adam to spike."""
_VERSION = 2  # part of the data fingerprint: bump when the samples change

# The recipe's model (docs/design.md sec. 3): 1 layer, d=128, 4 heads, as a Llama.
PRESET = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=4)


def register() -> None:
    """Make ``data.source=modadd`` and ``model.preset=modadd`` valid (idempotent)."""
    register_source("modadd", build, check)
    register_preset("modadd", PRESET)


def check(cfg: DataConfig) -> None:
    """Each sample is [a, b, =, c]: exactly 4 tokens."""
    if cfg.seq_len != SEQ_LEN:
        raise ValueError(f"data.seq_len must be {SEQ_LEN} for data.source='modadd' (each sample is [a, b, =, c]), "
                         f"got {cfg.seq_len}: set data.seq_len={SEQ_LEN}")


def build(cfg: DataConfig, tokenizer: transformers.PreTrainedTokenizerBase, seed: int,
          tokenizer_dir: str | None = None, train_fraction: float = TRAIN_FRACTION) -> PackedData:
    """The a + b mod 97 table as 4-token samples [a, b, =, c], labels only on c. Built in memory from
    nothing, never cached (it takes milliseconds).

    Token ids are the numbers themselves (0..96) and 97 for "=", so any tokenizer with at least 98
    ids gives the model a large enough vocabulary (the byte-level default has 257); the text the
    ids would decode to is irrelevant. The split is a permutation of the 9,409 pairs seeded by
    ``seed`` (``train.seed``; the research script fixed it at 0). Sample id k of train is the k-th
    pair of that permutation; doc_names name every pair ("modadd:12+40"), train pairs first.
    """
    if len(tokenizer) < EQ + 1:
        raise ValueError(
            f"data.source='modadd' needs token ids 0..{EQ}, but the tokenizer has only "
            f"{len(tokenizer)}: use the built-in tokenizer (model.path=null)"
        )
    n_train = round(train_fraction * P * P)
    if not 1 <= n_train < P * P:
        raise ValueError(f"train_fraction must leave at least one pair in train and in eval, got {train_fraction}")
    a = np.arange(P).repeat(P)  # pair i is (i // P, i % P)
    b = np.tile(np.arange(P), P)
    tokens = np.stack([a, b, np.full_like(a, EQ), (a + b) % P], axis=1).astype(np.uint16)
    flags = np.zeros_like(tokens, dtype=np.uint8)
    flags[:, 0], flags[:, 3] = START, LABEL  # HF shifts labels: the logits at "=" predict c
    order = torch.randperm(P * P, generator=torch.Generator().manual_seed(seed)).numpy()
    train_ids, eval_ids = order[:n_train], order[n_train:]
    index = np.arange(P * P, dtype=np.int64)
    fingerprint = hashlib.sha256(json.dumps(["modadd", _VERSION, P, train_fraction, seed]).encode()).hexdigest()[:32]
    names = DocNames([f"modadd:{x}+{y}" for x, y in zip(a.tolist(), b.tolist())], order.astype(np.int32),
                     np.full(P * P, -1, dtype=np.int64))
    return PackedData(
        train=tokens[train_ids], eval=tokens[eval_ids],
        train_docs=np.repeat(index[:n_train, None], 2, axis=1), eval_docs=np.repeat(index[n_train:, None], 2, axis=1),
        doc_names=names, from_cache=False, fingerprint=fingerprint,
        train_flags=flags[train_ids], eval_flags=flags[eval_ids],
        stats={"documents": P * P, "train_blocks": n_train, "eval_blocks": P * P - n_train},
    )
