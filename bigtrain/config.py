"""One typed config tree: YAML file + dotted ``key=value`` overrides -> validated ``Config``.

Every field has a docstring right below it (litgpt / torchtitan style). Unknown keys, wrong types and
impossible values are rejected with a message that names the key and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bigtrain.data import DataConfig
from bigtrain.spike import SpikeConfig


class ConfigError(ValueError):
    """A config problem a user must fix; the message names the key and the fix."""


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

# Built-in architectures for ``model.preset``, by name: Hugging Face ``LlamaConfig`` keyword arguments
# (RMSNorm, RoPE, SwiGLU), so one code path (bigtrain.model.preset_config) builds them all. They live
# here, not in bigtrain.model, because config validation needs the names and must not import torch's
# model code. A benchmark's own architecture is added with register_preset by its launch script before
# the config is parsed: bigtrain does not import benchmarks, so it does not ship their presets.
PRESETS: dict[str, dict[str, int]] = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4),
    "small-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
}


def register_preset(name: str, arch: dict[str, int]) -> None:
    """Make ``model.preset=name`` build a Llama with ``arch`` (``LlamaConfig`` keyword arguments). Call
    it on every rank before the config is parsed. The same architecture again is a no-op; another one
    under a taken name is refused, so a preset's name always means one model."""
    if PRESETS.get(name, arch) != arch:
        raise ValueError(f"model.preset {name!r} is already registered with another architecture")
    PRESETS[name] = dict(arch)


