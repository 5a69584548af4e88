"""Train the Chinese CLIP dual encoder with DeepSpeed.

  deepspeed launch/train.py --deepspeed_config ds_configs/zero2_bf16.json \
      --train-data DATA/train_queries.jsonl --train-img DATA/lmdb/train \
      --val-data DATA/valid_queries.jsonl --val-img DATA/lmdb/valid \
      --vocab DATA/vocab.txt --model ViT-B-16 --text-model RoBERTa-wwm-ext-base-chinese --name run1

Also runs under `torchrun --nproc_per_node N`, `deepspeed --hostfile H`, and as one plain process.
Flags: `python launch/train.py --help`; the work happens in engine/ (config -> Trainer.run).
"""
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.files import InputError, report_input_error  # noqa: E402
from engine import dist  # noqa: E402
from engine.train import ops  # noqa: E402
from engine.train.step import NonFiniteLoss  # noqa: E402
from engine.train.config import build_config  # noqa: E402
from engine.train.flags import parse_args  # noqa: E402

EXIT_FAILED, EXIT_NONFINITE = 1, 3  # and data.files.EXIT_BAD_INPUT (2) for a user mistake


def main(argv=None) -> int:
    ops.prepare_process()  # before DeepSpeed is imported (the parser imports it)
    args = parse_args(argv)
    try:
        cfg = build_config(args)  # every flag and the DeepSpeed JSON checked before any work
    except InputError as e:
        return report_input_error("train.py", e)

    from engine.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
    except InputError as e:
        return report_input_error("train.py", e)
    except NonFiniteLoss as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Exception as e:  # noqa: BLE001 - end through exit_process: fast, non-zero, no teardown hang
        line = dist.comm_failure_line(e, cfg.dist_timeout)
        if line is None:
            traceback.print_exc()
        else:  # also into the run's train.log (rank 0)
            import logging

            logging.getLogger("clip").error(line)
        print(f"train.py: error: {line or e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        trainer.close()
    if dist.is_main():  # one line for the run, not one per rank
        print(f"train.py: done at step {summary['step']} (loss {summary.get('loss', float('nan')):.4f})")
    return 0


if __name__ == "__main__":
    dist.exit_process(main())  # waits for the other ranks on success; never blocks on a dead one
