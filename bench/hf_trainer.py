"""The Hugging Face Trainer on bigtrain's model, data and resolved DeepSpeed JSON (a benchmark contender).

Usage (2 ranks on CPU; settings are bigtrain's dotted overrides, so every contender reads one config):
    GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/hf_trainer.py \
        --result /tmp/hf.jsonl --out-dir /tmp/hf-run model.preset=tiny-llama train.steps=60
    ... --save-at-end                        # also write a Trainer checkpoint at the last step
    ... --resume CKPT                        # resume it (ignore_data_skip=False: the Trainer skips batches)
    ... --no-deepspeed                       # plain DDP (gloo), when Trainer + DeepSpeed cannot run here

What is the same as bigtrain: model (bigtrain.model.build_model), packed blocks (bigtrain.data), the
resolved DeepSpeed JSON (bigtrain.engine.resolve_ds_config: ZeRO stage, precision, micro-batch,
accumulation, clipping, AdamW hyper-parameters), labels = input_ids. What is the Trainer's own: its
sampler (RandomSampler + DistributedSampler), its LR schedule (constant here: no warmup), its loop.

Rank 0 appends one JSON line to --result: per-step end times (time.perf_counter, taken in
``on_step_end``, i.e. after the optimizer step), wall time of the first step end, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

T_IMPORT = time.time()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from bigtrain.config import load_config  # noqa: E402
from bigtrain.data import build_dataset, build_tokenizer  # noqa: E402
from bigtrain.distributed import init_distributed  # noqa: E402
from bigtrain.engine import resolve_ds_config  # noqa: E402
from bigtrain.model import build_model  # noqa: E402


class Blocks(torch.utils.data.Dataset):
    """Packed train blocks as the Trainer wants them: one dict per sample, labels = input_ids."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return self.data.train.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.data.batch([i]).items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", required=True, help="JSONL file rank 0 appends its result line to")
    p.add_argument("--out-dir", required=True, help="Trainer output_dir (checkpoints when --save-at-end)")
    p.add_argument("--label", default="hf_trainer")
    p.add_argument("--resume", help="Trainer checkpoint directory to resume from")
    p.add_argument("--save-at-end", action="store_true")
    p.add_argument("--no-deepspeed", action="store_true", help="DDP instead of DeepSpeed")
    p.add_argument("--launched", type=float, help="time.time() when the driver launched this job")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from transformers import Trainer, TrainerCallback, TrainingArguments

    cfg = load_config(None, args.overrides)
    rank, world, _ = init_distributed()  # the same gloo group bigtrain uses; accelerate reuses it
    tokenizer = build_tokenizer(cfg.model.path)
    if rank != 0:
        dist.barrier()
    data = build_dataset(cfg.data, tokenizer, cfg.train.seed)
    if rank == 0:
        dist.barrier()
    model = build_model(cfg.model, tokenizer, cfg.data.seq_len, cfg.train.seed)
    ds = resolve_ds_config(cfg, world)
    t, o = cfg.train, cfg.optim

    ends: list[float] = []
    first_wall: list[float] = []

    saved: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            ends.append(time.perf_counter())
            if not first_wall:
                first_wall.append(time.time())

        def on_save(self, targs, state, control, **kw):
            saved.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=args.out_dir,
        deepspeed=None if args.no_deepspeed else ds,
        per_device_train_batch_size=t.micro_batch,
        gradient_accumulation_steps=t.grad_accum,
        max_steps=t.steps,
        learning_rate=o.lr, adam_beta1=o.beta1, adam_beta2=o.beta2, adam_epsilon=o.eps,
        weight_decay=o.weight_decay, max_grad_norm=o.grad_clip,
        lr_scheduler_type="constant", warmup_steps=0,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        seed=t.seed, data_seed=t.seed,
        logging_strategy="no", save_strategy="steps" if args.save_at_end else "no", save_steps=t.steps, eval_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        ignore_data_skip=False, ddp_backend="gloo" if args.no_deepspeed else None,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Blocks(data), callbacks=[StepClock()])
    t_fit = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume)
    t_done = time.perf_counter()
    # The Trainer saves right after the last step's on_step_end; on_save fires when it is written.
    t_save = saved[-1] - ends[-1] if saved and ends else None
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        row = {"contender": args.label, "deepspeed": not args.no_deepspeed, "world": world,
               "tokens_per_step": t.micro_batch * t.grad_accum * world * cfg.data.seq_len,
               "ends": ends, "t_fit_start": t_fit, "t_done": t_done, "first_step_end_wall": first_wall[0] if first_wall else None,
               "launched": args.launched, "t_import": T_IMPORT, "save_seconds": t_save,
               "global_step": trainer.state.global_step,
               "is_deepspeed_enabled": trainer.is_deepspeed_enabled, "peak_rss_mb_max_rank": round(rss.item(), 1),
               "overrides": args.overrides}
        with open(args.result, "a") as f:
            f.write(json.dumps(row) + "\n")
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
