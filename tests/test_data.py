"""Data layer: load, split, tokenize, pack, cache; every bad input is a one-line ValueError."""

import json
import math
import re

import datasets
import numpy as np
import pytest
import torch
import transformers

from bigtrain import data
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
    assert packed.train.dtype == np.uint16 and packed.train.ndim == 2  # 257-token vocabulary
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
    entry = tmp_path / first.fingerprint
    assert isinstance(first.train, np.memmap) and not first.train.flags.writeable  # mapped read-only
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        ["meta.json", "doc_file.npy", "doc_row.npy", "train_tokens.npy", "eval_tokens.npy", "train_docs.npy",
         "eval_docs.npy"])
    second = build_dataset(cfg, tok, seed=1)  # seed does not change packing
    assert second.from_cache and second.fingerprint == first.fingerprint
    for name in ("train", "eval", "train_docs", "eval_docs"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert list(second.doc_names) == list(first.doc_names)
    # A damaged entry (tokens unreadable, or the completion marker missing) is rebuilt, not trusted.
    expected = np.array(first.train)  # a copy: truncating a mapped file would fault on access
    del first, second
    for damage in ("train_tokens.npy", "meta.json"):
        path = entry / damage
        path.write_bytes(b"garbage") if damage.endswith(".npy") else path.unlink()
        again = build_dataset(cfg, tok, seed=0)
        assert not again.from_cache and np.array_equal(again.train, expected)
        del again
    assert build_dataset(cfg, tok, seed=0).from_cache
    # A different seq_len is a different cache entry.
    other = build_dataset(DataConfig(max_bytes=200_000, cache_dir=str(tmp_path), seq_len=32), tok, 0)
    assert not other.from_cache and other.fingerprint != entry.name


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


def test_globs_keep_what_datasets_resolve_pattern_would_skip(tmp_path):
    """data.files expands with Python's glob: datasets.data_files.resolve_pattern would silently
    drop the files behind a symlinked directory, in a __name__ directory and named config.json
    (docs/data.md, "Globs"). Hidden files are skipped by both; keys are relative to the fixed prefix."""
    from bigtrain.data import _resolve_files

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for rel in ("a.txt", "sub/deep/b.txt", "__x__/c.txt", ".hidden.txt", ".dir/d.txt", "config.json", "rows.json"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        _write(data / rel, "x")
    elsewhere.mkdir()
    _write(elsewhere / "e.txt", "x")
    (data / "link").symlink_to(elsewhere, target_is_directory=True)
    paths, keys, loader = _resolve_files([str(data / "**" / "*.txt")])
    assert keys == ["__x__/c.txt", "a.txt", "link/e.txt", "sub/deep/b.txt"] and loader == "text"
    assert paths[2] == (elsewhere / "e.txt").resolve()
    assert _resolve_files([str(data / "*.json")])[1] == ["config.json", "rows.json"]
    assert _resolve_files([str(data / ".*.txt"), str(data / "a.txt")])[1] == [".hidden.txt", "a.txt"]


def test_stdlib_default_is_a_glob_naming_the_files_it_always_did():
    """The stdlib default is expanded like data.files (one glob per top-level directory); its file
    set and keys equal the directory walk it replaced, so the default's cache entry stays valid."""
    import os
    import sysconfig
    from pathlib import Path

    from bigtrain.data import _STDLIB_EXCLUDE, _plan

    root = Path(sysconfig.get_paths()["stdlib"])
    walked, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):  # the replaced walk, as it was
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDE)
        walked.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    expected = []
    for path in sorted(walked, key=lambda p: p.relative_to(root).as_posix()):
        size = path.stat().st_size
        if size and total + size <= 300_000:
            expected.append(path.relative_to(root).as_posix())
            total += size
    plan = _plan(DataConfig(max_bytes=300_000))
    assert plan.keys == expected and plan.prefixes == [f"stdlib:{k}" for k in expected]
    assert [p.relative_to(root).as_posix() for p in plan.paths] == expected


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


# ----------------------------------------------------------------------------------------------
# Instruction data: chat and prompt/completion, loss masks, packing, local datasets.

