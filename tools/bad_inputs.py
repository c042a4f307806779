"""Feed bigtrain bad input and record what each produces: docs/bad_inputs.md.

    python tools/bad_inputs.py [--out docs/bad_inputs.md]

Every case runs the real command line in one process; the table shows the exit status, the
seconds until the error, and the error line. A good error names the problem and the fix, and comes
before any training work.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fixtures(tmp: Path) -> dict[str, str]:
    """Files the bad inputs point at."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bigtrain.data import build_tokenizer

    (tmp / "empty.txt").write_text("")
    (tmp / "rows.jsonl").write_text('{"body": "hello world"}\n' * 50)
    (tmp / "bad.json").write_text("{not json")
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ds["gradient_clipping"] = 5.0
    (tmp / "contradicts.json").write_text(json.dumps(ds))
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ds["train_batch_size"] = 7
    (tmp / "batch.json").write_text(json.dumps(ds))
    small = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(small).save_pretrained(tmp / "small_vocab")
    build_tokenizer(None).save_pretrained(tmp / "small_vocab")
    big = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(big).save_pretrained(tmp / "short_positions")
    build_tokenizer(None).save_pretrained(tmp / "short_positions")
    (tmp / "not_ckpt").mkdir()
    (tmp / "unreadable.txt").write_text("x" * 100)
    (tmp / "unreadable.txt").chmod(0)
    return {k: str(tmp / k) for k in ("empty.txt", "rows.jsonl", "bad.json", "contradicts.json", "batch.json",
                                      "small_vocab", "short_positions", "not_ckpt")}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cases(f: dict[str, str], tmp: Path) -> list[tuple[str, list[str]]]:
    run = f"run_dir={tmp / 'run'}"
    return [
        ("mistyped section", ["trian.steps=10"]),
        ("mistyped key", ["train.stpes=10"]),
        ("wrong type", ["train.steps=ten"]),
        ("negative learning rate", ["optim.lr=-1e-3"]),
        ("warmup longer than training", ["train.steps=10", "optim.warmup_steps=50"]),
        ("min_lr above lr", ["optim.min_lr=1"]),
        ("unknown precision", ["train.precision=fp8"]),
        ("fp16 without a GPU", ["train.precision=fp16", run]),
        ("unknown DeepSpeed config name", ["train.deepspeed=zero4", run]),
        ("DeepSpeed JSON is not valid JSON", [f"train.deepspeed={f['bad.json']}", run]),
        ("DeepSpeed JSON contradicts the config", [f"train.deepspeed={f['contradicts.json']}", run]),
        ("global batch not micro x accum x ranks", [f"train.deepspeed={f['batch.json']}", run]),
        ("data files that do not exist", ["data.source=files", "data.files=[/nonexistent/*.jsonl]", run]),
        ("no data files given", ["data.source=files", run]),
        ("empty data file", ["data.source=files", f"data.files=[{f['empty.txt']}]", run]),
        ("text column that does not exist", ["data.source=files", f"data.files=[{f['rows.jsonl']}]", run]),
        ("sequence longer than the model's positions", [f"model.path={f['short_positions']}", "data.seq_len=128",
                                                        "data.max_bytes=100000", run]),
        ("tokenizer larger than the model's vocabulary", [f"model.path={f['small_vocab']}",
                                                           "data.max_bytes=100000", run]),
        ("model path that is not a model", [f"model.path={f['not_ckpt']}", run]),
        ("resume path that is not a checkpoint", ["--resume", f["not_ckpt"], run]),
        ("config file that does not exist", ["--config", str(tmp / "nope.yaml")]),
        ("flash-attention without a GPU", ["model.attn_implementation=flash_attention_2", run]),
        ("torch.compile under ZeRO-3", ["model.compile=true", "train.deepspeed=zero3", run]),
        ("malloc threshold above glibc's maximum", ["train.malloc_mmap_threshold=100000000", run]),
        ("flash-attention with packed examples", ["model.attn_implementation=flash_attention_2", "data.format=chat",
                                                  "data.source=files", f"data.files=[{f['rows.jsonl']}]", run]),
        ("chat data, tokenizer without a chat template", ["data.format=chat", "data.source=files",
                                                           f"data.files=[{f['rows.jsonl']}]", "train.micro_batch=1",
                                                           run]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bad_inputs.md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bigtrain-bad-"))
    rows = []
    for name, argv in cases(fixtures(tmp), tmp):
        t0, cpu0 = time.time(), _children_cpu()
        proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", *argv], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        cpu = _children_cpu() - cpu0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("bigtrain: error:")]
        message = errors[-1].removeprefix("bigtrain: error: ") if errors else f"(no one-line error) {proc.stderr[-300:]}"
        rows.append((name, " ".join(argv).replace(str(tmp), "$TMP"), proc.returncode, time.time() - t0, cpu,
                     message.replace(str(tmp), "$TMP")))
        print(f"{proc.returncode:>3} {name}: {rows[-1][-1]}")
    lines = [
        "# Bad input: what bigtrain says",
        "",
        f"Generated by `python tools/bad_inputs.py` on {date.today()} (one process, CPU). Each row runs",
        "`python -m bigtrain train ARGS`; `$TMP` is a scratch directory with the files the case needs.",
        "`seconds`: wall time until the error; `cpu s`: the process's user+system CPU time, which a",
        "machine shared with other jobs does not inflate. Config-only checks run before any heavy import",
        "(bigtrain/preflight.py); data and model checks need the tokenizer or the model's config.",
        "",
        "| case | arguments | exit | seconds | cpu s | message |",
        "|---|---|---|---|---|---|",
    ]
    for name, argv, code, secs, cpu, msg in rows:
        lines.append(f"| {name} | `{argv}` | {code} | {secs:.1f} | {cpu:.1f} | {msg.replace('|', '/')} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():  # earlier catalogues stay below, newest first: timings are compared, not replaced
        earlier = args.out.read_text().split("\n", 1)[1].strip()
        lines += ["", "## Earlier run", "", earlier.replace("\n## Earlier run", "\n### Earlier run")]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(code != 0 and "no one-line error" not in msg for _, _, code, _, _, msg in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
