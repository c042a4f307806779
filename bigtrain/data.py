"""Documents in, fixed-length token blocks out, prepared once on disk and memory-mapped by every rank.

``build_dataset`` turns a :class:`DataConfig` into a :class:`PackedData`. Preparation streams the
documents from disk through ``datasets`` (load, then ``map`` with ``data.num_proc`` workers writing
Arrow files), splits train/eval per document by a hash of a location-independent key, and packs:

- ``format=text``: every document gets an eos, documents are concatenated in order and cut into
  blocks of exactly ``seq_len`` tokens (the tail is dropped); every token is a label.
- ``format=chat`` / ``prompt_completion``: each example is tokenized with a loss mask (assistant
  turns / the completion), examples are packed whole into blocks in order (next-fit; the rest of a
  block is padding) or one per block (``packing=false``); position ids restart at every example, so
  transformers' attention masks keep packed examples apart. An example longer than a block is
  truncated at its end or dropped (``overlong``), never split across blocks.

The result is a directory ``<cache_dir>/<fingerprint>/`` of ``.npy`` files (numpy's own format;
tokens as uint16 or uint32 by vocabulary size) opened with ``np.load(mmap_mode="r")``: a rank's
memory does not grow with the corpus. The fingerprint hashes everything that changes the content
(location-independent file keys with sizes and mtimes, hub revision/split or a saved dataset's own
fingerprint, format, columns, seq_len, split, tokenizer, chat template). Preparation holds an
exclusive ``fcntl`` lock on ``<fingerprint>.lock``; other processes block on the lock (not in a
collective, so no distributed timeout applies), then map the finished directory, which appears by
one atomic rename. On a shared filesystem that refuses ``flock`` (NFS mounted ``nolock``, some FUSE
mounts) every process prepares in its own work directory (host, pid and a random suffix in the name,
as pids repeat across the containers of a job) and the first rename wins; the others map that
entry, with a warning that says to run ``bigtrain prepare`` ahead of the job.

``data.source`` names an entry of ``SOURCES``: the built-in stdlib, files and hub go through the
preparation above; another source (a benchmark's synthetic task) is added with ``register_source`` by
a launch script before the config is parsed, and builds its ``PackedData`` its own way. bigtrain does
not import such sources, so it does not ship them.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import transformers

log = logging.getLogger("bigtrain")

__all__ = ["DataConfig", "PackedData", "build_tokenizer", "build_dataset", "register_source", "show_examples",
           "EOS_TOKEN"]

EOS_TOKEN = "<|endoftext|>"
# Bump when the packing or the cache layout changes: old cache entries are then ignored.
_FORMAT_VERSION = 2
_LOADERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_FORMATS = ("text", "chat", "prompt_completion")
# Parts of the standard library left out of the embedded default: third-party code, caches and
# test data (which holds deliberately malformed and oddly encoded files).
_STDLIB_EXCLUDE = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# Per-token flag bits stored beside the tokens (chat / prompt_completion, or a registered source).
LABEL = 1  # this token is a loss target (its label is the token itself; the model shifts)
START = 2  # an example (or the padding after the last one) starts here: position ids restart
# Per-document status written by the tokenizing map.
_KEPT, _TRUNCATED, _DROPPED_LONG, _DROPPED_NO_LABEL = 0, 1, 2, 3


@dataclass
class DataConfig:
    """Where the training text comes from and how it is cut into blocks (config section ``data``)."""

    source: str = "stdlib"
    """Document source. "stdlib" (default): the Python standard library's own .py files, found via
    ``sysconfig.get_paths()["stdlib"]``, in sorted path order, a deterministic subset of at most
    ``max_bytes`` bytes; needs no network and no files. "files": the local files in ``files``.
    "hub": a Hugging Face dataset: ``hub_name`` is a hub name (``load_dataset``; needs the network or
    a warm HF cache), a directory written by ``save_to_disk``, or a local dataset repository
    directory (data files ``load_dataset`` understands); ``split`` picks the split.
    Any other name must have been added with ``bigtrain.data.register_source`` by a launch script."""

    files: list[str] = field(default_factory=list)
    """Paths or glob patterns (source="files"). .txt/.text: one document per file; .json/.jsonl:
    one document per record; .parquet: one document per row. All files must share one loader.
    Default: []."""

    hub_name: str | None = None
    """source="hub": a dataset name such as "roneneldan/TinyStories", or a local directory (a
    ``save_to_disk`` dataset or a dataset repository). Default: None."""

    split: str = "train"
    """Split to read for source="hub" (for a ``save_to_disk`` DatasetDict, the split's name).
    Bigtrain makes its own train/eval split out of it by ``eval_fraction``. Default: "train"."""

    revision: str | None = None
    """Hub dataset revision (branch, tag or commit) for source="hub"; part of the cache key. Pin a
    commit for reproducible runs. Default: None (the hub's default branch)."""

    format: str = "text"
    """How a row becomes tokens and labels. "text": one document per row/file in ``text_column``,
    packed end to end, every token a label. "chat": ``messages_column`` holds a list of
    {"role", "content"} dicts, rendered with the tokenizer's own chat template
    (``apply_chat_template``); loss on assistant turns only. "prompt_completion": the
    ``prompt_column`` and ``completion_column`` strings; loss on the completion (and the eos after
    it) only. Default: "text"."""

    text_column: str = "text"
    """Column holding the document text (format=text; json/parquet/hub). Default: "text"."""

    messages_column: str = "messages"
    """Column holding the conversation (format=chat). Default: "messages"."""

    prompt_column: str = "prompt"
    """Column holding the prompt (format=prompt_completion). Default: "prompt"."""

    completion_column: str = "completion"
    """Column holding the completion (format=prompt_completion). Default: "completion"."""

    packing: bool = True
    """format=chat/prompt_completion: pack several examples into one block (position ids restart at
    each, so they do not attend to each other); false: one example per block, padded. Default: True."""

    overlong: str = "truncate"
    """format=chat/prompt_completion: an example longer than ``seq_len`` is "truncate"d (its end is
    cut; dropped if no label token is left) or "drop"ped. Both are counted in the preparation
    report. Default: "truncate"."""

    seq_len: int = 128
    """Tokens per packed block (the model's context length for training). Default: 128."""

    eval_fraction: float = 0.02
    """Fraction of *documents* held out for eval, chosen by a hash of each document's name so the
    split is stable when files are added. If no document lands in eval (small data), the last
    documents are moved there until eval holds one block. A single text document is split inside:
    its last ``max(eval_fraction x tokens, seq_len)`` tokens are eval. Default: 0.02."""

    max_bytes: int = 4_000_000
    """Upper bound on the bytes of standard-library source read (source="stdlib" only).
    Default: 4_000_000."""

    shuffle: bool = True
    """Shuffle blocks each epoch (read by the Sampler; packing itself never shuffles). Default: True."""

    cache_dir: str | None = None
    """Directory for prepared data (and the datasets library's own cache, under ``hf/``). Put it on
    a filesystem every rank of a node sees; on a shared filesystem one process prepares for the
    whole job. Default: None, meaning ``~/.cache/bigtrain/data``."""

    num_proc: int = 1
    """Worker processes for loading and tokenizing (datasets ``num_proc``). Default: 1."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {list(SOURCES)}, got {self.source!r} (a launch script "
                             "adds one with bigtrain.data.register_source before calling bigtrain.cli.main())")
        if self.format not in _FORMATS:
            raise ValueError(f"data.format must be one of {list(_FORMATS)}, got {self.format!r}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        if isinstance(self.files, str):
            raise ValueError(f"data.files must be a list of paths or globs, got the string {self.files!r}")
        if self.source == "files" and not self.files:
            raise ValueError("data.files is empty but data.source='files': set data.files=[paths or globs]")
        if self.source == "hub" and not self.hub_name:
            raise ValueError(
                "data.hub_name is not set but data.source='hub': set data.hub_name=<dataset name or directory>"
            )
        for key in ("text_column", "messages_column", "prompt_column", "completion_column", "split"):
            if not getattr(self, key):
                raise ValueError(f"data.{key} must be a non-empty name, got ''")
        if self.source == "stdlib" and self.format != "text":
            raise ValueError(f"data.source='stdlib' is plain text: set data.format=text (got {self.format!r}) "
                             "or point data.source at your own files")
        SOURCES[self.source].check(self)  # what the source needs of seq_len and the other keys
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_bytes < 1:
            raise ValueError(f"data.max_bytes must be >= 1, got {self.max_bytes}")
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc must be >= 1, got {self.num_proc}")

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or "~/.cache/bigtrain/data").expanduser()

    def identity(self) -> dict[str, Any]:
        """The settings that define the data, without where it lives: for the run fingerprint that
        a resume is checked against. File patterns and a local ``hub_name`` count by their last
        path component, so moving the data (and editing the paths) keeps a run resumable; the
        prepared cache's own key checks the content."""
        d = {k: v for k, v in vars(self).items() if k not in ("cache_dir", "num_proc")}
        d.update(_RETIRED)
        d["files"] = [Path(os.path.expanduser(f)).name for f in self.files]
        if self.hub_name and Path(os.path.expanduser(self.hub_name)).is_dir():
            d["hub_name"] = Path(os.path.expanduser(self.hub_name)).resolve().name
        return d


# Settings since removed, at the one value they always had: still in the fingerprint, so checkpoints
# saved before their removal stay resumable.
_RETIRED = {"modadd_train_fraction": 0.5}


class DocNames(Sequence):
    """Document index -> name, rendered on demand from small per-document integer arrays (mapped
    from the cache), so millions of documents cost no Python strings. Names look like
    "stdlib:asyncio/tasks.py", "text:/abs/a.txt", "json:/abs/f.jsonl#17" (0-based record index in
    that file), "parquet:/abs/f.parquet#3", "hub:name#12"; a single text document split into train
    and eval gives "text:/abs/a.txt#train-part" and "...#eval-part"."""

    def __init__(self, prefixes: list[str], doc_file: np.ndarray, doc_row: np.ndarray):
        self.prefixes, self.doc_file, self.doc_row = prefixes, doc_file, doc_row

    def __len__(self) -> int:
        return len(self.doc_file)

    def _one(self, i: int) -> str:
        prefix, row = self.prefixes[int(self.doc_file[i])], int(self.doc_row[i])
        return prefix if row == -1 else f"{prefix}#{row}" if row >= 0 else f"{prefix}#{('train', 'eval')[-row - 2]}-part"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._one(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._one(i)


@dataclass
class PackedData:
    """Packed token blocks, read-only numpy arrays (memory-mapped from the cache). Row ``k`` of
    ``train`` is sample id ``k`` for the Sampler; :meth:`batch` turns rows into model inputs."""

    train: np.ndarray
    """uint16/uint32 [N, seq_len], N >= 1."""
    eval: np.ndarray
    """uint16/uint32 [M, seq_len], M >= 1."""
    train_docs: np.ndarray
    """int64 [N, 2]: index (into doc_names) of the first and last document each train block
    draws tokens from; the block spans every document between them. The attribution of a bad
    document to all its blocks: ``np.nonzero((train_docs[:, 0] <= d) & (d <= train_docs[:, 1]))``."""
    eval_docs: np.ndarray
    """int64 [M, 2], like train_docs."""
    doc_names: Sequence[str]
    """Document index -> where it came from (:class:`DocNames`). Numbered in packing order: the
    train documents in source order, then the eval documents in source order."""
    from_cache: bool
    fingerprint: str
    train_flags: np.ndarray | None = None
    """uint8 [N, seq_len] with bits LABEL (a loss target) and START (position ids restart here).
    None: every token is a label and positions run 0..seq_len-1 (format=text)."""
    eval_flags: np.ndarray | None = None
    """uint8 [M, seq_len], like train_flags."""
    stats: dict = field(default_factory=dict)
    """What preparation did: documents, tokens, blocks, truncated/dropped examples, label share."""

    def sources(self, sample_id: int) -> list[str]:
        """Names of the documents whose tokens make up train block ``sample_id``, in order."""
        first, last = (int(v) for v in self.train_docs[sample_id])
        return self.doc_names[first : last + 1]

    def eval_sources(self, block: int) -> list[str]:
        """Like :meth:`sources`, for eval block ``block``."""
        first, last = (int(v) for v in self.eval_docs[block])
        return self.doc_names[first : last + 1]

    def batch(self, rows: Sequence[int], split: str = "train") -> dict[str, torch.Tensor]:
        """Model inputs of these blocks: int64 ``input_ids`` and ``labels`` (-100: no loss), and
        ``position_ids`` restarting at every packed example when the data has flags. Copies only
        these rows out of the memory map."""
        tokens, flags = (self.train, self.train_flags) if split == "train" else (self.eval, self.eval_flags)
        rows = np.asarray(rows, dtype=np.int64)
        x = torch.from_numpy(tokens[rows].astype(np.int64))
        if flags is None:
            return {"input_ids": x, "labels": x}
        f = flags[rows]
        labels = torch.where(torch.from_numpy(f & LABEL != 0), x, -100)
        return {"input_ids": x, "labels": labels, "position_ids": torch.from_numpy(position_ids(f))}

    def label_count(self, rows: Sequence[int], split: str = "train") -> int:
        """Tokens of these blocks that carry a loss after the model's shift (column 0 never does)."""
        flags = self.train_flags if split == "train" else self.eval_flags
        if flags is None:
            return len(rows) * (self.train.shape[1] - 1)
        return int((flags[np.asarray(rows, dtype=np.int64)][:, 1:] & LABEL != 0).sum())

    def label_counts(self, rows: Sequence[int]) -> list[float]:
        """``label_count`` of each training block: the tokens that carry a loss in each sample of a
        global batch (their sum normalises the step's loss; each one turns a sample's loss sum into
        its mean for the attribution). Every rank computes them from the sample ids it already knows:
        no communication, one read of the rows' label flags (GB x T uint8 from the memory map: 4 MB at
        GB 1,024 x 4,096 tokens, the read the global token count always cost). Without flags every
        position but the last carries a loss: nothing is read."""
        if self.train_flags is None:
            return [float(self.train.shape[1] - 1)] * len(rows)
        flags = self.train_flags[np.asarray(rows, dtype=np.int64)][:, 1:]
        return ((flags & LABEL) != 0).sum(1).astype(np.float64).tolist()


def position_ids(flags: np.ndarray) -> np.ndarray:
    """int64 position ids that restart at every START flag: t - (last start at or before t)."""
    cols = np.arange(flags.shape[-1], dtype=np.int64)
    starts = np.where(flags & START != 0, cols, 0)
    return cols - np.maximum.accumulate(starts, axis=-1)


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
            return transformers.AutoTokenizer.from_pretrained(str(path))
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
    spec += f"|{type(tokenizer).__name__}|eos={tokenizer.eos_token_id}|pad={tokenizer.pad_token_id}"
    spec += f"|template={getattr(tokenizer, 'chat_template', None)}"
    return hashlib.sha256(spec.encode()).hexdigest()


def check_tokenizer(cfg: DataConfig, tokenizer: transformers.PreTrainedTokenizerBase, where: str | None) -> None:
    """Refuse a tokenizer that cannot render ``cfg.format`` before any data is read."""
    if cfg.format in ("text", "prompt_completion") and tokenizer.eos_token_id is None:
        ends = "between documents" if cfg.format == "text" else "after each completion, so the model learns to stop"
        raise ValueError(
            f"data.format={cfg.format!r} puts an eos token {ends}, but the tokenizer from "
            f"{where or 'the built-in default'} has none: set eos_token in its tokenizer_config.json (or use "
            "data.format=chat, whose template ends the turns)"
        )
    if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"data.format='chat' renders conversations with the tokenizer's chat template, but the tokenizer "
            f"from {where or 'the built-in default (model.path=null)'} has none: use a model directory whose "
            "tokenizer_config.json (or chat_template.jinja) has a chat_template, or set "
            "data.format=prompt_completion"
        )
    if cfg.format == "chat" and not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "data.format='chat' needs a fast tokenizer (character offsets locate the assistant turns): "
            "save the model with its tokenizer.json"
        )


# ----------------------------------------------------------------------------------------------
# Sources: what to read, without reading it (cheap, so a cache hit never touches the documents)


def _glob(pattern: str) -> list[str]:
    """The files ``pattern`` matches, sorted; ``**`` spans directories. Python's ``glob``, not
    ``datasets.data_files.resolve_pattern``: that one silently skips files a corpus may hold (behind
    a symlinked directory, in a ``__name__`` directory, or named README.md, config.json and the
    like); docs/data.md, "Globs", has the comparison."""
    return sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))


