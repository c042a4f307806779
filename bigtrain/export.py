"""``bigtrain export CHECKPOINT OUT_DIR``: a DeepSpeed checkpoint -> a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bigtrain import checkpoint


def export(ckpt: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Consolidate the ZeRO partitions (any stage, any rank count, no process group needed) into a
    model built from the saved config, and ``save_pretrained`` with safetensors plus the tokenizer.

    Peak host memory is about one copy of the model in the output ``dtype`` plus one tensor in fp32:
    the model skeleton is built on the meta device (no weights allocated, no random init), the ZeRO
    checkpoint is read lazily (``lazy_mode=True``), and each weight is consolidated in fp32 and cast
    to ``dtype`` one at a time, then assigned into the skeleton. The values are those of the fp32
    consolidation cast to ``dtype``, bit for bit."""
    from accelerate import init_empty_weights

    if not checkpoint.is_complete(ckpt):
        raise ValueError(f"{ckpt}: not a complete bigtrain checkpoint (no {checkpoint.MARKER} marker): "
                         "pick one under RUN_DIR/checkpoints/")
    out_dtype = getattr(torch, dtype)
    hf_dir = ckpt / "hf"
    config = AutoConfig.from_pretrained(hf_dir)
    # Parameters on meta, buffers (rotary inv_freq: non-persistent, not in the checkpoint) built for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=out_dtype)
    lazy = read_lazily(ckpt)
    state_dict = consolidate(lazy, out_dtype)
    del lazy
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    del state_dict
    missing = [k for k in missing if k not in (getattr(model, "_tied_weights_keys", None) or {})]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    on_meta = [n for n, t in [*model.named_parameters(remove_duplicate=False),
                              *model.named_buffers(remove_duplicate=False)] if t.device.type == "meta"]
    if on_meta:
        raise RuntimeError(f"{ckpt}: export left {len(on_meta)} tensors without values (on the meta device), "
                           f"e.g. {on_meta[:5]}: the checkpoint lacks them and they are not tied to a loaded weight")
    model.config.use_cache = model_use_cache(ckpt, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(out_dir)
    return out_dir


def read_lazily(ckpt: Path) -> dict:
    """DeepSpeed's consolidated state dict in ``lazy_mode``: values that gather one fp32 weight on
    ``.contiguous()``, from the ``*_optim_states.pt`` files it opens memory-mapped.

    ``lazy_mode`` alone is lazy for ZeRO-3 only: for ZeRO-1/2 (bigtrain's default) DeepSpeed first
    ``torch.cat``s every rank's flat fp32 partition into one full fp32 vector (4 bytes/param) and hands
    out views of it. While it builds the dict, its module's ``torch.cat`` along dim 0 is therefore a
    :class:`_LazyCat` that records the parts instead of copying them, so DeepSpeed's own layout code
    (offsets, alignment padding, shared params) places every weight and the copy happens per weight.
    Its ``torch.load`` is memory-mapped as well: the ZeRO-1/2 ``mp_rank_00_model_states.pt`` holds the
    whole module in the training dtype, read in full only to pick out the buffers."""
    import deepspeed.utils.zero_to_fp32 as z2f

    real = z2f.torch
    z2f.torch = _TorchWithLazyCat(real)
    try:
        return z2f.get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
    finally:
        z2f.torch = real


class _TorchWithLazyCat:
    """``torch`` with ``cat`` along dim 0 deferred and ``load`` memory-mapped (see :func:`read_lazily`);
    everything else is torch."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def load(self, *args, **kwargs):
        kwargs.setdefault("mmap", True)  # the model-states files too: their module weights are not needed
        return self._real.load(*args, **kwargs)

    def cat(self, tensors, dim=0, **kwargs):
        tensors = list(tensors)
        if dim != 0 or kwargs or not tensors or any(t.dim() != 1 for t in tensors):
            return self._real.cat(tensors, dim, **kwargs)
        return _LazyCat(tensors)


class _LazyCat:
    """Stands for the 1-d ``torch.cat(parts)``: ``numel``, and ``narrow(0, ...)`` -> a :class:`_LazySlice`."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + p.numel())
        self.dtype = parts[0].dtype

    def numel(self) -> int:
        return self.starts[-1]

    def narrow(self, dim: int, start: int, length: int) -> _LazySlice:
        if dim != 0 or start < 0 or start + length > self.numel():
            raise IndexError(f"narrow({dim}, {start}, {length}) outside a lazy concatenation of {self.numel()}")
        return _LazySlice(self, start, length, torch.Size([length]))


class _LazySlice:
    """Elements ``[start, start + length)`` of a :class:`_LazyCat`, shaped ``shape``; ``contiguous()``
    copies just them into a tensor of its own."""

    def __init__(self, cat: _LazyCat, start: int, length: int, shape: torch.Size):
        self.cat, self.start, self.length, self.shape, self.dtype = cat, start, length, shape, cat.dtype

    def numel(self) -> int:
        return self.length

    def narrow(self, dim: int, start: int, length: int) -> _LazySlice:
        if dim != 0 or start < 0 or start + length > self.length:
            raise IndexError(f"narrow({dim}, {start}, {length}) outside a lazy slice of {self.length}")
        return _LazySlice(self.cat, self.start + start, length, torch.Size([length]))

    def view(self, *shape) -> _LazySlice:
        shape = torch.Size(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
        if shape.numel() != self.length:
            raise ValueError(f"cannot view {self.length} elements as {tuple(shape)}")
        return _LazySlice(self.cat, self.start, self.length, shape)

    def contiguous(self) -> torch.Tensor:
        end, chunks = self.start + self.length, []
        for part, lo, hi in zip(self.cat.parts, self.cat.starts, self.cat.starts[1:]):
            if lo < end and self.start < hi:
                a, b = max(self.start, lo), min(end, hi)
                chunks.append(part.narrow(0, a - lo, b - a))
        out = torch.cat(chunks) if chunks else torch.empty(0, dtype=self.dtype)
        return out.view(self.shape)


def consolidate(lazy: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict in ``dtype`` from DeepSpeed's lazy one: one weight at a time is gathered in fp32
    (``.contiguous()``) and cast, so only that one fp32 tensor is alive beside the ``dtype`` copies.
    Integer/bool buffers keep their dtype; names sharing one weight (tied params) share one tensor."""
    out: dict[str, torch.Tensor] = {}
    first: dict[int, tuple[object, str]] = {}  # id -> (the lazy value, kept alive so ids stay unique; its name)
    for name, value in lazy.items():
        seen = first.get(id(value))
        if seen is not None and seen[0] is value:
            out[name] = out[seen[1]]
            continue
        first[id(value)] = (value, name)
        tensor = value.contiguous()
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        elif tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view into a flat ZeRO buffer: own storage, so nothing pins the buffer
        out[name] = tensor
        del tensor
    return out


def model_use_cache(ckpt: Path, config) -> bool:
    """The model's own ``use_cache``: training turns the KV cache off (build_model), and the config
    saved with the checkpoint says so, which would make generation after export recompute every
    position. Taken from the original model directory when the run started from one, else the
    architecture's default."""
    import json

    try:
        source = json.loads((ckpt / checkpoint.STATE_FILE).read_text())["config"]["model"]["path"]
    except (OSError, KeyError, TypeError, ValueError):
        source = None
    if source and (Path(source) / "config.json").is_file():
        original = json.loads((Path(source) / "config.json").read_text())
        if "use_cache" in original:
            return bool(original["use_cache"])
    return bool(getattr(type(config)(), "use_cache", True))
