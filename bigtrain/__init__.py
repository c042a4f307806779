"""bigtrain: a DeepSpeed ZeRO trainer for Hugging Face causal LMs that recovers from loss spikes by itself."""

__version__ = "0.1.0"