# A ChatML-style template (as Qwen's tokenizers carry), small enough to read.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} + {i}?"},
     {"role": "assistant", "content": f"It is {2 * i}."}, {"role": "user", "content": "Sure?"},
     {"role": "assistant", "content": "Yes" + "!" * i}]
    for i in range(12)
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A local model directory: a tiny Llama and the byte-level tokenizer with a chat template."""
    from transformers import AutoModelForCausalLM

    from bigtrain.config import ModelConfig
    from bigtrain.model import preset_config

    path = tmp_path_factory.mktemp("chat_model")
    tok = build_tokenizer(None)
    tok.chat_template = CHATML
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(ModelConfig(), len(tok), 512, tok.pad_token_id))
    model.save_pretrained(str(path))
    return path


def _labelled_text(packed: PackedData, tok, split="train") -> list[str]:
    """Per example (START to START), the decoded tokens that carry a loss."""
    flags = packed.train_flags if split == "train" else packed.eval_flags
    tokens = packed.train if split == "train" else packed.eval
    out = []
    for k in range(tokens.shape[0]):
        ids, fl = tokens[k].tolist(), flags[k].tolist()
        for t in range(len(ids)):
            if fl[t] & 2:
                out.append([])
            if fl[t] & 1:
                out[-1].append(ids[t])
    return [tok.decode(x) for x in out if x]


def test_chat_loss_covers_exactly_the_assistant_turns(tmp_path, chat_model):
    tok = build_tokenizer(str(chat_model))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    cfg = DataConfig(source="files", files=[str(path)], format="chat", seq_len=512, eval_fraction=0.2,
                     cache_dir=str(tmp_path / "c"))
    packed = build_dataset(cfg, tok, 0)
    expected = {f"json:{path}#{i}": f"It is {2 * i}.<|im_end|>\nYes{'!' * i}<|im_end|>\n" for i in range(12)}
    # In packing order, each example's labelled tokens are its two assistant turns (with the end-of-turn
    # marker the model must learn to emit), nothing of the system/user turns or the generation prompt.
    got = _labelled_text(packed, tok) + _labelled_text(packed, tok, "eval")
    names = list(packed.doc_names)
    assert [t.replace("<|im_end|>\n", "|") for t in got] == \
        [expected[n].replace("<|im_end|>\n", "|") for n in names]
    assert packed.train.shape[0] < packed.stats["train_documents"]  # several examples share a block
    # Position ids restart at each example; labels mirror the flags.
    b = packed.batch([0])
    starts = np.nonzero(packed.train_flags[0] & 2)[0]
    assert b["position_ids"][0, starts].tolist() == [0] * len(starts) and len(starts) >= 2
    assert int((b["labels"] != -100).sum()) == int((packed.train_flags[0] & 1).sum())
    assert packed.stats["label_share"] < 0.5


def test_prompt_completion_loss_covers_the_completion_and_eos(tmp_path, tok):
    rows = [{"q": f"Q{i}: say {i}", "a": f" {i}" * (1 + i % 3)} for i in range(20)]
    pq = tmp_path / "pc.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    cfg = DataConfig(source="files", files=[str(pq)], format="prompt_completion", prompt_column="q",
                     completion_column="a", seq_len=32, eval_fraction=0.2, cache_dir=str(tmp_path / "c"),
                     packing=False)
    packed = build_dataset(cfg, tok, 0)
    got = _labelled_text(packed, tok) + _labelled_text(packed, tok, "eval")
    assert got == [rows[int(n.split("#")[1])]["a"] + tok.eos_token for n in packed.doc_names]
    # packing=false: one example per block, the rest padding that carries no loss.
    assert packed.train.shape[0] == packed.stats["train_documents"]
    assert all(len(packed.sources(k)) == 1 for k in range(packed.train.shape[0]))
    assert packed.stats["padding_share"] > 0.3


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, tok):
    rows = [{"prompt": "p" * 5, "completion": "c" * n} for n in (3, 40, 8)] + [{"prompt": "p" * 40, "completion": "x"}]
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(source="files", files=[str(path)], format="prompt_completion", seq_len=16, eval_fraction=0.0,
                cache_dir=str(tmp_path / "c"))
    trunc = build_dataset(DataConfig(**base), tok, 0)
    # Row 1 is cut to 16 tokens (prompt kept, completion cut); row 3's prompt alone fills the block.
    assert (trunc.stats["truncated"], trunc.stats["dropped_overlong"], trunc.stats["documents"]) == (1, 1, 3)
    drop = build_dataset(DataConfig(**base, overlong="drop"), tok, 0)
    assert (drop.stats["truncated"], drop.stats["dropped_overlong"], drop.stats["documents"]) == (0, 2, 2)
    assert sorted(n.split("#")[1] for n in drop.doc_names) == ["0", "2"]


def test_packed_block_loss_equals_its_examples_run_one_by_one(tmp_path, chat_model):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(str(chat_model))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    cfg = DataConfig(source="files", files=[str(path)], format="chat", seq_len=512, eval_fraction=0.0,
                     cache_dir=str(tmp_path / "c"))
    packed = build_dataset(cfg, tok, 0)
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(str(chat_model), attn_implementation=attn).eval()
        with torch.no_grad():
            b = packed.batch([0])
            packed_loss = model(**b, use_cache=False).loss.item()
            flags, ids = packed.train_flags[0], packed.train[0].astype(np.int64)
            starts = [*np.nonzero(flags & 2)[0].tolist(), 512]
            total = n = 0.0
            for lo, hi in zip(starts, starts[1:]):
                labels = np.where(flags[lo:hi] & 1, ids[lo:hi], -100)
                count = int((labels[1:] != -100).sum())
                if not count:  # the padding at the end of the block
                    continue
                out = model(input_ids=torch.from_numpy(ids[lo:hi])[None], labels=torch.from_numpy(labels)[None])
                total += out.loss.item() * count
                n += count
            assert len(starts) >= 4 and n == packed.label_count([0])
            assert packed_loss == pytest.approx(total / n, rel=1e-5), attn
            # Without the position ids the examples attend to each other and the loss differs.
            crossed = model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss.item()
            assert crossed != pytest.approx(packed_loss, rel=1e-4)


def test_loss_normalisation_counts_label_tokens_across_uneven_micro_batches(tmp_path, chat_model):
    """The trainer's rule (train_step): each micro-batch's summed token loss / the global label count.
    With micro-batches of different label counts it equals the token mean over the whole batch, not
    the mean of the micro-batch means."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(str(chat_model))
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a" * (2 + 9 * (i % 2))}) + "\n"
                            for i in range(8)))
    packed = build_dataset(DataConfig(source="files", files=[str(path)], format="prompt_completion", seq_len=32,
                                      packing=False, eval_fraction=0.0, cache_dir=str(tmp_path / "c")), tok, 0)
    micro = [[0, 2], [1, 3]]  # short completions, then long ones
    counts = [packed.label_count(m) for m in micro]
    assert counts[0] != counts[1]
    model = AutoModelForCausalLM.from_pretrained(str(chat_model)).eval()
    norm = sum(counts)
    with torch.no_grad():
        trainer = sum(model(**packed.batch(m), num_items_in_batch=norm).loss.item() for m in micro)
        whole = model(**packed.batch(micro[0] + micro[1])).loss.item()  # one batch: the true token mean
        means = sum(model(**packed.batch(m)).loss.item() for m in micro) / len(micro)
    assert trainer == pytest.approx(whole, rel=1e-5)
    assert means != pytest.approx(whole, rel=1e-3)