def _resolve_files(patterns: list[str]) -> tuple[list[Path], list[str], str]:
    """Expand ``data.files`` into absolute paths (pattern order, sorted within a glob), a stable key
    per file and their one loader. The key (path relative to the glob's fixed prefix, or the bare
    file name) feeds the eval hash, so the split survives moving the data to another directory."""
    paths: list[Path] = []
    keys: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = _glob(expanded)
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


def _stdlib_globs() -> tuple[Path, list[str]]:
    """The default corpus as files globs: ``<stdlib>/*.py`` and ``<stdlib>/<dir>/**/*.py`` for each
    top-level directory but the excluded ones. One ``<stdlib>/**/*.py`` would name the same files
    but walk site-packages too (1.1 s against 0.03 s here, on every start, cache hit or not)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name not in _STDLIB_EXCLUDE)
    return root, [str(root / "*.py"), *(str(root / d / "**" / "*.py") for d in dirs)]


def _stdlib_files(max_bytes: int) -> tuple[list[Path], list[str]]:
    """The stdlib globs' files (excluded directories left out at any depth) and their keys (paths
    relative to the stdlib directory), greedily taken in key order while the running total stays
    within ``max_bytes``; empty files are skipped."""
    root, patterns = _stdlib_globs()
    found = sorted((Path(m).relative_to(root).as_posix(), Path(m)) for p in patterns for m in _glob(p))
    paths, keys, total = [], [], 0
    for key, path in found:
        if _STDLIB_EXCLUDE.intersection(key.split("/")[:-1]):
            continue
        size = path.stat().st_size
        if size and total + size <= max_bytes:
            paths.append(path)
            keys.append(key)
            total += size
    if not paths:
        raise ValueError(f"data.max_bytes={max_bytes} is smaller than any stdlib file: raise data.max_bytes")
    return paths, keys


def _stamps(paths: list[Path], keys: list[str]) -> list[tuple[str, int, int]]:
    """(location-independent key, size, mtime) per file: moving the data (mv keeps mtimes) keeps the
    cache entry, editing a file invalidates it."""
    return [(k, (st := p.stat()).st_size, st.st_mtime_ns) for p, k in zip(paths, keys)]


@dataclass
class _Plan:
    kind: str
    """"stdlib", "text", "json", "parquet" (files) or "hub"."""
    paths: list[Path]
    keys: list[str]
    """Location-independent key per file: feeds the eval hash and the fingerprint."""
    prefixes: list[str]
    """Display-name prefix per file (absolute paths, for a person); DocNames indexes it."""
    fingerprint: list[Any]


def _saved_dataset_dir(path: Path, split: str) -> Path | None:
    """The ``save_to_disk`` directory of ``split`` under ``path``, or None if ``path`` is not one."""
    if (path / "state.json").is_file():
        return path
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise ValueError(f"data.split={split!r} is not in the saved DatasetDict at {path} (splits {splits}): "
                             f"set data.split=<one of them>")
        return path / split
    return None


def _plan(cfg: DataConfig) -> _Plan:
    if cfg.source == "stdlib":
        paths, keys = _stdlib_files(cfg.max_bytes)  # then loaded like data.files' .txt files
        return _Plan("stdlib", paths, keys, [f"stdlib:{k}" for k in keys],
                     [list(sys.version_info[:3]), _stamps(paths, keys), cfg.max_bytes])
    if cfg.source == "files":
        paths, keys, loader = _resolve_files(cfg.files)
        return _Plan(loader, paths, keys, [f"{loader}:{p}" for p in paths], [loader, _stamps(paths, keys)])
    local = Path(os.path.expanduser(cfg.hub_name))
    prefix = [f"hub:{cfg.hub_name}" if cfg.split == "train" else f"hub:{cfg.hub_name}[{cfg.split}]"]
    if local.is_dir():
        saved = _saved_dataset_dir(local, cfg.split)
        if saved is not None:  # datasets' own content fingerprint, written by save_to_disk
            state = json.loads((saved / "state.json").read_text())
            return _Plan("hub", [saved], [cfg.split], prefix, ["saved", state.get("_fingerprint"), cfg.split])
        files = sorted(p for p in local.rglob("*") if p.is_file() and ".git" not in p.relative_to(local).parts)
        keys = [p.relative_to(local).as_posix() for p in files]
        return _Plan("hub", [local], [cfg.split], prefix, ["repo", _stamps(files, keys), cfg.split])
    return _Plan("hub", [], [cfg.split], prefix, ["hub", cfg.hub_name, cfg.revision, cfg.split])


def _load_error(key: str, shown: str, builder: str, e: Exception, fix: str) -> ValueError:
    cause = e.__cause__ or e  # datasets wraps decode/parse errors in DatasetGenerationError
    msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return ValueError(f"{key}: could not read {shown} as {builder} ({type(cause).__name__}: {msg}): {fix}")


def _load(builder: str, paths: list[Path], cfg: DataConfig, **kwargs: Any) -> datasets.Dataset:
    """One ``load_dataset`` call (Arrow files on disk, memory-mapped); failures name the files."""
    shown = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files from {paths[0]}"
    try:
        with _local_load(paths):
            return datasets.load_dataset(
                builder, data_files=[str(p) for p in paths], split="train",
                cache_dir=str(cfg.resolved_cache_dir() / "hf"),
                num_proc=cfg.num_proc if cfg.num_proc > 1 and len(paths) > 1 else None, **kwargs,
            )
    except Exception as e:
        raise _load_error("data.files", shown, builder, e, f"check the file is valid {builder} (UTF-8 for text)") from e


def _load_hub(cfg: DataConfig, plan: _Plan) -> datasets.Dataset:
    where = f"data.hub_name={cfg.hub_name!r}"
    if plan.fingerprint[0] == "saved":
        ds = datasets.load_from_disk(str(plan.paths[0]))
        if isinstance(ds, datasets.DatasetDict):  # a split directory holds a Dataset; be safe
            ds = ds[cfg.split]
        return ds
    try:
        # A download from the hub keeps its bars: they show real progress.
        with _local_load(plan.paths) if plan.paths else contextlib.nullcontext():
            return datasets.load_dataset(cfg.hub_name if not plan.paths else str(plan.paths[0]), split=cfg.split,
                                         revision=cfg.revision, cache_dir=str(cfg.resolved_cache_dir() / "hf"),
                                         num_proc=cfg.num_proc if cfg.num_proc > 1 else None)
    except Exception as e:
        fix = ("check the directory holds data files datasets can load and data.split names one of its splits"
               if plan.paths else "check the name, data.split, data.revision and the network, or use a local "
               "directory (save_to_disk) or data.source=files")
        raise _load_error(where, f"split {cfg.split!r}", "a dataset", e, fix) from e


@contextlib.contextmanager
def _local_load(paths: list[Path]) -> Iterator[None]:
    """Without datasets' progress bars when ``paths`` (files or directories on this disk) are small:
    its "Downloading data" (local files are not downloaded) and "Generating train split" then finish
    in about a second and read as network work to a newcomer, while bigtrain's own "tokenizing" bar
    shows the part that takes time. Larger data keeps them: converting it to Arrow takes a while."""
    size = sum(f.stat().st_size for p in paths for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    shown = not datasets.are_progress_bars_disabled()
    if size > _QUIET_LOAD_BYTES or not shown:
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


_QUIET_LOAD_BYTES = 256 << 20  # below this, the Arrow conversion is a matter of seconds


def _columns(cfg: DataConfig) -> dict[str, str]:
    """Config key -> column name the format reads."""
    if cfg.format == "chat":
        return {"data.messages_column": cfg.messages_column}
    if cfg.format == "prompt_completion":
        return {"data.prompt_column": cfg.prompt_column, "data.completion_column": cfg.completion_column}
    return {"data.text_column": cfg.text_column}


def _check_columns(ds: datasets.Dataset, cfg: DataConfig, where: str) -> datasets.Dataset:
    for key, column in _columns(cfg).items():
        if column not in ds.column_names:
            raise ValueError(f"{key}={column!r} not in columns {ds.column_names} of {where}: "
                             f"set {key}=<one of them>")
        dtype = ds.features[column]
        is_text = isinstance(dtype, datasets.Value) and dtype.dtype in ("string", "large_string")
        if cfg.format != "chat" and not is_text:
            raise ValueError(f"{key}={column!r} in {where} holds {dtype}, not text: pick a string column")
        if cfg.format == "chat" and not isinstance(dtype, (datasets.List, datasets.LargeList, list)):
            raise ValueError(f"{key}={column!r} in {where} holds {dtype}, not a list of messages: pick the "
                             'column of [{"role": ..., "content": ...}, ...] lists')
    return ds.select_columns(list(_columns(cfg).values()))


def _load_rows(cfg: DataConfig, plan: _Plan) -> tuple[datasets.Dataset, np.ndarray, bool]:
    """All rows as one memory-mapped Dataset holding only the columns the format reads, the first
    row of each file (cumulative, len = files + 1), and whether a row is a whole file."""
    if plan.kind in ("stdlib", "text"):
        # One call for all files: the text loader yields exactly one row per file, in order.
        extra = {"encoding_errors": "replace"} if plan.kind == "stdlib" else {}
        ds = _load("text", plan.paths, cfg, sample_by="document", **extra)
        if ds.num_rows != len(plan.paths):  # guards the one-row-per-file assumption above
            raise ValueError(f"data.files: loader returned {ds.num_rows} documents for {len(plan.paths)} files")
        if cfg.format != "text":
            raise ValueError(f"data.format={cfg.format!r} reads columns, but .txt files have none: use .jsonl "
                             "or .parquet files, or data.format=text")
        return ds, np.arange(len(plan.paths) + 1), True
    if plan.kind == "hub":
        ds = _check_columns(_load_hub(cfg, plan), cfg, f"data.hub_name={cfg.hub_name!r}")
        return ds, np.array([0, ds.num_rows]), False
    parts, counts = [], [0]
    for p in plan.paths:  # one call per file so every record can be named by file and row
        if p.stat().st_size == 0:  # the json loader cannot parse an empty file; it has no rows
            counts.append(0)
            continue
        ds = _load(plan.kind, [p], cfg)
        counts.append(ds.num_rows)
        if ds.num_rows:
            parts.append(_check_columns(ds, cfg, str(p)))
    if not parts:
        raise ValueError("data.files: dataset is empty (no rows): add data")
    return datasets.concatenate_datasets(parts), np.cumsum(counts), False


# ----------------------------------------------------------------------------------------------
# Tokenize: one datasets.map over all rows (num_proc workers, Arrow files on disk)


def _in_eval(name: str, fraction: float) -> bool:
    """Stable per-document coin: blake2b(name) as a number in [0, 1) compared with ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


