"""Encode a split's images (from the LMDB) and queries (from jsonl) into feature shards.

  python launch/extract.py --model ViT-B-16 --text-model RoBERTa-wwm-ext-base-chinese \
      --weights RUN/model_fp32.pt --vocab DATA/vocab.txt \
      --image-lmdb DATA/lmdb/valid --queries DATA/valid_queries.jsonl --output OUT [--jsonl]
  deepspeed --num_gpus 8 launch/extract.py ...   (or torchrun --nproc_per_node N ...)

Writes OUT/image_feats/part-RRRRR-of-WWWWW.npz and OUT/text_feats/... (ids int64, feats
L2-normalised), one shard per rank, each atomically; --jsonl also writes OUT/image_feats.jsonl and
OUT/text_feats.jsonl in the seed's MUGE format. Then: launch/retrieve.py --image-feats
OUT/image_feats --text-feats OUT/text_feats --output pred.jsonl.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.files import InputError  # noqa: E402

EXIT_BAD_INPUT = 2
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_model(a, tokenizer, device):
    """The CLIP the flags describe, with --weights loaded, in eval mode on `device`."""
    import torch

    from models import build_clip, load_text_config
    from models.convert import load_pretrained_clip

    vocab_size = None
    if tokenizer is not None:
        n_tok = len(tokenizer.get_vocab())
        vocab_size = n_tok if n_tok != load_text_config(a.text_model).vocab_size else None
    model = build_clip(a.model, a.text_model, vocab_size=vocab_size)
    if a.weights:
        report = load_pretrained_clip(model, a.weights)
        from engine import dist

        if dist.is_main():
            print(report)
    else:
        print("extract.py: warning: no --weights, encoding with random weights", file=sys.stderr)
    return model.to(device=device, dtype=getattr(torch, PRECISIONS[a.precision])).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16", help="vision config name (models/configs) or JSON path")
    p.add_argument("--text-model", default="RoBERTa-wwm-ext-base-chinese", help="text config name or JSON path")
    p.add_argument("--weights", default=None,
                   help="whole model: our model_fp32.pt, a Chinese-CLIP .pt or an HF ChineseCLIP folder")
    p.add_argument("--vocab", default=None, help="tokenizer folder or vocab.txt (needed with --queries)")
    p.add_argument("--image-lmdb", default=None, help="image store (launch/build_lmdb.py) to encode")
    p.add_argument("--queries", default=None, help="MUGE queries jsonl to encode")
    p.add_argument("--output", required=True, help="folder for image_feats/ and text_feats/")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--context-length", type=int, default=52)
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="model arithmetic (fp16 needs a GPU); features are re-normalised in fp32")
    p.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32",
                   help="stored features (fp16 halves the files; top-k then reads them back as fp32)")
    p.add_argument("--jsonl", action="store_true", help="also write MUGE jsonl feature files")
    p.add_argument("--device", default="auto", help="auto (this rank's GPU if any), cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not a.image_lmdb and not a.queries:
        p.error("nothing to do: give --image-lmdb and/or --queries")
    if a.queries and not a.vocab:
        p.error("--queries needs --vocab")

    import numpy as np
    import torch

    from engine import dist
    from engine.extract import extract_split

    dist.init_distributed(use_deepspeed=False)
    try:
        t0 = time.perf_counter()
        device = dist.device() if a.device == "auto" else torch.device(a.device)
        if a.precision == "fp16" and device.type != "cuda":
            raise InputError("--precision fp16 needs a GPU (CPUs here have no fp16 arithmetic); use fp32 or bf16")
        store = queries = tokenizer = None
        if a.image_lmdb:
            from data.lmdb_store import ImageStore

            store = ImageStore(a.image_lmdb)
        if a.queries:
            from data.pairs import read_queries
            from data.tokenizer import load_tokenizer

            queries = read_queries(a.queries)
            tokenizer = load_tokenizer(a.vocab)
        model = build_model(a, tokenizer, device)
        if store is not None and store.resolution != model.image_resolution:
            raise InputError(f"--image-lmdb {a.image_lmdb} holds {store.resolution} px images, "
                             f"--model {a.model} expects {model.image_resolution} px")
        written = extract_split(model, a.output, device, a.batch_size, store=store, queries=queries,
                                tokenizer=tokenizer, context_length=a.context_length,
                                feature_dtype=np.dtype(a.feature_dtype), jsonl=a.jsonl,
                                progress=not a.no_progress,
                                models={"image_model": a.model, "text_model": a.text_model,
                                        "weights": str(Path(a.weights).resolve()) if a.weights else None})
        if dist.is_main():
            print(f"extracted on {dist.world_size()} rank(s) in {time.perf_counter() - t0:.1f}s: "
                  + ", ".join(f"{k} -> {v}" for k, v in written.items()))
    except InputError as e:
        print(f"extract.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    from engine import dist

    dist.exit_process(main())  # waits for the other ranks on success; never blocks on a dead one