def test_bad_instruction_data_is_refused_with_the_key(tmp_path, tok, chat_model):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVS[0]}) + "\n")
    cfg = dict(source="files", seq_len=64, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"data\.format='chat'.*has none.*chat_template.*prompt_completion"):
        build_dataset(DataConfig(files=[str(path)], format="chat", **cfg), tok, 0)
    chat_tok = build_tokenizer(str(chat_model))
    with pytest.raises(ValueError, match=r"data\.messages_column='conv' not in columns \['messages'\]"):
        build_dataset(DataConfig(files=[str(path)], format="chat", messages_column="conv", **cfg), chat_tok, 0)
    pc = tmp_path / "pc.jsonl"
    pc.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"row 1 of json:.*pc\.jsonl has no 'completion' \(data\.completion_column\)"):
        build_dataset(DataConfig(files=[str(pc)], format="prompt_completion", **cfg), tok, 0)
    with pytest.raises(ValueError, match=r"data\.prompt_column='question' not in columns"):
        build_dataset(DataConfig(files=[str(pc)], format="prompt_completion", prompt_column="question", **cfg),
                      tok, 0)


def test_a_chat_tokenizer_without_eos_or_pad_trains_chat_and_refuses_text(tmp_path):
    """A chat template ends the turns itself: no eos or pad is needed (padding gets id 0, no label).
    Text and prompt/completion put an eos after each document/completion: refused, with the fix.
    Old code: refused every format when the tokenizer was loaded."""
    tok = build_tokenizer(None)
    tok.chat_template = CHATML
    tok.eos_token = tok.pad_token = tok.bos_token = None
    tok.save_pretrained(str(tmp_path / "model"))
    tok = build_tokenizer(str(tmp_path / "model"))
    assert tok.eos_token_id is None and tok.pad_token_id is None
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    base = dict(source="files", files=[str(path)], seq_len=512, eval_fraction=0.2, cache_dir=str(tmp_path / "c"))
    packed = build_dataset(DataConfig(format="chat", packing=False, **base), tok, 0)
    assert packed.stats["train_documents"] >= 1 and packed.stats["padding_share"] > 0
    assert (packed.train[0][np.nonzero(packed.train_flags[0])[0][-1] + 1:] == 0).all()
    for fmt in ("text", "prompt_completion"):
        with pytest.raises(ValueError, match=rf"data.format='{fmt}' puts an eos token .* has none: set eos_token"):
            build_dataset(DataConfig(**{**base, "format": fmt}), tok, 0)


