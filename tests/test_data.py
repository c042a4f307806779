"""Data layer: load, split, tokenize, pack, cache; every bad input is a one-line ValueError."""

import json
import re

import datasets
import pytest
import torch
import transformers

from bigtrain.data import DataConfig, PackedData, build_dataset, build_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(None)


def _docs_of(blocks_docs: torch.Tensor) -> set[int]:
    return {d for first, last in blocks_docs.tolist() for d in range(first, last + 1)}


def _check_packing(packed: PackedData, texts: dict[str, str], tok) -> None:
    """Shapes, and every train block's text really comes from the documents sources() names."""
    eos = tok.eos_token_id
    assert packed.train.dtype == torch.long and packed.train.ndim == 2
    assert packed.train.shape[1] == packed.eval.shape[1] == SEQ
    assert packed.train.shape[0] >= 1 and packed.eval.shape[0] >= 1
    assert packed.train_docs.shape == (packed.train.shape[0], 2)
    assert packed.eval_docs.shape == (packed.eval.shape[0], 2)
    for k in range(packed.train.shape[0]):
        block = packed.train[k].tolist()
        names = packed.sources(k)
        assert len(names) == block[:-1].count(eos) + 1  # one eos ends each document but the last
        pieces = tok.decode(block).split(tok.eos_token)
        for name, piece in zip(names, pieces):
            assert piece in texts[name], (k, name, piece)
    assert not _docs_of(packed.train_docs) & _docs_of(packed.eval_docs)