class _Encoder:
    """The batched map function: row -> tokens, flags, status, eval coin, file and row numbers.
    A class, not a closure, so ``num_proc`` workers receive it pickled."""

    def __init__(self, cfg: DataConfig, tokenizer, plan: _Plan, offsets: np.ndarray, whole_files: bool):
        self.cfg, self.tok, self.offsets, self.whole = cfg, tokenizer, offsets, whole_files
        self.kind, self.keys, self.prefixes = plan.kind, plan.keys, plan.prefixes

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        idx = np.asarray(indices)
        files = np.searchsorted(self.offsets, idx, side="right") - 1
        rows = np.where(self.whole, -1, idx - self.offsets[files])
        out: dict[str, list] = {"input_ids": [], "flags": [], "status": [], "eval": [],
                                "file": files.tolist(), "row": rows.tolist()}
        if self.cfg.format == "text":
            texts = [t or "" for t in batch[self.cfg.text_column]]
            ids = self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
            out["input_ids"] = [x + [self.tok.eos_token_id] if t else [] for x, t in zip(ids, texts)]
            out["flags"] = [[] for _ in texts]
            out["status"] = [_KEPT] * len(texts)
        else:
            for j, (f, r) in enumerate(zip(files.tolist(), rows.tolist())):
                where = f"row {r} of {self.prefixes[f]}"
                ids, labels = (self._chat(batch[self.cfg.messages_column][j], where)
                               if self.cfg.format == "chat" else self._prompt_completion(batch, j, where))
                ids, flags, status = self._fit(ids, labels)
                out["input_ids"].append(ids)
                out["flags"].append(flags)
                out["status"].append(status)
        for f, r in zip(files.tolist(), rows.tolist()):
            key = f"{self.kind}:{self.keys[f]}" + ("" if r < 0 else f"#{r}")
            out["eval"].append(_in_eval(key, self.cfg.eval_fraction))
        return out

    def _missing(self, where: str, key: str, column: str, what: str = "") -> ValueError:
        return ValueError(f"{where} has no {column!r} ({key}){what}: fill it or remove the row")

    def _prompt_completion(self, batch: dict[str, list], j: int, where: str) -> tuple[list[int], list[bool]]:
        cfg = self.cfg
        prompt, completion = batch[cfg.prompt_column][j], batch[cfg.completion_column][j]
        if prompt is None:
            raise self._missing(where, "data.prompt_column", cfg.prompt_column)
        if completion is None:
            raise self._missing(where, "data.completion_column", cfg.completion_column)
        p = self.tok(prompt, add_special_tokens=True, verbose=False)["input_ids"] if prompt else []
        c = self.tok(completion, add_special_tokens=False, verbose=False)["input_ids"] + [self.tok.eos_token_id]
        return p + c, [False] * len(p) + [True] * len(c)

    def _render(self, messages: list[dict], **kwargs: Any) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, **kwargs)

    def _chat(self, messages: Any, where: str) -> tuple[list[int], list[bool]]:
        """Render with the tokenizer's chat template; the labels are the characters each assistant
        turn adds to the rendering of the conversation before it (with the generation prompt),
        mapped to tokens by their character offsets. Works with any template that renders a
        conversation as a prefix of its continuation (TRL's SFT trainer relies on the same)."""
        column = self.cfg.messages_column
        if messages is None:
            raise self._missing(where, "data.messages_column", column)
        if not messages or any(not isinstance(m, dict) or not isinstance(m.get("role"), str)
                               or not isinstance(m.get("content"), str) for m in messages):
            raise self._missing(where, "data.messages_column", column,
                                ' as a non-empty list of {"role": str, "content": str}')
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        full = self._render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self._render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ValueError(
                    f"{where}: the tokenizer's chat template does not render a conversation as a prefix of its "
                    "continuation, so assistant turns cannot be located: use a template without that "
                    "rewriting, or data.format=prompt_completion")
            spans.append((len(before), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        labels = [e > s and any(lo <= s < hi for lo, hi in spans) for s, e in enc["offset_mapping"]]
        return enc["input_ids"], labels

    def _fit(self, ids: list[int], labels: list[bool]) -> tuple[list[int], list[int], int]:
        """Truncate or drop an over-long example; flags with START at 0 (never a label: the token
        before it belongs to another example)."""
        status = _KEPT
        if len(ids) > self.cfg.seq_len:
            if self.cfg.overlong == "drop":
                return [], [], _DROPPED_LONG
            ids, labels, status = ids[: self.cfg.seq_len], labels[: self.cfg.seq_len], _TRUNCATED
        flags = [LABEL if lab else 0 for lab in labels]
        if flags:
            flags[0] = START
        if not any(flags[1:]):
            return [], [], _DROPPED_LONG if status == _TRUNCATED else _DROPPED_NO_LABEL
        return ids, flags, status


def _tokenize(cfg: DataConfig, tokenizer, plan: _Plan, work: Path) -> datasets.Dataset:
    ds, offsets, whole = _load_rows(cfg, plan)
    features = datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")), "flags": datasets.List(datasets.Value("uint8")),
        "status": datasets.Value("int8"), "eval": datasets.Value("bool"), "file": datasets.Value("int32"),
        "row": datasets.Value("int64")})
    return ds.map(
        _Encoder(cfg, tokenizer, plan, offsets, whole), batched=True, batch_size=256, with_indices=True,
        remove_columns=ds.column_names, features=features, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        cache_file_name=str(work / "tokenized.arrow"), writer_batch_size=256, desc="tokenizing",
    )