def test_a_single_text_file_is_split_inside(tmp_path, tok):
    """Issue 11 item 10: one document used to fail every eval_fraction."""
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i} of the only document\n" for i in range(100)))
    packed = build_dataset(DataConfig(source="files", files=[str(path)], seq_len=SEQ,
                                      cache_dir=str(tmp_path / "c")), tok, 0)
    n = len(path.read_text()) + 1  # one byte per token, plus eos
    n_eval = max(SEQ, -(-n * 2 // 100))  # the tail: 2% of the tokens, at least one block
    assert packed.eval.shape[0] == n_eval // SEQ and packed.train.shape[0] == (n - n_eval) // SEQ
    assert list(packed.doc_names) == [f"text:{path}#train-part", f"text:{path}#eval-part"]
    text = path.read_text()
    assert tok.decode(packed.eval[0].tolist()) == text[n - n_eval:n - n_eval + SEQ]  # eval is the tail
    assert tok.decode(packed.train[0].tolist()) == text[:SEQ]


def test_cache_survives_moving_the_data_and_keys_the_content(tmp_path, tok):
    a = tmp_path / "a"
    a.mkdir()
    for i in range(6):
        (a / f"d{i}.jsonl").write_text("".join(json.dumps({"text": f"doc {i} row {r} " * 4}) + "\n" for r in range(5)))
    cfg = dict(source="files", seq_len=SEQ, eval_fraction=0.2, cache_dir=str(tmp_path / "c"))
    first = build_dataset(DataConfig(files=[str(a / "*.jsonl")], **cfg), tok, 0)
    (tmp_path / "a").rename(tmp_path / "b")
    moved = build_dataset(DataConfig(files=[str(tmp_path / "b" / "*.jsonl")], **cfg), tok, 0)
    assert moved.from_cache and moved.fingerprint == first.fingerprint
    assert moved.sources(0)[0].startswith(f"json:{tmp_path / 'b'}")  # names show where the data is now
    with open(tmp_path / "b" / "d0.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more row"}) + "\n")
    assert not build_dataset(DataConfig(files=[str(tmp_path / "b" / "*.jsonl")], **cfg), tok, 0).from_cache