@dataclass
class ModelConfig:
    path: str | None = None
    """Local Hugging Face model directory to fine-tune (``save_pretrained`` layout). None: build
    ``preset`` from scratch. The tokenizer is loaded from this directory when it has one."""
    preset: str = "tiny-llama"
    """Architecture built from scratch when ``path`` is None: ``tiny-llama`` (2 layers, d=64, the CPU
    default), ``small-llama`` (4 layers, d=256), ``llama-1b`` (a ~1B Llama for GPUs), or a name added
    with ``bigtrain.config.register_preset`` by a launch script."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (``gradient_checkpointing_enable``): less memory,
    ~30% more compute."""
    compile: bool = False
    """``torch.compile`` each decoder layer (inductor): fused element-wise kernels for speed on GPUs,
    also under ``activation_checkpointing``; not with ZeRO-3 (refused). The first step and the first
    eval pay the compilation; parameter names are kept, so checkpoints are the same with or without
    it. Needs Triton and a C compiler on CUDA, a C++ compiler on CPU (checked at start-up)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: ``sdpa``, ``eager`` or ``flash_attention_2`` (CUDA,
    bf16/fp16 and the ``flash_attn`` package; packed chat/prompt_completion examples then need
    ``train.micro_batch=1``, the only shape transformers runs as variable-length sequences)."""

    def __post_init__(self) -> None:
        if self.path is None and self.preset not in PRESETS:
            raise ConfigError(f"model.preset must be one of {list(PRESETS)}, got {self.preset!r} (a launch script "
                              "adds one with bigtrain.config.register_preset before calling bigtrain.cli.main())")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"model.attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)}, "
                              f"got {self.attn_implementation!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay (``decay_steps``), held after it."""
    warmup_steps: int = 20
    """Linear warmup from 0 to ``lr`` over this many optimizer steps."""
    decay_steps: int = 0
    """The step where the cosine reaches ``min_lr``; 0 = ``train.steps``. Set it when a run is trained
    in legs (``train.steps=1000``, resume with ``train.steps=2000``): a fixed value keeps every leg on
    one schedule, where a growing ``train.steps`` stretches it (Megatron's ``--lr-decay-iters``)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2 (0.95 is the large-model standard: PaLM, Llama, OLMo)."""
    eps: float = 1e-8
    """Adam epsilon. The spike monitor may lower it on rollback; bigtrain re-applies the current value
    after every checkpoint load because DeepSpeed's load restores the saved one."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient 2-norm to this value; 0 turns clipping off."""
    torch_adam: bool | Literal["auto"] = "auto"
    """Step with torch's AdamW (``true``; on CUDA its fused kernel) or DeepSpeed's FusedAdam
    (``false``: a JIT build that needs nvcc at run time, and a slow C++ build on CPU). ``auto``: torch's
    AdamW everywhere."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps < 0:
            raise ConfigError(f"optim.decay_steps must be >= 0 (0 = train.steps), got {self.decay_steps}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps >= 0:
            raise ConfigError(f"optim.eps must be >= 0, got {self.eps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0")
        if not isinstance(self.torch_adam, bool) and self.torch_adam != "auto":
            raise ConfigError(f"optim.torch_adam must be true, false or auto, got {self.torch_adam!r}")


@dataclass
class TrainConfig:
    steps: int = 200
    """Total optimizer steps. The LR schedule ends here."""
    micro_batch: int = 8
    """Sequences per rank per forward/backward (DeepSpeed's train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step. Global batch = micro_batch x grad_accum x ranks."""
    precision: str = "bf16"
    """``bf16``, ``fp16`` (dynamic loss scaling; GPU only) or ``fp32``."""
    deepspeed: str = "zero2"
    """DeepSpeed JSON: a name from ``ds_configs/`` (zero1, zero2, zero3, zero2_offload, zero3_offload)
    or a path. Its ``"auto"`` values are filled from this config; an explicit value that contradicts
    this config is an error."""
    seed: int = 1234
    """Seeds model init, data order and every rank's RNG."""
    eval_interval: int = 50
    """Evaluate the held-out split every N steps and at the end; 0 = only at the end."""
    eval_batches: int = 4
    """Micro-batches per rank in one evaluation."""
    log_interval: int = 1
    """Write metrics every N steps (metrics.jsonl, TensorBoard, progress bar)."""
    skip_steps: list[list[int]] = field(default_factory=list)
    """Steps whose data is passed over by hand, as inclusive ranges ``[[first, last], ...]``: when the run
    reaches ``first``, the global batches that steps ``first``..``last`` would draw are skipped once
    (their samples come back in later epochs) and training goes on with the data after them; the step
    count is unchanged, as for the spike monitor's windows. The manual recovery of PaLM's report
    ("restarted ~100 steps before the spike and skipped ~200-500 batches") and of Megatron-LM's
    ``--iterations-to-skip``: resume from a checkpoint before the trouble with
    ``train.skip_steps=[[101,400]]``. Each range is applied once (recorded in the checkpointed
    history); a range must start after the step the run resumes from."""
    malloc_mmap_threshold: int = 1 << 20
    """Bytes from which glibc serves host allocations with mmap, returning them to the system when
    freed (docs/memory.md: ZeRO-3's freed gather buffers otherwise stay in the heap); 0 leaves glibc's
    adaptive default. Not applied under another allocator or with ``MALLOC_MMAP_THRESHOLD_`` or a
    ``glibc.malloc.mmap_threshold`` tunable set."""

    def __post_init__(self) -> None:
        if not 0 <= self.malloc_mmap_threshold <= 32 << 20:
            raise ConfigError(f"train.malloc_mmap_threshold must be 0 (glibc's adaptive default) to 33554432 "
                              f"bytes (32 MiB, glibc's maximum), got {self.malloc_mmap_threshold}")
        for r in self.skip_steps:
            if len(r) != 2 or not 1 <= r[0] <= r[1]:
                raise ConfigError(f"train.skip_steps: each range is [first, last] with 1 <= first <= last, got {r!r} "
                                  "(e.g. train.skip_steps=[[101,400]])")
            if r[0] > self.steps:
                raise ConfigError(f"train.skip_steps: the range {r!r} starts after the last step, train.steps="
                                  f"{self.steps}: it would never be reached")
        ranges = sorted(map(tuple, self.skip_steps))
        for a, b in zip(ranges, ranges[1:]):
            if b[0] <= a[1]:
                raise ConfigError(f"train.skip_steps: the ranges {list(a)} and {list(b)} overlap: give each step once "
                                  f"(e.g. [{a[0]},{max(a[1], b[1])}])")
        for name in ("steps", "micro_batch", "grad_accum", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_interval < 0:
            raise ConfigError(f"train.eval_interval must be >= 0, got {self.eval_interval}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"train.precision must be bf16, fp16 or fp32, got {self.precision!r}")


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Durable checkpoint every N steps (and always at the end); 0 = only at the end."""
    keep: int = 3
    """Complete durable checkpoints kept; older ones are pruned only after a newer one is complete."""
    snapshot_interval: int = 10
    """Fast rollback snapshot every N steps (to RAM-backed /dev/shm when present); 0 = off, then
    rollbacks use durable checkpoints only."""
    snapshot_keep: int = 4
    """Snapshots kept in the ring. Rollback needs one older than the spike's onset."""
    snapshot_dir: str | None = None
    """Where snapshots live. None: /dev/shm/bigtrain-<run id> when /dev/shm exists, else
    RUN_DIR/snapshots."""
    convert_inline_max_gb: float = 50.0
    """A resume on another number of ranks goes through DeepSpeed's universal checkpoint. Rank 0
    converts inline (the other ranks wait in a collective, whose timeout a long conversion can
    exceed) only for checkpoints up to this size; a larger one is refused with the ``bigtrain
    convert`` command to run first. 0 = never inline."""
    async_snapshots: bool = True
    """Take snapshots off the loop's critical path: the loop waits only while every rank copies its
    state to host memory (on a GPU a device-to-host copy); a background thread writes the files, and
    the snapshot becomes a rollback target (marker, ``step_*`` name) only once every rank's write has
    finished, checked at the next snapshot or before a rollback picks its target. False: a synchronous
    DeepSpeed save, the loop blocked for the whole write. Durable checkpoints are always synchronous."""

    def __post_init__(self) -> None:
        if self.interval < 0 or self.snapshot_interval < 0:
            raise ConfigError("checkpoint.interval and checkpoint.snapshot_interval must be >= 0")
        if not self.convert_inline_max_gb >= 0:
            raise ConfigError(f"checkpoint.convert_inline_max_gb must be >= 0, got {self.convert_inline_max_gb}")
        if self.keep < 1 or self.snapshot_keep < 1:
            raise ConfigError("checkpoint.keep and checkpoint.snapshot_keep must be >= 1")


POISON_KINDS = ("uniform", "shuffled", "repeated")


@dataclass
class FaultConfig:
    """Deterministic fault injection for tests and benchmarks; everything off by default. Each fault
    fires once (the first time its step is reached), so a rollback does not replay a transient fault;
    poisoned *data* stays poisoned, as real bad data would."""

    poison_steps: list[int] = field(default_factory=list)
    """Replace the batches of these steps with random garbage tokens (bad data)."""
    poison_fraction: float = 1.0
    """Share of each poisoned step's samples (on each rank in ``ranks``) made garbage; at least one
    per rank. 1.0: the whole batch."""
    poison_documents: bool = False
    """Poison whole documents: every block of the chosen samples' source documents is garbage, wherever
    it is drawn (bad data comes in documents). False: only the chosen blocks."""
    poison_ids: list[list[int]] = field(default_factory=list)
    """Half-open sample-id ranges ``[[start, end], ...]`` that are garbage from the first step, wherever
    they are drawn: bad data already in the corpus (the spike benchmark's restarted runs carry the
    poison a stopped run met this way, so the data stays bad and is not armed again)."""
    poison_kind: str = "uniform"
    """What the garbage is: "uniform" - tokens drawn uniformly from the vocabulary (binary or
    mis-decoded content); "shuffled" - the block's own tokens in a random order (text statistics
    without structure); "repeated" - one random 8-token phrase over and over (the repeated n-grams
    OLMo 2 traced spikes to). Each fixed per sample id, the same in every epoch."""
    nan_steps: list[int] = field(default_factory=list)
    """Force a non-finite loss at these steps."""
    corrupt_weights_step: int = 0
    """At this step, scale one weight matrix by ``corrupt_scale`` for that step (silent data corruption
    of one step's computation on the faulty ranks; from then on with ``corrupt_persistent``); 0 = off."""
    corrupt_scale: float = 1000.0
    """Factor for ``corrupt_weights_step``. The corruption hits the rank's working copy of the weight,
    which ZeRO's fp32 master partition overwrites when the step ends: it corrupts one step's forward and
    backward on that rank (and, through its gradient, that update), not the weights from then on
    (unless ``corrupt_persistent``)."""
    corrupt_persistent: bool = False
    """Make ``corrupt_weights_step`` persistent: the rank's share of the fp32 master is scaled too, so
    the corruption stays in the model from that step on (a fault of the model state, such as a bit flip
    in optimizer memory) until a rollback restores a state from before it. Every rank scales the part
    of the master it owns, so the whole weight is scaled; ``ranks`` must be empty (a subset would
    scale whichever slices those ranks happen to own)."""
    scale_grad_steps: list[int] = field(default_factory=list)
    """Multiply the loss (hence the gradients) by ``grad_scale`` at these steps."""
    grad_scale: float = 1000.0
    """Factor for ``scale_grad_steps``."""
    crash_in_recovery: bool = False
    """Kill the process in the middle of the first rollback (after the load, before the new state is
    recorded), to prove a crash during recovery leaves a resumable run."""
    ranks: list[int] = field(default_factory=list)
    """Ranks the faults happen on; empty = all ranks. Decisions must stay collective either way."""

    @property
    def any(self) -> bool:
        return bool(self.poison_steps or self.nan_steps or self.corrupt_weights_step or self.scale_grad_steps)

    def __post_init__(self) -> None:
        if not 0 < self.poison_fraction <= 1:
            raise ValueError(f"faults.poison_fraction must be in (0, 1], got {self.poison_fraction!r}")
        if any(len(r) != 2 or not 0 <= r[0] < r[1] for r in self.poison_ids):
            raise ValueError(f"faults.poison_ids must be [start, end) ranges with 0 <= start < end, got "
                             f"{self.poison_ids!r}")
        if not (math.isfinite(self.corrupt_scale) and self.corrupt_scale != 0):
            raise ValueError(f"faults.corrupt_scale must be finite and non-zero, got {self.corrupt_scale!r}")
        if self.corrupt_persistent and self.ranks:
            raise ValueError("faults.corrupt_persistent corrupts the fp32 master, which ZeRO partitions: on a subset of "
                             f"ranks ({self.ranks}) it would scale only the slices those ranks own (none, part or all "
                             "of the weight, depending on the ZeRO stage and layout). Leave faults.ranks empty")
        if self.poison_kind not in POISON_KINDS:
            raise ValueError(f"faults.poison_kind must be one of {', '.join(POISON_KINDS)}, got {self.poison_kind!r}")


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Output directory: config, metrics.jsonl, spikes.jsonl, TensorBoard events, checkpoints."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        if self.optim.warmup_steps > self.train.steps:
            raise ConfigError(
                f"optim.warmup_steps={self.optim.warmup_steps} exceeds train.steps={self.train.steps}: "
                "lower the warmup or train longer")
        if self.optim.decay_steps and self.optim.decay_steps < self.optim.warmup_steps:
            raise ConfigError(
                f"optim.decay_steps={self.optim.decay_steps} ends the schedule before optim.warmup_steps="
                f"{self.optim.warmup_steps}: set decay_steps >= warmup_steps, or 0 for train.steps")
        if (self.model.attn_implementation == "flash_attention_2" and self.data.format != "text"
                and self.data.packing and self.train.micro_batch > 1):
            # transformers reads packed sequences out of position_ids for flash-attention only when the
            # batch holds one row (modeling_flash_attention_utils._is_packed_sequence); with more rows
            # every block runs as one causal sequence and packed examples attend to each other.
            raise ConfigError(
                f"model.attn_implementation=flash_attention_2 with packed data.format={self.data.format} and "
                f"train.micro_batch={self.train.micro_batch}: transformers separates packed examples for "
                "flash-attention only in a micro-batch of one row, so they would attend to each other: set "
                "train.micro_batch=1 (raise train.grad_accum to keep the batch), data.packing=false, or "
                "model.attn_implementation=sdpa")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of what defines the model being trained (architecture, data, seed). A resume from a
        checkpoint with another fingerprint is refused."""
        key = {"model": dataclasses.asdict(self.model), "data": self.data.identity(),  # location-independent
               "seed": self.train.seed}
        key["model"].pop("activation_checkpointing")  # how the model is computed, not what it is
        key["model"].pop("compile")
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Parsing: dict -> dataclasses with type checks and named errors.


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) > 1:
            allowed = " or ".join(_type_name(arg) for arg in args if arg is not type(None))
            raise ConfigError(f"{key} must be {allowed}, got {value!r} ({type(value).__name__})")
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if any(value == allowed and type(value) is type(allowed) for allowed in typing.get_args(tp)):
            return value
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint} (allowed: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{dotted}.")
        else:
            kwargs[key] = _check_type(value, tp, dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # sections validated in their own modules (data, spike)
        raise ConfigError(str(exc)) from None


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (so 3, 1e-4, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value (e.g. train.steps=100)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (from its source: Python keeps no
    attribute docstrings at run time)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def config_reference(width: int = 100) -> str:
    """Every config key with its default and docstring, for ``bigtrain train --help``."""
    lines = ["config keys (a YAML section or a dotted override: section.key=value; default in brackets):"]

    def walk(cls: type, prefix: str) -> None:
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory):
                lines.append("")
                walk(f.default_factory, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix}{f.name} [{json.dumps(default) if default is not None else 'null'}]")
            lines.extend(textwrap.wrap(docs.get(f.name, ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6))

    walk(Config, "")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found: pass an existing YAML file to --config")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = upgrade_saved(tree)
    for item in overrides:
        apply_override(tree, item)
    return _build(Config, tree, "")


def upgrade_saved(tree: dict[str, Any]) -> dict[str, Any]:
    """A config tree written by an older bigtrain (RUN_DIR/config.yaml, a checkpoint's
    ``TrainState.config``) in today's form, so it loads and a resume compares like with like:
    ``optim.torch_adam`` was a string, "true" or "false"; ``data.modadd_train_fraction`` was always
    0.5 and left with the modadd task; ``spike.policy`` became ``spike.monitor`` (the competitors'
    names need the benchmark's launch script, which registers them)."""
    tree = dict(tree)
    optim = tree.get("optim")
    if isinstance(optim, dict) and optim.get("torch_adam") in ("true", "false"):
        tree["optim"] = {**optim, "torch_adam": optim["torch_adam"] == "true"}
    data = tree.get("data")
    if isinstance(data, dict) and data.get("modadd_train_fraction") == 0.5:
        tree["data"] = {k: v for k, v in data.items() if k != "modadd_train_fraction"}
    spike = tree.get("spike")
    if isinstance(spike, dict) and "policy" in spike and "monitor" not in spike:
        tree["spike"] = {**{k: v for k, v in spike.items() if k != "policy"}, "monitor": spike["policy"]}
    return tree
