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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not checkpoint.is_complete(ckpt):
        raise ValueError(f"{ckpt}: not a complete bigtrain checkpoint (no {checkpoint.MARKER} marker): "
                         "pick one under RUN_DIR/checkpoints/")
    out_dtype = getattr(torch, dtype)
    hf_dir = ckpt / "hf"
    config = AutoConfig.from_pretrained(hf_dir)
    # Parameters on meta, buffers (rotary inv_freq: non-persistent, not in the checkpoint) built for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=out_dtype)
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
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