# ----------------------------------------------------------------------------------------------
# Split and pack, streaming from the tokenized Arrow files into .npy memory maps


def _split(lengths: np.ndarray, coin: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train/eval row indices of the kept rows (lengths > 0). If the hash split leaves eval short of
    one block, the last train documents move to eval until it has one block (small data sets,
    eval_fraction=0)."""
    need = cfg.seq_len if cfg.format == "text" else 1
    kept = lengths > 0
    total = int(lengths.sum())
    if total < need:
        raise ValueError(f"data has {total} tokens in {int(kept.sum())} documents, fewer than one block of "
                         f"data.seq_len={cfg.seq_len}: add data or lower data.seq_len")
    train = np.nonzero(kept & ~coin)[0]
    eval_ = np.nonzero(kept & coin)[0]
    eval_tokens = int(lengths[eval_].sum())
    cut = len(train)
    while eval_tokens < need and cut > 1:
        cut -= 1
        eval_tokens += int(lengths[train[cut]])
    train, eval_ = train[:cut], np.sort(np.concatenate([eval_, train[cut:]]))
    train_tokens = int(lengths[train].sum())
    if train_tokens < need or eval_tokens < need:
        raise ValueError(
            f"data has {total} tokens in {int(kept.sum())} documents: cannot give both train ({train_tokens}) "
            f"and eval ({eval_tokens}) one block of data.seq_len={cfg.seq_len}: add documents, lower "
            f"data.seq_len or data.eval_fraction")
    return train, eval_


def _iter_rows(files: list[str], rows: np.ndarray, flags: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(tokens, flags) of ``rows`` (ascending), read batch by batch from the tokenized Arrow files
    (datasets writes them in Arrow's IPC stream format). Read with plain file reads, not through a
    memory map, so the pages of a batch are freed once it is packed: a map of the whole table would
    keep every page read resident in this process."""
    base, k = 0, 0
    for path in files:
        with pa.OSFile(path) as source:
            for rb in pa.ipc.open_stream(source):
                end = base + rb.num_rows
                hi = int(np.searchsorted(rows, end))
                if hi > k:
                    ids_col, flag_col = rb.column("input_ids"), rb.column("flags")
                    ids_off, ids_val = ids_col.offsets.to_numpy(), ids_col.values.to_numpy()
                    fl_off, fl_val = flag_col.offsets.to_numpy(), flag_col.values.to_numpy()
                    for j in (rows[k:hi] - base).tolist():
                        yield (ids_val[ids_off[j]:ids_off[j + 1]],
                               fl_val[fl_off[j]:fl_off[j + 1]] if flags else None)
                    k = hi
                base = end
                if k == len(rows):
                    return


class _NpyWriter:
    """A .npy file written front to back with plain writes: numpy's own header
    (``np.lib.format.write_array_header_1_0``), then the rows in C order. Writing through
    ``open_memmap`` instead would keep every written page resident in the preparing process."""

    def __init__(self, path: Path, dtype: Any, shape: tuple[int, ...]):
        self.dtype, self.expected, self.written = np.dtype(dtype), int(np.prod(shape)), 0
        self.f = open(path, "wb")
        np.lib.format.write_array_header_1_0(
            self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})

    def write(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self.f.write(values.tobytes())
        self.written += values.size

    def close(self) -> None:
        self.f.close()
        if self.written != self.expected:  # a packing bug, never a short file on disk
            raise RuntimeError(f"{self.f.name}: wrote {self.written} values, expected {self.expected}")


def _first_last(ends: np.ndarray, n_blocks: int, seq_len: int) -> np.ndarray:
    """Per block of a token stream cut every ``seq_len``: first and last document (by exclusive end)."""
    first = np.searchsorted(ends, np.arange(n_blocks) * seq_len, side="right")
    last = np.searchsorted(ends, np.arange(1, n_blocks + 1) * seq_len - 1, side="right")
    return np.stack([first, last], axis=1).astype(np.int64)


def _pack_text(files, rows, lengths, clip, cfg, dtype, out: Path, split: str, doc_base: int) -> dict:
    """Concatenate the documents in order and cut into [n, seq_len] blocks (the tail is dropped)."""
    seq = cfg.seq_len
    if clip is not None:
        lengths = np.array([clip[1] - clip[0]])
    n = int(lengths.sum()) // seq
    tokens, pos = _NpyWriter(out / f"{split}_tokens.npy", dtype, (n, seq)), 0
    for ids, _ in _iter_rows(files, rows, flags=False):
        if clip is not None:
            ids = ids[clip[0]:clip[1]]
        take = min(len(ids), n * seq - pos)
        tokens.write(ids[:take])
        pos += take
        if pos == n * seq:
            break
    tokens.close()
    np.save(out / f"{split}_docs.npy", _first_last(np.cumsum(lengths), n, seq) + doc_base)
    return {"blocks": n, "tokens": n * seq, "label_tokens": n * (seq - 1), "padding_tokens": 0}


def _pack_examples(files, rows, lengths, cfg, dtype, pad: int, out: Path, split: str, doc_base: int) -> dict:
    """Examples whole, in order, next-fit into blocks (or one per block); the rest of a block is
    padding: pad tokens, no label, their own START so they form a separate sequence."""
    seq = cfg.seq_len
    block_of = np.empty(len(lengths), dtype=np.int64)
    b, used = -1, seq
    for i, length in enumerate(lengths.tolist()):
        if not cfg.packing or used + length > seq:
            b, used = b + 1, 0
        block_of[i], used = b, used + length
    n = b + 1
    tokens = _NpyWriter(out / f"{split}_tokens.npy", dtype, (n, seq))
    flags = _NpyWriter(out / f"{split}_flags.npy", np.uint8, (n, seq))
    buf_t, buf_f = np.full(seq, pad, dtype), np.zeros(seq, np.uint8)
    labels = 0

    def flush(used: int) -> int:
        buf_t[used:] = pad
        buf_f[used:] = 0
        if used < seq:
            buf_f[used] = START
        tokens.write(buf_t)
        flags.write(buf_f)
        return int((buf_f[1:] & LABEL != 0).sum())

    current, used = 0, 0
    for i, (ids, fl) in enumerate(_iter_rows(files, rows, flags=True)):
        if block_of[i] != current:
            labels += flush(used)
            current, used = int(block_of[i]), 0
        buf_t[used:used + len(ids)], buf_f[used:used + len(ids)] = ids, fl
        used += len(ids)
    if n:
        labels += flush(used)
    tokens.close()
    flags.close()
    first = np.searchsorted(block_of, np.arange(n), side="left")
    last = np.searchsorted(block_of, np.arange(n), side="right") - 1
    np.save(out / f"{split}_docs.npy", np.stack([first, last], axis=1).astype(np.int64) + doc_base)
    return {"blocks": n, "tokens": n * seq, "label_tokens": labels, "padding_tokens": n * seq - int(lengths.sum())}


def _prepare(cfg: DataConfig, tokenizer, plan: _Plan, fingerprint: str, dest: Path) -> None:
    """Tokenize, split and pack into a temporary directory beside ``dest``, then rename it there
    (atomic): a reader sees no entry or a complete one."""
    t0 = time.time()
    # Unique per process on any node: pids repeat across the containers of a multi-node job.
    work = dest.parent / f".{dest.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (work / "tokenized").mkdir(parents=True)
    try:
        ds = _tokenize(cfg, tokenizer, plan, work / "tokenized")
        table = ds.data.table
        files_arrow = [f["filename"] for f in ds.cache_files]  # in table order (shards of num_proc in order)
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
        status = table.column("status").to_numpy()
        coin = table.column("eval").to_numpy(zero_copy_only=False)
        files, rows_of = table.column("file").to_numpy(), table.column("row").to_numpy()
        if not (lengths > 0).any():
            where = {"stdlib": "the stdlib subset", "files": "data.files", "hub": "data.hub_name"}[cfg.source]
            raise ValueError(f"{where}: dataset is empty (no non-empty documents"
                             f"{'' if cfg.format == 'text' else ' with a label token within data.seq_len'}): add data")
        clip = None
        if cfg.format == "text" and int((lengths > 0).sum()) == 1:
            # One document (a single .txt file): split inside it, the tail is eval.
            (d,) = np.nonzero(lengths > 0)[0]
            n_tok = int(lengths[d])
            n_eval = max(cfg.seq_len, math.ceil(cfg.eval_fraction * n_tok))
            if n_tok - n_eval < cfg.seq_len:
                raise ValueError(f"data has {n_tok} tokens in 1 document: cannot give both train and eval one block "
                                 f"of data.seq_len={cfg.seq_len}: add data or lower data.seq_len")
            train, eval_ = np.array([d]), np.array([d])
            clip = {"train": (0, n_tok - n_eval), "eval": (n_tok - n_eval, n_tok)}
        else:
            train, eval_ = _split(lengths, coin, cfg)
        vocab = max(len(tokenizer), max(tokenizer.all_special_ids or [0]) + 1)
        dtype = np.uint16 if vocab <= 2**16 else np.uint32
        # Padding carries no label and causal attention never lets a real token see the padding after it:
        # any id does; the pad token, else eos, else 0 (a chat tokenizer may have neither).
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        out = {}
        for split, rows, base in (("train", train, 0), ("eval", eval_, len(train))):
            if cfg.format == "text":
                out[split] = _pack_text(files_arrow, rows, lengths[rows], clip and clip[split], cfg, dtype, work, split, base)
            else:
                out[split] = _pack_examples(files_arrow, rows, lengths[rows], cfg, dtype, pad, work, split, base)
        order = np.concatenate([train, eval_])
        doc_row = rows_of[order].copy()
        if clip is not None:
            doc_row[:] = [-2, -3]  # DocNames: "#train-part", "#eval-part"
        np.save(work / "doc_file.npy", files[order].astype(np.int32))
        np.save(work / "doc_row.npy", doc_row.astype(np.int64))
        counts = np.bincount(status, minlength=4)
        stats = {
            "documents": int((lengths > 0).sum()), "rows": int(len(lengths)),
            "train_documents": int(len(train)), "eval_documents": int(len(eval_)),
            "document_tokens": int(lengths.sum()),
            "train_blocks": out["train"]["blocks"], "eval_blocks": out["eval"]["blocks"],
            "train_tokens": out["train"]["tokens"], "eval_tokens": out["eval"]["tokens"],
            "truncated": int(counts[_TRUNCATED]), "dropped_overlong": int(counts[_DROPPED_LONG]),
            "dropped_no_label": int(counts[_DROPPED_NO_LABEL]),
            "label_share": round(out["train"]["label_tokens"] / max(1, out["train"]["tokens"]), 4),
            "padding_share": round(out["train"]["padding_tokens"] / max(1, out["train"]["tokens"]), 4),
            "token_dtype": np.dtype(dtype).name, "prepare_seconds": round(time.time() - t0, 2),
        }
        del ds, table
        shutil.rmtree(work / "tokenized")
        meta = {"fingerprint": fingerprint, "format": _FORMAT_VERSION, "flags": cfg.format != "text",
                "files": len(plan.prefixes), "stats": stats}
        (work / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the entry complete
        try:
            os.replace(work, dest)
        except OSError:
            # Another process renamed its entry first (only without a working lock): use it.
            if not (dest / "meta.json").is_file():
                raise ValueError(f"data.cache_dir: cannot put the prepared data at {dest} (a damaged entry is in the "
                                 "way): remove that directory and run again") from None
            log.warning("data: %s was prepared by another process meanwhile; using it", dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Cache entry: <cache_dir>/<fingerprint>/{train,eval}_{tokens,flags,docs}.npy, doc_{file,row}.npy,
# meta.json. Prepared under an exclusive lock on <cache_dir>/<fingerprint>.lock.


def _read_cache(entry: Path, fingerprint: str, plan: _Plan) -> PackedData | None:
    """The entry mapped read-only (np.load mmap_mode="r": pages come from the page cache, shared by
    every rank of a node), or None if it is missing or damaged."""
    if not (entry / "meta.json").is_file():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("fingerprint") != fingerprint or meta.get("format") != _FORMAT_VERSION \
                or meta.get("files") != len(plan.prefixes):
            return None
        arr = {name: np.load(entry / f"{name}.npy", mmap_mode="r")
               for name in ("train_tokens", "eval_tokens", "train_docs", "eval_docs", "doc_file", "doc_row")
               + (("train_flags", "eval_flags") if meta["flags"] else ())}
        seq = arr["train_tokens"].shape[1]
        if arr["eval_tokens"].shape[1] != seq or arr["train_docs"].shape != (arr["train_tokens"].shape[0], 2) \
                or min(arr["train_tokens"].shape[0], arr["eval_tokens"].shape[0]) < 1:
            return None
        return PackedData(
            arr["train_tokens"], arr["eval_tokens"], arr["train_docs"], arr["eval_docs"],
            DocNames(plan.prefixes, arr["doc_file"], arr["doc_row"]), True, fingerprint,
            arr.get("train_flags"), arr.get("eval_flags"), meta["stats"])
    except Exception:  # any damaged entry (truncated .npy, bad JSON, missing file): rebuild it
        return None


def _abandoned(work: Path, max_age_s: float = 24 * 3600) -> bool:
    """A preparation's work directory whose process is gone: one of this host whose pid is dead, or
    any untouched for a day. Another node's live one must survive: a flock that excludes only the
    processes of one node (Lustre ``localflock``, NFS ``local_lock=flock``) lets two nodes hold it."""
    try:
        host, pid, _ = work.name.split(".tmp-", 1)[1].rsplit("-", 2)
        if host == socket.gethostname():
            os.kill(int(pid), 0)
            return False  # alive on this host
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        pass  # an unparseable name, or a pid owned by another user (alive)
    try:
        return time.time() - work.stat().st_mtime > max_age_s
    except OSError:
        return False


class _Lock:
    """Exclusive ``fcntl.flock`` on a file: blocks until the holder releases it or dies (the kernel
    drops the lock of a dead process, so a killed preparation never leaves a stale lock)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.locked = True
        except OSError as exc:  # ENOLCK / EOPNOTSUPP: NFS without a lock daemon, some FUSE mounts
            self.locked = False
            log.warning("data: %s does not support flock (%s): every process prepares this entry itself and the "
                        "first to finish wins; run `bigtrain prepare` with the job's config once before the job "
                        "to prepare it a single time", self.path.parent, exc.strerror or exc)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.locked:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def data_fingerprint(cfg: DataConfig, tokenizer, plan: _Plan | None = None) -> str:
    plan = plan or _plan(cfg)
    content = [cfg.source, plan.fingerprint]
    content += [cfg.format, _columns(cfg), cfg.seq_len, cfg.eval_fraction, _tokenizer_fingerprint(tokenizer)]
    if cfg.format != "text":
        content += [cfg.packing, cfg.overlong]
    return hashlib.sha256(json.dumps([_FORMAT_VERSION, content], default=str).encode()).hexdigest()[:32]


def build_dataset(
    cfg: DataConfig, tokenizer: transformers.PreTrainedTokenizerBase, seed: int, tokenizer_dir: str | None = None
) -> PackedData:
    """The blocks of ``cfg.source``: a built-in source's prepared data (:func:`_prepared`), or what a
    registered source builds. ``seed`` is the run's ``train.seed``; ``tokenizer_dir`` is where the
    tokenizer came from (None: the built-in one), for error messages."""
    return SOURCES[cfg.source].build(cfg, tokenizer, seed, tokenizer_dir)


def _prepared(
    cfg: DataConfig, tokenizer: transformers.PreTrainedTokenizerBase, seed: int, tokenizer_dir: str | None = None
) -> PackedData:
    """Map the prepared data for ``cfg``, preparing it first if no process has.

    Every rank of a job may call this at once: the first to take the entry's file lock prepares,
    the others block on the lock (outside any collective) and then map the finished entry.
    ``seed`` does not change the packed data of text sources: the split is by document hash and
    shuffling is the Sampler's, so runs that differ only in seed share one cache entry and one eval
    set.
    """
    check_tokenizer(cfg, tokenizer, tokenizer_dir)
    plan = _plan(cfg)
    fingerprint = data_fingerprint(cfg, tokenizer, plan)
    cache_dir = cfg.resolved_cache_dir()
    entry = cache_dir / fingerprint
    packed = _read_cache(entry, fingerprint, plan)
    if packed is not None:
        return packed
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _Lock(cache_dir / f"{fingerprint}.lock") as lock:
        packed = _read_cache(entry, fingerprint, plan)  # another process may have prepared it meanwhile
        if packed is not None:
            return packed
        if lock.locked:  # unlocked, these may be other processes' live work
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry
            for stale in cache_dir.glob(f".{fingerprint}.tmp-*"):  # left by killed preparations
                if _abandoned(stale):
                    shutil.rmtree(stale, ignore_errors=True)
        _prepare(cfg, tokenizer, plan, fingerprint, entry)
    packed = _read_cache(entry, fingerprint, plan)
    if packed is None:
        raise ValueError(f"data.cache_dir: the prepared entry {entry} cannot be read back: check the disk")
    packed.from_cache = False
    return packed


def _check_prepared(cfg: DataConfig) -> None:
    """What the built-in sources need beyond DataConfig's own checks."""
    if cfg.seq_len < 8:
        raise ValueError(f"data.seq_len must be >= 8, got {cfg.seq_len} (data.source={cfg.source!r})")


# ----------------------------------------------------------------------------------------------
# The source registry


SourceBuilder = Callable[[DataConfig, transformers.PreTrainedTokenizerBase, int, str | None], PackedData]


def _no_check(cfg: DataConfig) -> None:
    pass


@dataclass(frozen=True)
class DataSource:
    """A ``data.source``. ``build(cfg, tokenizer, seed, tokenizer_dir)`` is called on every rank and must
    give every rank the same blocks (the Sampler's positions index them); ``check(cfg)`` runs when the
    config is parsed, before anything heavy, and raises ValueError naming the key to fix."""

    build: SourceBuilder
    check: Callable[[DataConfig], None] = _no_check


SOURCES: dict[str, DataSource] = {name: DataSource(_prepared, _check_prepared) for name in ("stdlib", "files", "hub")}


def register_source(name: str, build: SourceBuilder, check: Callable[[DataConfig], None] = _no_check) -> None:
    """Make ``data.source=name`` build its blocks with ``build`` (see :class:`DataSource`). Call it on every
    rank before the config is parsed: a launch script that registers, then runs ``bigtrain.cli.main()``.
    This is how a benchmark's synthetic task plugs in without bigtrain importing the benchmark. The same
    functions again are a no-op; others under a taken name are refused."""
    source = DataSource(build, check)
    if SOURCES.get(name, source) != source:
        raise ValueError(f"data.source {name!r} is already registered")
    SOURCES[name] = source


# ----------------------------------------------------------------------------------------------
# Showing prepared blocks to a person


def show_examples(packed: PackedData, tokenizer, n: int, split: str = "train") -> str:
    """The first ``n`` blocks of ``split`` as text: loss-bearing tokens inside [[...]], a ``|`` where
    an example (or the padding after the last) starts, the document names above each block."""
    tokens, flags = (packed.train, packed.train_flags) if split == "train" else (packed.eval, packed.eval_flags)
    lines = []
    for k in range(min(n, tokens.shape[0])):
        names = packed.sources(k) if split == "train" else packed.eval_sources(k)
        lines.append(f"--- {split} block {k} ({len(names)} document(s): {', '.join(names[:4])}"
                     f"{', ...' if len(names) > 4 else ''})")
        ids = tokens[k].tolist()
        fl = flags[k].tolist() if flags is not None else [0] + [LABEL] * (len(ids) - 1)
        text, t = [], 0
        while t < len(ids):
            label, u = fl[t] & LABEL, t + 1
            while u < len(ids) and fl[u] & LABEL == label and not fl[u] & START:
                u += 1
            piece = tokenizer.decode(ids[t:u])
            text.append(("|" if fl[t] & START and t else "") + (f"[[{piece}]]" if label else piece))
            t = u
        lines.append("".join(text))
    return "\n".join(lines)
