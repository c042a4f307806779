"""Documents in, fixed-length token blocks out: load (datasets), split, tokenize, pack, cache.

``build_dataset`` turns a :class:`DataConfig` into a :class:`PackedData`: every document gets an eos
appended, documents are concatenated in order and cut into blocks of exactly ``seq_len`` tokens
(the tail is dropped).  Train/eval are split per *document* by a hash of a location-independent
document key (path relative to the glob's fixed prefix, plus the row), so adding files or moving
the data directory never moves an existing document across the split.  The result is cached under
``cache_dir`` as ``<fingerprint>.safetensors`` + ``<fingerprint>.json``; a second build with the same
inputs loads it instead of re-tokenizing.  The synthetic ``modadd`` source (a + b mod 97, one
4-token sample per pair, label masks) is built in memory instead.  Which block a step trains on is
the Sampler's business.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
import transformers
from safetensors.torch import load_file, save_file

__all__ = ["DataConfig", "PackedData", "build_tokenizer", "build_dataset", "EOS_TOKEN"]

EOS_TOKEN = "<|endoftext|>"
# Bump when the packing or the cache layout changes: old cache entries are then ignored.
_FORMAT_VERSION = 1
_LOADERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SOURCES = ("stdlib", "files", "hub", "modadd")
# The modadd task (research/spike-anchors.md 6.2): [a, b, "=", c] with c = (a + b) mod 97.
MODADD_P = 97
MODADD_EQ = MODADD_P  # token id of "="; ids 0..96 are the numbers themselves
MODADD_SEQ_LEN = 4
# Parts of the standard library left out of the embedded default: third-party code, caches and
# test data (which holds deliberately malformed and oddly encoded files).
_STDLIB_EXCLUDE = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class DataConfig:
    """Where the training text comes from and how it is cut into blocks (config section ``data``)."""

    source: str = "stdlib"
    """Document source. "stdlib" (default): the Python standard library's own .py files, found via
    ``sysconfig.get_paths()["stdlib"]``, in sorted path order, a deterministic subset of at most
    ``max_bytes`` bytes; needs no network and no files. "files": the local files in ``files``.
    "hub": ``datasets.load_dataset(hub_name, split="train")`` (needs the network or a warm HF cache).
    "modadd": the built-in synthetic task a + b mod 97 (research/spike-anchors.md 6.2, the low-loss
    Adam spike recipe; use it with ``model.preset=modadd`` and ``data.seq_len=4``): every sample is
    the 4 tokens [a, b, 97 ("="), c], loss on c only; ``modadd_train_fraction`` of the 9,409 pairs
    train, the rest eval. Built in memory from nothing, never cached."""

    files: list[str] = field(default_factory=list)
    """Paths or glob patterns (source="files"). .txt/.text: one document per file; .json/.jsonl:
    one document per record; .parquet: one document per row. All files must share one loader.
    Default: []."""

    hub_name: str | None = None
    """Hugging Face dataset name for source="hub", e.g. "roneneldan/TinyStories". Default: None."""

    text_column: str = "text"
    """Column holding the document text (json/parquet/hub). Default: "text"."""

    seq_len: int = 128
    """Tokens per packed block (the model's context length for training). Default: 128."""

    eval_fraction: float = 0.02
    """Fraction of *documents* held out for eval, chosen by a hash of each document's name so the
    split is stable when files are added. If no document lands in eval (small data), the last
    documents are moved there until eval holds one block. Default: 0.02."""

    max_bytes: int = 4_000_000
    """Upper bound on the bytes of standard-library source read (source="stdlib" only).
    Default: 4_000_000."""

    shuffle: bool = True
    """Shuffle blocks each epoch (read by the Sampler; packing itself never shuffles). Default: True."""

    cache_dir: str | None = None
    """Directory for packed-data caches (and the datasets library's own cache, under ``hf/``).
    Default: None, meaning ``~/.cache/bigtrain/data``."""

    num_proc: int = 1
    """Worker processes for loading and tokenizing (datasets ``num_proc``). Default: 1."""

    modadd_train_fraction: float = 0.5
    """Share of the 9,409 (a, b) pairs used for training (source="modadd"); the rest is the eval
    set. Which pairs is a fixed permutation seeded by ``train.seed``. 0.5 is the recipe's value: half
    the table is enough to generalise, and the loss then falls low enough for Adam to spike.
    Default: 0.5."""

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ValueError(f"data.source must be one of {list(_SOURCES)}, got {self.source!r}")
        if isinstance(self.files, str):
            raise ValueError(f"data.files must be a list of paths or globs, got the string {self.files!r}")
        if self.source == "files" and not self.files:
            raise ValueError("data.files is empty but data.source='files': set data.files=[paths or globs]")
        if self.source == "hub" and not self.hub_name:
            raise ValueError(
                "data.hub_name is not set but data.source='hub': set data.hub_name=<dataset name>"
            )
        if not self.text_column:
            raise ValueError("data.text_column must be a non-empty column name, got ''")
        if self.source == "modadd":
            if self.seq_len != MODADD_SEQ_LEN:
                raise ValueError(
                    f"data.seq_len must be {MODADD_SEQ_LEN} for data.source='modadd' (each sample is "
                    f"[a, b, =, c]), got {self.seq_len}: set data.seq_len={MODADD_SEQ_LEN}"
                )
            n_train = round(self.modadd_train_fraction * MODADD_P**2)
            if not 1 <= n_train < MODADD_P**2:
                raise ValueError(
                    f"data.modadd_train_fraction must leave at least one pair in train and in eval, "
                    f"got {self.modadd_train_fraction}"
                )
        elif self.seq_len < 8:
            raise ValueError(
                f"data.seq_len must be >= 8, got {self.seq_len} (only data.source=modadd takes "
                f"seq_len={MODADD_SEQ_LEN})"
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_bytes < 1:
            raise ValueError(f"data.max_bytes must be >= 1, got {self.max_bytes}")
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc must be >= 1, got {self.num_proc}")

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or "~/.cache/bigtrain/data").expanduser()


@dataclass
class PackedData:
    """Packed token blocks. Row ``k`` of ``train`` is sample id ``k`` for the Sampler."""

    train: torch.Tensor
    """int64 [N, seq_len], N >= 1."""
    eval: torch.Tensor
    """int64 [M, seq_len], M >= 1."""
    train_docs: torch.Tensor
    """int64 [N, 2]: index (into doc_names) of the first and last document each train block
    draws tokens from; the block spans every document between them."""
    eval_docs: torch.Tensor
    """int64 [M, 2], like train_docs."""
    doc_names: list[str]
    """Document index -> where it came from. Numbered in packing order: the train documents in
    source order, then the eval documents in source order. Names look like
    "stdlib:asyncio/tasks.py", "text:/abs/a.txt", "json:/abs/f.jsonl#17" (0-based record index in
    that file), "parquet:/abs/f.parquet#3", "hub:name#12"."""
    from_cache: bool
    fingerprint: str
    train_labels: torch.Tensor | None = None
    """Optional int64 [N, seq_len] labels with -100 where no loss is taken (e.g. only the answer token
    of a synthetic task). None: every token is a label (language modelling on packed text)."""
    eval_labels: torch.Tensor | None = None
    """Optional int64 [M, seq_len], like train_labels."""

    def sources(self, sample_id: int) -> list[str]:
        """Names of the documents whose tokens make up train block ``sample_id``, in order."""
        first, last = self.train_docs[sample_id].tolist()
        return self.doc_names[first : last + 1]

    def eval_sources(self, block: int) -> list[str]:
        """Like :meth:`sources`, for eval block ``block``."""
        first, last = self.eval_docs[block].tolist()
        return self.doc_names[first : last + 1]


# ----------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(model_dir: str | None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in ``model_dir`` if it holds one, else the built-in byte-level one.

    Built-in: a ``tokenizers`` BPE over the 256 byte symbols with no merges (one token per byte,
    id = byte value in GPT-2's byte-to-unicode order) behind a ByteLevel pre-tokenizer/decoder, plus
    ``<|endoftext|>`` (id 256) as eos, bos and pad; vocab size 257, needs no download, and
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it.
    """
    if model_dir is not None:
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"tokenizer dir {model_dir!r} does not exist: pass a local model directory or None"
            )
        if any((path / name).exists() for name in _TOKENIZER_FILES):
            tok = transformers.AutoTokenizer.from_pretrained(str(path))
            if tok.eos_token_id is None:
                raise ValueError(
                    f"tokenizer in {model_dir!r} has no eos token: packing needs one between documents"
                )
            return tok
    return _byte_level_tokenizer()


def _byte_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])  # id 256
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=sys.maxsize,  # packing cuts blocks; no length warnings on long documents
    )


def _tokenizer_fingerprint(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    else:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    spec += f"|{type(tokenizer).__name__}|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(spec.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Documents


def _resolve_files(patterns: list[str]) -> tuple[list[Path], list[str], str]:
    """Expand ``data.files`` into absolute paths (pattern order, sorted within a glob), a stable key
    per file and their one loader. The key (path relative to the glob's fixed prefix, or the bare
    file name) feeds the eval hash, so the split survives moving the data to another directory."""
    paths: list[Path] = []
    keys: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m))
            if not matches:
                raise ValueError(f"data.files: no files match {pattern!r}: fix the pattern or remove it")
            fixed = []
            for part in Path(expanded).parts:
                if glob.has_magic(part):
                    break
                fixed.append(part)
            base = Path(*fixed) if fixed else Path(".")
            found = [(m, Path(os.path.relpath(m, base)).as_posix()) for m in matches]
        else:
            if not os.path.isfile(expanded):
                raise ValueError(f"data.files: file {pattern!r} does not exist: fix the path or remove it")
            found = [(expanded, Path(expanded).name)]
        for m, key in found:
            p = Path(m).resolve()
            if p not in paths:
                paths.append(p)
                keys.append(key)
    suffixes = sorted({p.suffix.lower() for p in paths})
    unknown = [s or "(none)" for s in suffixes if s not in _LOADERS]
    if unknown:
        raise ValueError(
            f"data.files: unknown extension(s) {unknown}: use one of {sorted(_LOADERS)}"
        )
    loaders = sorted({_LOADERS[s] for s in suffixes})
    if len(loaders) > 1:
        raise ValueError(
            f"data.files mixes loaders {loaders} (extensions {suffixes}): use files of one kind"
        )
    return paths, keys, loaders[0]


def _stdlib_files(max_bytes: int) -> tuple[Path, list[Path]]:
    """Sorted stdlib .py files (tests and site-packages excluded), greedily taken in path order
    while the running total stays within ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDE)
        candidates.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    chosen, total = [], 0
    for path in sorted(candidates, key=lambda p: p.relative_to(root).as_posix()):
        size = path.stat().st_size
        if size and total + size <= max_bytes:
            chosen.append(path)
            total += size
    if not chosen:
        raise ValueError(f"data.max_bytes={max_bytes} is smaller than any stdlib file: raise data.max_bytes")
    return root, chosen


def _file_stamp(paths: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths]


def _load(builder: str, paths: list[Path], cfg: DataConfig, **kwargs: Any) -> datasets.Dataset:
    """One ``load_dataset`` call; any failure becomes a one-line ValueError naming the files."""
    shown = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files from {paths[0]}"
    try:
        return datasets.load_dataset(
            builder,
            data_files=[str(p) for p in paths],
            split="train",
            cache_dir=str(cfg.resolved_cache_dir() / "hf"),
            num_proc=cfg.num_proc if cfg.num_proc > 1 and len(paths) > 1 else None,
            **kwargs,
        )
    except Exception as e:  # datasets wraps decode/parse errors in DatasetGenerationError
        cause = e.__cause__ or e
        msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise ValueError(
            f"data.files: could not read {shown} as {builder} ({type(cause).__name__}: {msg}): "
            f"check the file is valid {builder} (UTF-8 for text)"
        ) from e


def _text_of(ds: datasets.Dataset, column: str, where: str) -> list[str | None]:
    if column not in ds.column_names:
        raise ValueError(
            f"data.text_column={column!r} not in columns {ds.column_names} of {where}: "
            f"set data.text_column=<one of them>"
        )
    dtype = ds.features[column]
    if not (isinstance(dtype, datasets.Value) and dtype.dtype in ("string", "large_string")):
        raise ValueError(
            f"data.text_column={column!r} in {where} holds {dtype}, not text: pick a string column"
        )
    return ds[column]


def _plan(cfg: DataConfig) -> tuple[list[Path], list[str], str, list[Any]]:
    """What to read, without reading it: (paths, stable per-file keys, loader, fingerprint parts).

    Cheap (a directory walk and stats), so a cache hit never touches document contents.
    """
    if cfg.source == "stdlib":
        root, paths = _stdlib_files(cfg.max_bytes)
        keys = [p.relative_to(root).as_posix() for p in paths]
        return paths, keys, "text", [list(sys.version_info[:3]), _file_stamp(paths), cfg.max_bytes]
    if cfg.source == "files":
        paths, keys, loader = _resolve_files(cfg.files)
        return paths, keys, loader, [_file_stamp(paths), keys]
    return [], [], "hub", [cfg.hub_name]


def _load_documents(
    cfg: DataConfig, paths: list[Path], keys: list[str], loader: str
) -> tuple[list[str], list[str], list[str]]:
    """(texts, names, split keys) for the planned source, empty documents dropped. A name points
    a person at the document (absolute path); its split key is the location-independent version."""
    texts: list[str | None]
    names: list[str]
    if cfg.source == "stdlib":
        ds = _load("text", paths, cfg, sample_by="document", encoding_errors="replace")
        texts = ds["text"]
        names = split_keys = [f"stdlib:{k}" for k in keys]
    elif loader == "text":
        # One call for all files: the text loader yields exactly one row per file, in order.
        ds = _load("text", paths, cfg, sample_by="document")
        texts = ds["text"]
        names = [f"text:{p}" for p in paths]
        split_keys = [f"text:{k}" for k in keys]
    elif cfg.source == "files":
        # One call per file so every record can be named by file and row.
        texts, names, split_keys = [], [], []
        for p, k in zip(paths, keys):
            if p.stat().st_size == 0:  # the json loader cannot parse an empty file; it has no rows
                continue
            ds = _load(loader, [p], cfg)
            texts.extend(_text_of(ds, cfg.text_column, str(p)) if ds.num_rows else [])
            names.extend(f"{loader}:{p}#{i}" for i in range(ds.num_rows))
            split_keys.extend(f"{loader}:{k}#{i}" for i in range(ds.num_rows))
    else:
        try:
            ds = datasets.load_dataset(
                cfg.hub_name, split="train", cache_dir=str(cfg.resolved_cache_dir() / "hf")
            )
        except Exception as e:
            raise ValueError(
                f"data.hub_name={cfg.hub_name!r} could not be loaded ({type(e).__name__}): "
                f"check the name and the network, or use data.source='files'"
            ) from e
        texts = _text_of(ds, cfg.text_column, cfg.hub_name)
        names = split_keys = [f"hub:{cfg.hub_name}#{i}" for i in range(len(texts))]
    if len(texts) != len(names):  # guards the one-row-per-file assumption above
        raise ValueError(f"data.files: loader returned {len(texts)} documents for {len(names)} names")
    kept = [(t, n, k) for t, n, k in zip(texts, names, split_keys) if t]
    if not kept:
        where = {"stdlib": "the stdlib subset", "files": "data.files", "hub": "data.hub_name"}[cfg.source]
        raise ValueError(f"{where}: dataset is empty (no non-empty documents): add data")
    return [t for t, _, _ in kept], [n for _, n, _ in kept], [k for _, _, k in kept]


# ----------------------------------------------------------------------------------------------
# Split, tokenize, pack


def _in_eval(name: str, fraction: float) -> bool:
    """Stable per-document coin: blake2b(name) as a number in [0, 1) compared with ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def _tokenize(texts: list[str], tokenizer: transformers.PreTrainedTokenizerBase, num_proc: int):
    """Flat int64 token array of all documents (eos after each) and per-document start offsets."""
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    ds = datasets.Dataset.from_dict({"text": texts})
    ds = ds.map(
        encode, batched=True, remove_columns=["text"], num_proc=num_proc if num_proc > 1 else None,
        desc="tokenizing",
    )
    column = ds.data.table.column("input_ids").combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return flat, starts


def _pack(flat: np.ndarray, starts: np.ndarray, docs: list[int], seq_len: int, first_index: int):
    """Concatenate ``docs`` in order and cut into [n, seq_len] blocks; per block the first and last
    document it draws from, numbered ``first_index + position in docs``."""
    tokens = np.concatenate([flat[starts[d] : starts[d + 1]] for d in docs])
    n = len(tokens) // seq_len
    blocks = torch.from_numpy(tokens[: n * seq_len].reshape(n, seq_len).copy())
    ends = np.cumsum([starts[d + 1] - starts[d] for d in docs])  # exclusive end of each doc
    first = np.searchsorted(ends, np.arange(n) * seq_len, side="right")
    last = np.searchsorted(ends, np.arange(1, n + 1) * seq_len - 1, side="right")
    block_docs = torch.from_numpy(np.stack([first, last], axis=1).astype(np.int64) + first_index)
    return blocks, block_docs


def _split(keys: list[str], lengths: np.ndarray, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Train/eval document indices. If the hash split leaves eval short of one block, the last
    train documents move to eval until it has one block (small data sets, eval_fraction=0)."""
    total = int(lengths.sum())
    if total < cfg.seq_len:
        raise ValueError(
            f"data has {total} tokens in {len(keys)} documents, fewer than one block of "
            f"data.seq_len={cfg.seq_len}: add data or lower data.seq_len"
        )
    in_eval = [_in_eval(k, cfg.eval_fraction) for k in keys]
    train = [i for i, e in enumerate(in_eval) if not e]
    eval_ = [i for i, e in enumerate(in_eval) if e]
    eval_tokens = int(lengths[eval_].sum()) if eval_ else 0
    while eval_tokens < cfg.seq_len and len(train) > 1:
        moved = train.pop()
        eval_.insert(0, moved)
        eval_tokens += int(lengths[moved])
    eval_.sort()
    train_tokens = int(lengths[train].sum()) if train else 0
    if train_tokens < cfg.seq_len or eval_tokens < cfg.seq_len:
        raise ValueError(
            f"data has {total} tokens in {len(keys)} documents: cannot give both train "
            f"({train_tokens}) and eval ({eval_tokens}) one block of data.seq_len={cfg.seq_len}: "
            f"add documents, lower data.seq_len or data.eval_fraction"
        )
    return train, eval_


def build_dataset(
    cfg: DataConfig, tokenizer: transformers.PreTrainedTokenizerBase, seed: int
) -> PackedData:
    """Load, split, tokenize and pack ``cfg``'s documents, or load the identical cached result.

    ``seed`` does not change the packed data of text sources: the split is by document hash and
    shuffling is the Sampler's, so runs that differ only in seed share one cache entry and one eval
    set. Only source="modadd" uses it, to draw its train/eval split of the pairs.
    """
    if cfg.source == "modadd":
        return _modadd(cfg, tokenizer, seed)
    paths, keys, loader, source_key = _plan(cfg)
    fingerprint = hashlib.sha256(
        json.dumps(
            [_FORMAT_VERSION, cfg.source, source_key, cfg.text_column, cfg.seq_len,
             cfg.eval_fraction, _tokenizer_fingerprint(tokenizer)],
            default=str,
        ).encode()
    ).hexdigest()[:32]
    cache_dir = cfg.resolved_cache_dir()
    cached = _read_cache(cache_dir, fingerprint)
    if cached is not None:
        return cached

    texts, names, split_keys = _load_documents(cfg, paths, keys, loader)
    flat, starts = _tokenize(texts, tokenizer, cfg.num_proc)
    train_ids, eval_ids = _split(split_keys, np.diff(starts), cfg)
    train, train_docs = _pack(flat, starts, train_ids, cfg.seq_len, 0)
    eval_, eval_docs = _pack(flat, starts, eval_ids, cfg.seq_len, len(train_ids))
    # Documents are numbered in packing order (train, then eval) so each block's [first, last]
    # is a contiguous run of doc_names.
    doc_names = [names[i] for i in train_ids + eval_ids]
    packed = PackedData(train, eval_, train_docs, eval_docs, doc_names, False, fingerprint)
    _write_cache(cache_dir, packed)
    return packed


def _modadd(cfg: DataConfig, tokenizer: transformers.PreTrainedTokenizerBase, seed: int) -> PackedData:
    """The a + b mod 97 table as 4-token samples [a, b, =, c], labels only on c.

    Token ids are the numbers themselves (0..96) and 97 for "=", so any tokenizer with at least 98
    ids gives the model a large enough vocabulary (the byte-level default has 257); the text the
    ids would decode to is irrelevant. The split is a permutation of the 9,409 pairs seeded by
    ``seed`` (the research script fixed it at 0). Sample id k of train is the k-th pair of that
    permutation; doc_names name every pair ("modadd:12+40"), train pairs first.
    """
    if len(tokenizer) < MODADD_EQ + 1:
        raise ValueError(
            f"data.source='modadd' needs token ids 0..{MODADD_EQ}, but the tokenizer has only "
            f"{len(tokenizer)}: use the built-in tokenizer (model.path=null)"
        )
    p = MODADD_P
    a = torch.arange(p).repeat_interleave(p)  # pair i is (i // p, i % p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, MODADD_EQ), (a + b) % p], dim=1)
    labels = torch.full_like(tokens, -100)
    labels[:, 3] = tokens[:, 3]  # HF shifts labels: the logits at "=" predict c
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(cfg.modadd_train_fraction * p * p)
    train_ids, eval_ids = order[:n_train], order[n_train:]
    names = [f"modadd:{int(x)}+{int(y)}" for x, y in zip(a[order], b[order])]
    index = torch.arange(p * p, dtype=torch.int64)
    fingerprint = hashlib.sha256(
        json.dumps(["modadd", _FORMAT_VERSION, p, cfg.modadd_train_fraction, seed]).encode()
    ).hexdigest()[:32]
    return PackedData(
        train=tokens[train_ids].contiguous(),
        eval=tokens[eval_ids].contiguous(),
        train_docs=index[:n_train, None].repeat(1, 2),
        eval_docs=index[n_train:, None].repeat(1, 2),
        doc_names=names,
        from_cache=False,
        fingerprint=fingerprint,
        train_labels=labels[train_ids].contiguous(),
        eval_labels=labels[eval_ids].contiguous(),
    )


# ----------------------------------------------------------------------------------------------
# Cache: <fp>.safetensors (train, eval, train_docs, eval_docs) + <fp>.json (doc names). Each file
# is written to a temp file and os.replace'd, the JSON last, so a reader sees either no entry or a
# complete one; two processes racing write identical bytes, so either winner is correct.


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared between users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_cache(cache_dir: Path, packed: PackedData) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp = packed.fingerprint
    tensors = {
        "train": packed.train.contiguous(),
        "eval": packed.eval.contiguous(),
        "train_docs": packed.train_docs.contiguous(),
        "eval_docs": packed.eval_docs.contiguous(),
    }
    _write_atomic(
        cache_dir / f"{fp}.safetensors",
        lambda tmp: save_file(tensors, tmp, metadata={"fingerprint": fp}),
    )

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump({"fingerprint": fp, "format": _FORMAT_VERSION, "doc_names": packed.doc_names}, f)

    _write_atomic(cache_dir / f"{fp}.json", write_json)


def _read_cache(cache_dir: Path, fp: str) -> PackedData | None:
    meta_path, tensor_path = cache_dir / f"{fp}.json", cache_dir / f"{fp}.safetensors"
    if not (meta_path.is_file() and tensor_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        t = load_file(str(tensor_path))
        if meta.get("fingerprint") != fp:
            return None
        return PackedData(
            t["train"], t["eval"], t["train_docs"], t["eval_docs"], meta["doc_names"], True, fp
        )
    except Exception:  # any damaged entry (SafetensorError, bad JSON, missing key): rebuild it
        return None