def test_local_hub_datasets_save_to_disk_and_repo_dir(tmp_path, tok):
    rows = [{"prompt": f"p{i} ", "completion": f"c{i}"} for i in range(30)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:20]),
                               "test": datasets.Dataset.from_list(rows[20:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    cfg = dict(source="hub", format="prompt_completion", seq_len=16, cache_dir=str(tmp_path / "c"))
    train = build_dataset(DataConfig(hub_name=str(tmp_path / "saved"), **cfg), tok, 0)
    test = build_dataset(DataConfig(hub_name=str(tmp_path / "saved"), split="test", **cfg), tok, 0)
    assert train.stats["documents"] == 20 and test.stats["documents"] == 10
    assert re.fullmatch(rf"hub:{tmp_path / 'saved'}#\d+", train.sources(0)[0])
    with pytest.raises(ValueError, match=r"data\.split='dev' is not in the saved DatasetDict.*\['train', 'test'\]"):
        build_dataset(DataConfig(hub_name=str(tmp_path / "saved"), split="dev", **cfg), tok, 0)
    # A single saved Dataset, and a dataset repository directory with data/<split>-*.parquet files.
    dd["test"].save_to_disk(str(tmp_path / "one"))
    assert build_dataset(DataConfig(hub_name=str(tmp_path / "one"), **cfg), tok, 0).stats["documents"] == 10
    (tmp_path / "repo" / "data").mkdir(parents=True)
    dd["train"].to_parquet(str(tmp_path / "repo" / "data" / "train-00000.parquet"))
    dd["test"].to_parquet(str(tmp_path / "repo" / "data" / "validation-00000.parquet"))
    val = build_dataset(DataConfig(hub_name=str(tmp_path / "repo"), split="validation", **cfg), tok, 0)
    assert val.stats["documents"] == 10


def test_hub_revision_is_part_of_the_cache_key(tok):
    from bigtrain.data import data_fingerprint

    one = data_fingerprint(DataConfig(source="hub", hub_name="org/name-that-is-not-a-dir"), tok)
    two = data_fingerprint(DataConfig(source="hub", hub_name="org/name-that-is-not-a-dir", revision="abc123"), tok)
    assert one != two


def test_uint32_tokens_for_a_large_vocabulary(tmp_path, tok):
    big = build_tokenizer(None)
    big.add_tokens([f"<extra_{i}>" for i in range(70_000)])
    path = tmp_path / "a.txt"
    path.write_text("hello world <extra_69999> " * 20)
    packed = build_dataset(DataConfig(source="files", files=[str(path)], seq_len=SEQ,
                                      cache_dir=str(tmp_path / "c")), big, 0)
    assert packed.train.dtype == np.uint32 and 257 + 69_999 in packed.train.reshape(-1).tolist() + \
        packed.eval.reshape(-1).tolist()


def _chat_jsonl(path):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS * 3))
    return [f"data.files=[{path}]", "data.format=chat"]


def _pc_parquet(path):
    rows = [{"instruction": f"Add {i} and {i}.", "answer": f" {2 * i}"} for i in range(60)]
    datasets.Dataset.from_list(rows).to_parquet(str(path.with_suffix(".parquet")))
    return [f"data.files=[{path.with_suffix('.parquet')}]", "data.format=prompt_completion",
            "data.prompt_column=instruction", "data.completion_column=answer"]


