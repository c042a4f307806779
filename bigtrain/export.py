"""``bigtrain export CHECKPOINT OUT_DIR``: a DeepSpeed checkpoint -> a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bigtrain import checkpoint


def export(ckpt: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Consolidate the ZeRO partitions (any stage, any rank count, no process group needed) into fp32
    weights, load them into the model built from the saved config, and ``save_pretrained`` with
    safetensors plus the tokenizer."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not checkpoint.is_complete(ckpt):
        raise ValueError(f"{ckpt}: not a complete bigtrain checkpoint (no {checkpoint.MARKER} marker): "
                         "pick one under RUN_DIR/checkpoints/")
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    hf_dir = ckpt / "hf"
    config = AutoConfig.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(getattr(torch, dtype))
    model.config.use_cache = model_use_cache(ckpt, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(out_dir)
    return out_dir


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