def test_stdlib_default_builds_and_second_call_hits_cache(tmp_path, tok):
    cfg = DataConfig(max_bytes=200_000, cache_dir=str(tmp_path), seq_len=64)
    first = build_dataset(cfg, tok, seed=0)
    assert not first.from_cache
    assert first.train.shape[1] == 64 and first.train.shape[0] > 100 and first.eval.shape[0] >= 1
    assert first.doc_names[0].startswith("stdlib:") and first.doc_names[0].endswith(".py")
    assert int(first.train.max()) < len(tok)
    assert not _docs_of(first.train_docs) & _docs_of(first.eval_docs)
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.is_file()) == [".json", ".safetensors"]
    second = build_dataset(cfg, tok, seed=1)  # seed does not change packing
    assert second.from_cache and second.fingerprint == first.fingerprint
    for name in ("train", "eval", "train_docs", "eval_docs"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert second.doc_names == first.doc_names
    # A damaged entry (tensors unreadable, or names file missing) is rebuilt, not trusted.
    for damage in ("safetensors", "json"):
        path = tmp_path / f"{first.fingerprint}.{damage}"
        path.write_bytes(b"garbage") if damage == "safetensors" else path.unlink()
        again = build_dataset(cfg, tok, seed=0)
        assert not again.from_cache and torch.equal(again.train, first.train)
    assert build_dataset(cfg, tok, seed=0).from_cache
    # A different seq_len is a different cache entry.
    other = build_dataset(DataConfig(max_bytes=200_000, cache_dir=str(tmp_path), seq_len=32), tok, 0)
    assert not other.from_cache and other.fingerprint != first.fingerprint


def test_text_files_one_document_per_file(tmp_path, tok):
    texts = {}
    for i in range(4):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(f"file {i} says " + "hello world " * (5 + 4 * i) + "\nbye\n")
        texts[f"text:{path}"] = path.read_text()
    cfg = DataConfig(source="files", files=[str(tmp_path / "*.txt")], seq_len=SEQ,
                     eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    packed = build_dataset(cfg, tok, seed=0)
    assert sorted(packed.doc_names) == sorted(texts)
    _check_packing(packed, texts, tok)
    # eval_fraction=0: the last file is moved to eval; block 0 starts the first file.
    assert packed.sources(0) == [f"text:{tmp_path / 'doc0.txt'}"]
    assert packed.train[0].tolist() == tok(texts[packed.doc_names[0]])["input_ids"][:SEQ]
    assert packed.eval_sources(0) == [f"text:{tmp_path / 'doc3.txt'}"]


def test_jsonl_and_parquet_name_file_and_row(tmp_path, tok):
    rows = [{"text": f"record {i}: " + "abc " * (3 + (7 * i) % 11), "id": i} for i in range(30)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq = tmp_path / "b.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    for path, loader in ((jsonl, "json"), (pq, "parquet")):
        cfg = DataConfig(source="files", files=[str(path)], seq_len=SEQ, eval_fraction=0.2,
                         cache_dir=str(tmp_path / "cache"))
        packed = build_dataset(cfg, tok, seed=0)
        texts = {f"{loader}:{path}#{i}": r["text"] for i, r in enumerate(rows)}
        assert sorted(packed.doc_names) == sorted(texts)
        _check_packing(packed, texts, tok)
        # Wherever a block shows "record i:", sources() names row i of this file.
        seen = 0
        for k in range(len(packed.train)):
            pieces = tok.decode(packed.train[k].tolist()).split(tok.eos_token)
            for name, piece in zip(packed.sources(k), pieces):
                for i in map(int, re.findall(r"record (\d+):", piece)):
                    assert name == f"{loader}:{path}#{i}"
                    seen += 1
        assert seen >= 10


def test_eval_split_is_by_document_hash_and_stable(tmp_path, tok):
    for i in range(40):
        (tmp_path / f"d{i:02d}.txt").write_text(f"document {i} " * 12)
    cfg = dict(source="files", seq_len=SEQ, eval_fraction=0.25, cache_dir=str(tmp_path / "c"))
    small = build_dataset(DataConfig(files=[str(tmp_path / "d0*.txt")], **cfg), tok, 0)
    big = build_dataset(DataConfig(files=[str(tmp_path / "d*.txt")], **cfg), tok, 0)
    assert not _docs_of(big.train_docs) & _docs_of(big.eval_docs)
    eval_small = {small.doc_names[d] for d in _docs_of(small.eval_docs)}
    eval_big = {big.doc_names[d] for d in _docs_of(big.eval_docs)}
    # Adding files leaves the old documents on their side of the split (barring the
    # empty-eval fallback, which a 25% fraction over 10 documents does not hit here).
    assert eval_small <= eval_big
    assert 0 < len(eval_big) < 40


def test_tokenizer_round_trips_through_save_pretrained(tmp_path, tok):
    text = "def f(x):\n    return x  # héllo ✓ <|endoftext|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(tok) == 257 and tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == 256
    assert ids[:3] == list(b"def") and tok.decode(ids) == text
    tok.save_pretrained(str(tmp_path))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert build_tokenizer(str(tmp_path))(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.eos_token == "<|endoftext|>" and len(loaded) == 257
    (tmp_path / "model_without_tokenizer").mkdir()
    assert len(build_tokenizer(str(tmp_path / "model_without_tokenizer"))) == 257  # built-in


def _write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: dict(files=[str(d / "*.jsonl")]), r"data\.files: no files match"),
        (lambda d: dict(files=[str(d / "missing.txt")]), r"data\.files: file .* does not exist"),
        (lambda d: dict(files=[_write(d / "e.jsonl", "")]), r"data\.files.*empty"),
        (lambda d: dict(files=[_write(d / "e.txt", "")]), r"data\.files.*empty"),
        (lambda d: dict(files=[_write(d / "bad.txt", b"\xff\xfe\xfa bad utf8")]),
         r"data\.files: could not read"),
        (lambda d: dict(files=[_write(d / "bad.jsonl", '{"text": "a"\n')]), r"data\.files: could not read"),
        (lambda d: dict(files=[_write(d / "x.jsonl", '{"body": "a", "id": 1}\n')]),
         r"data\.text_column='text' not in columns \['body', 'id'\].*set data\.text_column="),
        (lambda d: dict(files=[_write(d / "x.jsonl", '{"text": 5}\n')]),
         r"data\.text_column='text'.*not text"),
        (lambda d: dict(files=[_write(d / "x.csv", "a,b\n")]), r"data\.files: unknown extension"),
        (lambda d: dict(files=[_write(d / "a.txt", "hi"), _write(d / "b.jsonl", '{"text":"a"}\n')]),
         r"data\.files mixes loaders"),
        (lambda d: dict(files=[_write(d / "short.txt", "tiny")]), r"data has 5 tokens .* data\.seq_len=32"),
    ],
)
def test_bad_files_raise_value_error(tmp_path, tok, make, match):
    cfg = DataConfig(source="files", seq_len=SEQ, cache_dir=str(tmp_path / "cache"), **make(tmp_path))
    with pytest.raises(ValueError, match=match) as err:
        build_dataset(cfg, tok, seed=0)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(source="files"), r"data\.files is empty but data\.source='files'"),
        (dict(source="web"), r"data\.source must be one of"),
        (dict(source="hub"), r"data\.hub_name"),
        (dict(seq_len=2), r"data\.seq_len must be >= 8, got 2"),
        (dict(eval_fraction=1.0), r"data\.eval_fraction"),
        (dict(max_bytes=0), r"data\.max_bytes"),
        (dict(num_proc=0), r"data\.num_proc"),
        (dict(text_column=""), r"data\.text_column"),
        (dict(files="a.txt"), r"data\.files must be a list"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_missing_tokenizer_dir_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_tokenizer(str(tmp_path / "nope"))