def _saved_dataset(path):
    rows = [{"prompt": f"Echo {i}:", "completion": f" {i} {i}"} for i in range(60)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return ["data.source=hub", f"data.hub_name={path}", "data.split=train", "data.format=prompt_completion"]


@pytest.mark.slow
@pytest.mark.parametrize("make", [_chat_jsonl, _pc_parquet, _saved_dataset], ids=["chat-jsonl", "pc-parquet",
                                                                                    "save-to-disk"])
def test_fine_tune_a_local_model_on_instruction_data_with_2_ranks(tmp_path, chat_model, make):
    from helpers import read_jsonl, run_bigtrain

    data_args = make(tmp_path / "data.jsonl") if make is _chat_jsonl else make(tmp_path / "data")
    if make is not _saved_dataset:
        data_args.insert(0, "data.source=files")
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    run_bigtrain([f"model.path={chat_model}", *data_args, "data.seq_len=256", f"data.cache_dir={cache}",
                  f"run_dir={run_dir}", "train.steps=4", "train.micro_batch=2", "train.precision=fp32",
                  "train.eval_interval=0", "train.eval_batches=1", "optim.warmup_steps=1",
                  "checkpoint.snapshot_interval=0"])
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert math.isfinite(rows[-1]["eval_loss"])
    # Both ranks mapped one entry, prepared once (the other rank waited on the lock).
    entries = [p for p in cache.iterdir() if p.is_dir() and p.name != "hf"]
    assert len(entries) == 1 and (entries[0] / "train_flags.npy").is_file()
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()


def test_run_fingerprint_ignores_where_the_data_lives(tmp_path):
    from bigtrain.config import load_config

    one = load_config(None, ["data.source=files", "data.files=[/data/a/*.jsonl]", "data.cache_dir=/x"])
    two = load_config(None, ["data.source=files", "data.files=[/mnt/b/*.jsonl]", "data.num_proc=4"])
    other = load_config(None, ["data.source=files", "data.files=[/data/a/*.jsonl]", "data.format=chat"])
    assert one.fingerprint() == two.fingerprint() != other.fingerprint()


def _build_in_child(args):
    cfg, queue = args
    packed = build_dataset(cfg, build_tokenizer(None), 0)
    queue.put((packed.from_cache, packed.fingerprint, int(packed.train.shape[0])))


def _build_in_two_processes(tmp_path, ctx) -> list[tuple]:
    """Eight small documents, then two forked processes building the same cache entry at once (what
    the ranks of a job do in train); each one's (from_cache, fingerprint, train blocks)."""
    for i in range(8):
        (tmp_path / f"d{i}.txt").write_text(f"document {i} " * 200)
    cfg = DataConfig(source="files", files=[str(tmp_path / "*.txt")], seq_len=SEQ, cache_dir=str(tmp_path / "c"))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=((cfg, queue),)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_concurrent_builders_prepare_once(tmp_path, monkeypatch):
    """Two processes asking for the same entry: one prepares under the lock, the other waits on it and maps
    the result (what the ranks of a job do in train)."""
    import multiprocessing as mp

    results = _build_in_two_processes(tmp_path, mp.get_context("fork"))
    assert sorted(r[0] for r in results) == [False, True]  # exactly one prepared
    assert results[0][1:] == results[1][1:]
    assert [p.name for p in (tmp_path / "c").iterdir() if p.is_dir() and p.name != "hf"] == [results[0][1]]


def test_cache_without_working_locks_lets_the_first_preparation_win(tmp_path, monkeypatch):
    """A shared filesystem that refuses flock (ENOLCK: NFS without a lock daemon): both processes
    prepare, in work directories of their own, the first rename wins and the other maps it; one
    entry, no work directory left, the same blocks for both. Old code: OSError out of the lock."""
    import errno
    import multiprocessing as mp
    import types

    import bigtrain.data as data

    ctx = mp.get_context("fork")
    both_missed_the_cache = ctx.Barrier(2)

    def no_flock(fd, op):  # both processes get here after finding no entry: both must prepare
        both_missed_the_cache.wait(timeout=60)
        raise OSError(errno.ENOLCK, "No locks available")

    # Only bigtrain's lock: datasets' own file locks (its cache) keep the real fcntl.
    monkeypatch.setattr(data, "fcntl", types.SimpleNamespace(flock=no_flock, LOCK_EX=0, LOCK_UN=0))
    results = _build_in_two_processes(tmp_path, ctx)
    assert [r[0] for r in results] == [False, False]  # both prepared
    assert results[0][1:] == results[1][1:]
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir() and p.name != "hf") == [results[0][1]]
    assert not list((tmp_path / "c").glob(".*.tmp-*"))


