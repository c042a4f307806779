"""The spike benchmark's modadd task (bench/modadd.py): a + b mod 97 as 4-token samples with a label only
on the answer, plugged into bigtrain as a registered data source and model preset."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain import config, data
from bigtrain.config import ConfigError, load_config
from bigtrain.data import DataConfig, build_dataset, build_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import modadd  # noqa: E402

P = 97


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """modadd registered, and the registries as they were after each test."""
    monkeypatch.setattr(data, "SOURCES", dict(data.SOURCES))
    monkeypatch.setattr(config, "PRESETS", dict(config.PRESETS))
    modadd.register()
    modadd.register()  # every rank, every import: registering again is a no-op


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(None)


def test_shapes_tokens_and_labels(tok):
    d = build_dataset(DataConfig(source="modadd", seq_len=4), tok, seed=0)
    assert d.train.shape == (4704, 4) and d.eval.shape == (4705, 4)  # round(0.5 * 9409) train
    for split in ("train", "eval"):
        n = getattr(d, split).shape[0]
        b = d.batch(range(n), split)
        x, y = b["input_ids"], b["labels"]
        assert x.dtype == y.dtype == torch.int64 and y.shape == x.shape
        assert torch.equal(b["position_ids"], torch.arange(4).expand(n, 4))
        assert torch.equal(x[:, 3], (x[:, 0] + x[:, 1]) % P)
        assert (x[:, 2] == P).all() and int(x.max()) < len(tok)
        assert (y[:, :3] == -100).all() and torch.equal(y[:, 3], x[:, 3])
        assert int((y[:, 1:] != -100).sum()) == x.shape[0] == d.label_count(range(n), split)  # the trainer's norm
    assert not d.from_cache
    assert d.train_docs.shape == (4704, 2) and d.eval_docs.shape == (4705, 2)
    for k in (0, 17, 4703):
        a, b = d.train[k, :2].tolist()
        assert d.sources(k) == [f"modadd:{a}+{b}"]
    a, b = d.eval[5, :2].tolist()
    assert d.eval_sources(5) == [f"modadd:{a}+{b}"]


def test_split_is_disjoint_and_covers_the_table(tok):
    d = build_dataset(DataConfig(source="modadd", seq_len=4), tok, seed=3)
    train = {tuple(r) for r in d.train[:, :2].tolist()}
    eval_ = {tuple(r) for r in d.eval[:, :2].tolist()}
    assert len(train) == d.train.shape[0] and len(eval_) == d.eval.shape[0]  # no duplicates
    assert not train & eval_
    assert train | eval_ == {(a, b) for a in range(P) for b in range(P)}
    assert len(set(d.doc_names)) == P * P


def test_deterministic_per_seed_and_fraction(tok):
    cfg = DataConfig(source="modadd", seq_len=4)
    one, again, other = (build_dataset(cfg, tok, seed=s) for s in (1, 1, 2))
    for name in ("train", "eval", "train_flags", "eval_flags", "train_docs"):
        assert np.array_equal(getattr(one, name), getattr(again, name))
    assert one.fingerprint == again.fingerprint != other.fingerprint
    assert not np.array_equal(one.train, other.train)
    small = modadd.build(DataConfig(source="modadd", seq_len=4), tok, seed=1, train_fraction=0.3)
    assert small.train.shape[0] == round(0.3 * P * P) and small.fingerprint != one.fingerprint


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="modadd", seq_len=8), r"data\.seq_len must be 4 for data\.source='modadd'"),
        (dict(source="stdlib", seq_len=4), r"data\.seq_len must be >= 8, got 4 \(data\.source='stdlib'\)"),
    ],
)
def test_bad_config_is_one_line_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


@pytest.mark.parametrize("fraction", [1.0, 0.0])
def test_train_fraction_must_leave_pairs_on_both_sides(tok, fraction):
    with pytest.raises(ValueError, match="train_fraction"):
        modadd.build(DataConfig(source="modadd", seq_len=4), tok, seed=0, train_fraction=fraction)


def test_config_tree_accepts_modadd_and_rejects_default_seq_len():
    cfg = load_config(None, ["data.source=modadd", "data.seq_len=4", "model.preset=modadd"])
    assert cfg.data.source == "modadd" and config.PRESETS["modadd"]["num_hidden_layers"] == 1
    with pytest.raises(ConfigError, match=r"set data\.seq_len=4"):
        load_config(None, ["data.source=modadd"])


def test_registering_another_task_under_the_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        data.register_source("modadd", lambda cfg, tok, seed, where: None)
    with pytest.raises(ValueError, match="already registered"):
        config.register_preset("modadd", {**modadd.PRESET, "num_hidden_layers": 2})


def test_bigtrain_alone_knows_no_modadd(monkeypatch):
    import subprocess

    # The product's CLI in a fresh process, where no test registered anything: modadd is refused.
    for args in (["data.source=modadd", "data.seq_len=4"], ["model.preset=modadd"]):
        proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", "--dry-run", *args], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and "modadd" in proc.stderr and "register_" in proc.stderr, proc.stderr
    # And the messages name the seam.
    monkeypatch.setattr(data, "SOURCES", {k: v for k, v in data.SOURCES.items() if k != "modadd"})
    monkeypatch.setattr(config, "PRESETS", {k: v for k, v in config.PRESETS.items() if k != "modadd"})
    with pytest.raises(ConfigError, match=r"data\.source must be one of \['stdlib', 'files', 'hub'\].*register_source"):
        load_config(None, ["data.source=modadd", "data.seq_len=4"])
    with pytest.raises(ConfigError, match=r"model\.preset must be one of .*register_preset"):
        load_config(None, ["model.preset=modadd"])


def test_small_tokenizer_is_refused():
    class Tiny:
        def __len__(self):
            return 50

    with pytest.raises(ValueError, match=r"needs token ids 0\.\.97"):
        build_dataset(DataConfig(source="modadd", seq_len=4), Tiny(), seed=0)
