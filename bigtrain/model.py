"""Build the Hugging Face causal LM: a local model directory (fine-tuning) or a built-in preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from bigtrain.config import PRESETS, ConfigError, ModelConfig

# The preset registry (PRESETS, register_preset) lives in bigtrain.config, beside the validation that needs it.


def preset_config(cfg: ModelConfig, vocab_size: int, seq_len: int, pad_token_id: int | None) -> PretrainedConfig:
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max(seq_len, 128),
                       pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None,
                       tie_word_embeddings=False, **PRESETS[cfg.preset])


def train_dtype(ds_config: dict[str, Any] | None) -> torch.dtype:
    """The dtype DeepSpeed trains the module in (its fp32 master copy lives in the optimizer)."""
    if ds_config and ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config and ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def build_model(cfg: ModelConfig, tokenizer, seq_len: int, seed: int,
                ds_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """The Hugging Face model, seeded so every rank builds the same initial weights (DeepSpeed also
    broadcasts them).

    A model directory loads in the training dtype: DeepSpeed casts the module to it anyway (and builds
    its fp32 master copy from the cast weights), so an fp32 load of a bf16 checkpoint only cost a full
    fp32 copy per rank. Under ZeRO-3 the model is built and loaded through transformers' DeepSpeed
    integration: with an ``HfDeepSpeedConfig`` alive, ``from_pretrained``/``from_config`` run under
    ``deepspeed.zero.Init``, so each parameter is partitioned as it is created and each rank holds
    its 1/world share plus one checkpoint shard in flight, never the whole model. Presets under
    ZeRO-1/2 keep their fp32 initialisation (then DeepSpeed casts), so their weights do not change.
    """
    torch.manual_seed(seed)
    stage = int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))
    dtype = train_dtype(ds_config)
    zero3 = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers keeps only a weak reference: this object must outlive the model's construction
        # (and any later resize/generate), so the model holds it.
        zero3 = HfDeepSpeedConfig(ds_config)
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.path!r} is not a Hugging Face model directory (no config.json): "
                              "point it at a save_pretrained folder or set model.path=null to use a preset")
        hf_config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=dtype,
                                                     attn_implementation=cfg.attn_implementation)
    else:
        hf_config = preset_config(cfg, len(tokenizer), seq_len, tokenizer.pad_token_id)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype if zero3 else torch.float32,
                                                 attn_implementation=cfg.attn_implementation)
    model.bigtrain_zero3_config = zero3
    check_compatible(model.config, tokenizer, seq_len)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def check_compatible(hf_config: PretrainedConfig, tokenizer, seq_len: int) -> None:
    vocab = hf_config.get_text_config().vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}: "
                          "use the tokenizer saved with this model (model.path) or resize the embeddings")
    max_pos = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}: "
                          f"set data.seq_len<={max_pos}")