def test_only_abandoned_work_directories_are_cleaned(tmp_path):
    """Under a node-local flock (Lustre localflock) two nodes may prepare at once: the cleanup of
    killed preparations must never remove another node's live work directory."""
    import os
    import socket
    import time

    from bigtrain.data import _abandoned

    host = socket.gethostname()
    live = tmp_path / f".fp.tmp-{host}-{os.getpid()}-abcd1234"
    dead = tmp_path / f".fp.tmp-{host}-{2**22 + 7}-abcd1234"  # above the kernel's default pid_max
    other = tmp_path / ".fp.tmp-another-node-1-abcd1234"
    for d in (live, dead, other):
        d.mkdir()
    assert (_abandoned(live), _abandoned(dead), _abandoned(other)) == (False, True, False)
    os.utime(other, (time.time() - 2 * 86400,) * 2)  # untouched for two days: its process is gone
    assert _abandoned(other)


def test_prepare_command_reports_and_shows_the_loss_mask(tmp_path, capsys, chat_model):
    from bigtrain.cli import main

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    args = [f"model.path={chat_model}", "data.source=files", f"data.files=[{path}]", "data.format=chat",
            "data.seq_len=512", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(["prepare", *args, "--show", "1"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):out.index("}") + 1])
    assert report["documents"] == 12 and report["train_blocks"] >= 1 and 0 < report["label_share"] < 0.5
    assert {"truncated", "dropped_overlong", "train_tokens", "eval_tokens"} <= report.keys()
    shown = out[out.index("--- train block 0"):]
    # The system/user turns are outside [[...]], each assistant turn inside; "|" starts each example.
    assert "[[It is " in shown and "<|im_start|>user\nWhat is" in shown and "[[<|im_start|>" not in shown
    assert shown.count("|<|im_start|>system") >= 1
    # A tokenizer without a chat template: a one-line error naming the key, exit 2.
    assert main(["prepare", *args[1:]]) == 2
    assert "data.format='chat'" in capsys.readouterr().err


def test_micro_batch_carries_position_ids_and_poison_reaches_masked_labels(tmp_path, tok):
    """train.micro_batch: the dict train_step forwards to the model as is."""
    from bigtrain.config import FaultConfig
    from bigtrain.faults import FaultInjector
    from bigtrain.sampler import Sampler
    from bigtrain.train import micro_batch

    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"answer {i}"}) + "\n" for i in range(30)))
    packed = build_dataset(DataConfig(source="files", files=[str(path)], format="prompt_completion", seq_len=64,
                                      eval_fraction=0.1, cache_dir=str(tmp_path / "c")), tok, 0)
    sampler = Sampler(packed.train.shape[0], 0, shuffle=False)
    batch = micro_batch(packed, sampler, [0, 1])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"][0].tolist() == position_ids_of(packed.train_flags[0])
    assert sum(packed.label_counts(sampler.sample_ids([0, 1]))) == int((batch["labels"][:, 1:] != -100).sum())
    faults = FaultInjector(FaultConfig(), rank=0, vocab=len(tok))
    faults.poisoned = [[sampler.sample_ids([1])[0], sampler.sample_ids([1])[0] + 1]]
    poisoned = micro_batch(packed, sampler, [0, 1], faults)
    mask = batch["labels"][1] != -100
    assert torch.equal(poisoned["labels"][1][mask], poisoned["input_ids"][1][mask])
    assert not torch.equal(poisoned["input_ids"][1], batch["input_ids"][1])
    assert torch.equal(poisoned["labels"][1] != -100, mask) and torch.equal(poisoned["input_ids"][0], batch["input_ids"][0])


def position_ids_of(flags) -> list[int]:
    out, pos = [], 0
    for f in flags.tolist():
        pos = 0 if f & 2 else pos + 1
        out.append(pos)
    return out


def test_datasets_progress_bars_are_off_only_around_a_small_local_load(tmp_path, monkeypatch):
    # A first run's "Downloading data" of a local file reads as network work; large data keeps its bars.
    f = tmp_path / "a.txt"
    f.write_text("hello\n")
    assert not datasets.are_progress_bars_disabled()
    with data._local_load([f]):
        assert datasets.are_progress_bars_disabled()
    assert not datasets.are_progress_bars_disabled()
    monkeypatch.setattr(data, "_QUIET_LOAD_BYTES", 1)
    with data._local_load([tmp_path]):
        assert not datasets.are_progress_bars_disabled()
