"""Command line: ``bigtrain train | prepare | export | convert | report``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from bigtrain.checkpoint import CheckpointError
from bigtrain.config import ConfigError, config_reference, load_config
from bigtrain.stopfile import EXIT_PREEMPTED, stop_requested


def _parser(with_reference: bool = False) -> argparse.ArgumentParser:
    """``with_reference``: list every config key under ``train --help`` (reads the config classes'
    source, ~0.15 s: only when help is asked for, not at every rank's start)."""
    p = argparse.ArgumentParser(prog="bigtrain", description=__doc__)
    # The deepspeed launcher inserts --local_rank=N before the subcommand; LOCAL_RANK in the
    # environment is what bigtrain uses.
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (any launcher: plain, torchrun, deepspeed, srun)",
                       epilog=config_reference() if with_reference else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="YAML config file (sections: model, data, optim, train, checkpoint, spike, faults)")
    t.add_argument("--resume", help="'auto' (newest complete checkpoint in run_dir, or a fresh start) or a checkpoint path")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed JSON, then exit")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 optim.lr=3e-4")
    t.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    d = sub.add_parser("prepare", help="tokenize and pack the data of a config into its cache ahead of a job, "
                                       "report what it holds, --show N blocks with their loss mask")
    d.add_argument("config", help="YAML config file (as for train), or a first dotted override")
    d.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.format=chat data.files=[a.jsonl]")
    d.add_argument("--show", type=int, default=0, metavar="N",
                   help="print the first N train blocks: loss-bearing tokens in [[...]], | where an example starts")
    e = sub.add_parser("export", help="write a Hugging Face model directory from a checkpoint")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("out_dir", type=Path)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c = sub.add_parser("convert", help="convert a checkpoint to DeepSpeed's universal format ahead of a resume on "
                                       "another number of ranks (large checkpoints are not converted inline)")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--workers", type=int, default=4, help="extract workers of ds_to_universal (merge: half)")
    r = sub.add_parser("report", help="plot loss/grad norm with spikes and rollbacks; print a summary table")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/report.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(with_reference="-h" in argv or "--help" in argv).parse_args(argv)
    try:
        if args.command == "train":
            cfg = load_config(args.config, args.overrides)
            if args.dry_run:
                from bigtrain.engine import resolve_ds_config

                world = int(os.environ.get("WORLD_SIZE", "1"))
                print("# bigtrain config (resolved)")
                print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                print(f"# DeepSpeed config (resolved for {world} rank(s))")
                print(json.dumps(resolve_ds_config(cfg, world), indent=2))
                return 0
            message = stop_requested()  # launch/torchrun_multinode.sh got USR1: a restart must not train
            if message:
                print(message, file=sys.stderr)
                return EXIT_PREEMPTED
            from bigtrain.preflight import preflight

            # Before importing DeepSpeed/transformers/datasets: config-only errors in seconds.
            preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")), args.resume)
            from bigtrain.distributed import shutdown
            from bigtrain.train import train

            finished = False
            try:
                rc = train(cfg, resume=args.resume)
                finished = True  # every return of train() is a decision all ranks took together
            finally:
                shutdown(barrier=finished)
            return rc
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "export":
            from bigtrain.export import export

            print(export(args.checkpoint, args.out_dir, args.dtype))
            return 0
        if args.command == "convert":
            from bigtrain import checkpoint

            path = checkpoint.resolve_resume(str(args.checkpoint), args.checkpoint.parent)
            print(checkpoint.to_universal(path, path.parent / checkpoint.UNIVERSAL, args.workers))
            return 0
        if args.command == "report":
            from bigtrain.report import report

            report(args.run_dir, args.out)
            return 0
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _error(exc)
        return 2
    except CheckpointError as exc:
        _error(exc)
        return 4
    return 1


def _prepare(args: argparse.Namespace) -> int:
    """Run the data preparation train would run (same config, same cache entry) and report it."""
    from bigtrain.data import build_dataset, build_tokenizer, show_examples

    config, overrides = (None, [args.config, *args.overrides]) if "=" in args.config else (args.config, args.overrides)
    cfg = load_config(config, overrides)
    tokenizer = build_tokenizer(cfg.model.path)
    data = build_dataset(cfg.data, tokenizer, cfg.train.seed, cfg.model.path)
    entry = cfg.data.resolved_cache_dir() / data.fingerprint
    where = entry if entry.is_dir() else "in memory"  # a registered source need not use the cache
    print(f"# {'cached' if data.from_cache else 'prepared'}: {where}")
    print(json.dumps({"fingerprint": data.fingerprint, "seq_len": int(data.train.shape[1]), **data.stats}, indent=1))
    if args.show:
        print(show_examples(data, tokenizer, args.show))
    return 0


def _error(exc: Exception) -> None:
    """Print the error as one write, so the lines of ranks sharing a terminal or log never interleave."""
    line = f"bigtrain: error: {exc}\n"
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line.encode())
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        sys.stderr.write(line)
