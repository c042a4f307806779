"""Cost of bigtrain's per-sample losses (issue 14), not a test.

    .venv/bin/python bench/per_sample_cost.py [--repeats 20]

Measures on this machine, one process, no DeepSpeed:
1. forward + backward of the tiny-llama preset (257-token byte vocab, 32k-token vocab variant) with
   transformers' own loss (``model(input_ids, labels=...)``, what bigtrain did before) against
   bigtrain's ``token_losses`` path (one cross-entropy with reduction="none", summed per sample and
   then over the batch): the per-sample sums must cost nothing beyond HF's loss;
2. the host-side bookkeeping per step at global batches of 16, 1,024 and 4,096 samples: sample ids,
   label counts and ``SampleLosses.observe`` (the reference the attribution uses).
The bytes the all-reduce gains are 4 per sample of the global batch (4 KB at 1,024).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from bigtrain.sampler import Sampler  # noqa: E402
from bigtrain.spike import SampleLosses  # noqa: E402
from bigtrain.train import token_losses  # noqa: E402


def timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def model_step(vocab: int, batch: int, seq: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq)
    model = LlamaForCausalLM(cfg)
    x = torch.randint(0, vocab, (batch, seq))

    def hf():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=x, labels=x)
        out.loss.backward()

    def ours():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=x)
        sums = token_losses(out.logits, x).sum(1)
        (sums.sum() / (batch * (seq - 1))).backward()
        sums.detach()

    # Same loss value (the per-sample path changes nothing the optimizer sees).
    with torch.no_grad():
        a = model(input_ids=x, labels=x).loss
        b = token_losses(model(input_ids=x).logits, x).sum() / (batch * (seq - 1))
    # Interleaved, so a neighbour's load on a shared machine hits both alike.
    hf(), ours()
    t_a, t_b = [], []
    for _ in range(repeats):
        t_a.append(timed(hf, 1))
        t_b.append(timed(ours, 1))
    t_hf, t_ours = statistics.median(t_a), statistics.median(t_b)
    return {"what": "fwd+bwd", "vocab": vocab, "batch": batch, "seq": seq, "hf_s": round(t_hf, 5),
            "per_sample_s": round(t_ours, 5), "ratio": round(t_ours / t_hf, 4), "loss_diff": float(abs(a - b))}


def bookkeeping(global_batch: int, repeats: int) -> dict:
    sampler = Sampler(10**6, seed=0)
    samples = SampleLosses(256)
    stream = list(range(5 * 10**8, 5 * 10**8 + global_batch))
    sums = [float(300 + i % 17) for i in range(global_batch)]
    counts = [127.0] * global_batch

    def step():
        ids = sampler.sample_ids(stream)
        samples.observe(1, ids, sums, counts, accepted=True)

    return {"what": "host bookkeeping", "global_batch": global_batch, "seconds": round(timed(step, repeats), 6),
            "allreduce_extra_bytes": 4 * global_batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [model_step(257, 8, 64, args.repeats), model_step(32000, 8, 64, args.repeats)]
    rows += [bookkeeping(g, args.repeats) for g in (16, 1024, 4096)]
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
