"""Build the Hugging Face causal LM: a local model directory (fine-tuning) or a built-in preset."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from bigtrain.config import ConfigError, ModelConfig

# Built-in architectures, all Llama-style (RMSNorm, RoPE, SwiGLU) so one code path covers them.
PRESETS: dict[str, dict] = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4),
    "small-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=8),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
    # The low-loss Adam spike recipe (research/spike-anchors.md sec. 6.2): 1 layer, d=128, 4 heads.
    "modadd": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=4),
}


def preset_config(cfg: ModelConfig, vocab_size: int, seq_len: int, pad_token_id: int | None) -> PretrainedConfig:
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max(seq_len, 128),
                       pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None,
                       tie_word_embeddings=False, **PRESETS[cfg.preset])


def build_model(cfg: ModelConfig, tokenizer, seq_len: int, seed: int) -> torch.nn.Module:
    """The model in fp32 on CPU; DeepSpeed casts and places it. Seeded so every rank builds the same
    initial weights (DeepSpeed also broadcasts them)."""
    torch.manual_seed(seed)
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.path!r} is not a Hugging Face model directory (no config.json): "
                              "point it at a save_pretrained folder or set model.path=null to use a preset")
        hf_config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=torch.float32,
                                                     attn_implementation=cfg.attn_implementation)
    else:
        hf_config = preset_config(cfg, len(tokenizer), seq_len, tokenizer.pad_token_id)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                                 attn_implementation=cfg.attn_implementation)
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
