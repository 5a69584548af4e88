"""The command line of launch/train.py: every flag, grouped as `--help` shows them.

Only parsing lives here; engine/train/config.py checks the values and resolves them, with the
DeepSpeed JSON, into the run's settings.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from engine.train.speed import add_speed_arguments


def _data_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--train-data", required=True, action="append",
                   help="training queries (MUGE or Chinese-CLIP jsonl, with --train-img) or a launch/build_dataset.py "
                        "folder; repeat it for a weighted mixture of built data sets (DIR or DIR::weight)")
    d.add_argument("--train-data-weights", default=None,
                   help="mixture weights, one per --train-data, comma-separated (e.g. 1,3): each data set's share "
                        "of the samples (default: equal)")
    d.add_argument("--train-img", default=None, help="training image LMDB directory (launch/build_lmdb.py)")
    d.add_argument("--val-data", default=None, help="validation queries jsonl (with --val-img)")
    d.add_argument("--val-img", default=None, help="validation image LMDB directory")
    d.add_argument("--vocab", default=None,
                   help="tokenizer folder or vocab.txt (default: --init-from's, else the --bert-weight-path "
                        "folder's vocab.txt)")
    d.add_argument("--context-length", type=int, default=None,
                   help="text tokens incl. [CLS]/[SEP] (default: --init-from's record, else 52)")
    d.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader workers per rank; 0 reads the LMDB in process, which measured fastest")
    d.add_argument("--shard-local", action="store_true",
                   help="each rank reads only its own run of the dataset's shards per epoch (a built, sharded "
                        "dataset; for node-local copies), instead of a global shuffle over all shards")


def _model_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="vision config name (models/configs) or JSON path "
                   "(default: --init-from's record or config.json, else ViT-B-16)")
    m.add_argument("--text-model", default=None, help="text config name or JSON path (default: --init-from's "
                   "record or config.json, else RoBERTa-wwm-ext-base-chinese)")
    m.add_argument("--clip-weight-path", default=None, help="converted image tower .pt (models.weights)")
    m.add_argument("--bert-weight-path", default=None, help="converted text tower .pt or a RoBERTa folder")
    m.add_argument("--init-from", default=None,
                   help="whole-model init: our model_fp32.pt or its run dir (its record gives the model flags), "
                        "an HF ChineseCLIP folder, or a Chinese-CLIP .pt")
    m.add_argument("--freeze-image-tower", action="store_true",
                   help="the whole image tower frozen, projection included (= --lock-image --lock-image-proj)")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    # locked towers and distillation: checked and built in engine/train/recipe.py
    m.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT): embeddings, blocks "
                   "and norms; its projection still trains unless --lock-image-proj")
    m.add_argument("--lock-image-unlocked-layers", type=int, default=0, metavar="N",
                   help="with --lock-image: its last N blocks train, and the norm after them")
    m.add_argument("--lock-image-proj", action="store_true", help="with --lock-image: freeze its projection too")
    m.add_argument("--lock-text", action="store_true", help="freeze the text tower: embeddings and blocks; "
                   "text_projection still trains unless --lock-text-proj")
    m.add_argument("--lock-text-unlocked-layers", type=int, default=0, metavar="N",
                   help="with --lock-text: its last N blocks train")
    m.add_argument("--lock-text-proj", action="store_true", help="with --lock-text: freeze text_projection too")
    m.add_argument("--distill-from", default=None, metavar="MODEL", help="distil from this trained model "
                   "(anything --init-from takes), frozen, run in the training precision; --loss clip only")
    m.add_argument("--distill-model", default=None, help="the teacher's vision config when its weights carry "
                   "none (a Chinese-CLIP checkpoint)")
    m.add_argument("--distill-text-model", default=None, help="the teacher's text config when its weights "
                   "carry none")
    m.add_argument("--distill-device", default=None, help="run the teacher on this device (cpu, cuda:1, ...; "
                   "default: the training device)")


def _optimisation_flags(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=32)
    o.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimizer steps (0 = run all epochs); the schedule is unchanged")
    o.add_argument("--lr", type=float, default=8e-5, help="peak learning rate")
    o.add_argument("--wd", type=float, default=0.001, help="AdamW weight decay (not on biases/norms/embeddings)")
    o.add_argument("--warmup", type=int, default=500, help="linear warmup steps, then cosine to 0")
    o.add_argument("--seed", type=int, default=123)
    loss = o.add_mutually_exclusive_group()
    loss.add_argument("--local-loss", dest="local_loss", action="store_true", default=True,
                      help="(default) each rank scores its own rows against all gathered columns")
    loss.add_argument("--global-loss", dest="local_loss", action="store_false",
                      help="every rank scores the full gathered batch (memory quadratic in the global batch)")
    o.add_argument("--loss", choices=("clip", "siglip"), default="clip",
                   help="clip: softmax InfoNCE; siglip: pairwise sigmoid loss with a learnt bias, exact over "
                        "the global batch in chunks")
    o.add_argument("--sigmoid-chunk", type=int, default=0, metavar="ROWS",
                   help="with --loss siglip: text rows per chunk of logits (memory per rank: its rows x ROWS; "
                        "default: one rank's rows of the step)")
    o.add_argument("--sigmoid-exchange", choices=("ring", "gather"), default="ring",
                   help="with --loss siglip: text rows pass rank to rank (memory flat in the number of ranks) "
                        "or are all gathered at once (memory grows with it; measured faster on few CPU ranks)")
    o.add_argument("--distill-weight", type=float, default=None,
                   help="weight of the distillation term (default 1.0, as open_clip's DistillClipLoss)")
    o.add_argument("--image-lr-decay", type=float, default=1.0, metavar="D",
                   help="layer-wise lr decay in the image tower: layer l learns at lr x D^(depth - l), "
                        "the embeddings slowest (EVA-CLIP's --visual-ld)")
    o.add_argument("--text-lr-decay", type=float, default=1.0, metavar="D",
                   help="layer-wise lr decay in the text tower (EVA-CLIP's --text-ld)")
    o.add_argument("--accumulation", choices=("exact", "plain"), default="exact",
                   help="with gradient_accumulation_steps > 1: 'exact' = negatives from every micro-batch "
                        "of the step (equals one k-times larger batch); 'plain' = each micro-batch on its "
                        "own (NOT equivalent: fewer negatives)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("run, logging, checkpoints")
    # --logdir: the same; torchrun's parser rejects --logs as an ambiguous prefix of its --logs-specs
    r.add_argument("--logs", "--logdir", dest="logs", default="./logs", help="root of run directories")
    r.add_argument("--name", default=None, help="run name: the run dir is <logs>/<name> (default: a timestamp)")
    r.add_argument("--save-frequency", type=int, default=1, help="checkpoint every N epochs (0 = off)")
    r.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps (0 = off)")
    r.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    r.add_argument("--resume", default=None, help="'latest' (this run's newest checkpoint) or a checkpoint dir")
    r.add_argument("--overwrite", action="store_true", help="start afresh in a run dir that holds a run: the "
                   "old run is moved to <logs>/<name>.old-<time> first (never deleted)")
    r.add_argument("--export", action="store_true",
                   help="write <run>/model_fp32.pt at the end: fp32 weights plus their record (configs, "
                   "vocab, context length, image preprocessing)")
    r.add_argument("--export-hf", action="store_true", help="also write <run>/hf, a transformers "
                   "ChineseCLIPModel folder with tokenizer and image processor (implies --export)")
    r.add_argument("--val-every-steps", type=int, default=0, help="validate every N steps (0 = each epoch)")
    r.add_argument("--log-every-steps", type=int, default=10, help="log line + TensorBoard scalars every N steps")
    r.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a collective may wait before the rank gives up (a dead peer ends the run)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train the Chinese CLIP dual encoder with DeepSpeed "
                    "(deepspeed launch/train.py --deepspeed_config ds_configs/X.json ...)")
    _data_flags(p)
    _model_flags(p)
    add_speed_arguments(p)
    _optimisation_flags(p)
    _run_flags(p)
    # deepspeed.launcher.launch passes --local_rank; the environment's LOCAL_RANK is what we use.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    import deepspeed  # here: its import costs seconds, and only the parser needs it

    deepspeed.add_config_arguments(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


