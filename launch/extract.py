"""Encode a split's images (from the LMDB) and queries (from jsonl) into feature shards.

  python launch/extract.py --run logs/NAME \
      --image-lmdb DATA/lmdb/valid --queries DATA/valid_queries.jsonl --output OUT [--jsonl]
  python launch/extract.py --model ViT-B-16 --text-model RoBERTa-wwm-ext-base-chinese \
      --weights clip_cn_vit-b-16.pt --vocab DATA/vocab.txt --image-lmdb ... --queries ... --output OUT

Our model_fp32.pt (train.py --export) carries its configs, vocab and context length: --weights FILE or
--run RUN_DIR is enough. Flags given as well must agree with it (a conflict is an error naming both).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.files import InputError, report_input_error  # noqa: E402
from engine.inference.model import add_model_flags  # noqa: E402

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_store(store, loaded, where) -> None:
    """The store's images must be the model's size; a resize mode other than the one the model was
    trained on is warned about (the features are then off, not wrong in shape)."""
    if store.resolution != loaded.resolution:
        raise InputError(f"--image-lmdb {where} holds {store.resolution} px images, the model expects "
                         f"{loaded.resolution} px")
    from engine import dist

    if loaded.resize is not None and store.resize != loaded.resize and dist.is_main():
        print(f"extract.py: warning: {where} was built with --resize {store.resize}, the model was trained on images "
              f"resized by {loaded.resize}; rebuild it with launch/build_lmdb.py --resize {loaded.resize}",
              file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, vocab_help="tokenizer folder or vocab.txt (default: the one the model file carries; "
                    "needed with --queries for other weights)",
                    weights_help="whole model: our model_fp32.pt, a Chinese-CLIP .pt or an HF ChineseCLIP folder")
    p.add_argument("--image-lmdb", default=None, help="image store (launch/build_lmdb.py) to encode")
    p.add_argument("--queries", default=None, help="queries jsonl to encode: MUGE's *_queries.jsonl or Chinese-CLIP's "
                   "*_texts.jsonl (the text features record which, and retrieve.py answers in it)")
    p.add_argument("--output", required=True, help="folder for image_feats/ and text_feats/")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
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

    import numpy as np
    import torch

    from engine import dist
    from engine.inference.extract import extract_split
    from engine.inference.model import load_model

    dist.init_distributed(use_deepspeed=False)
    try:
        t0 = time.perf_counter()
        device = dist.device() if a.device == "auto" else torch.device(a.device)
        if a.precision == "fp16" and device.type != "cuda":
            raise InputError("--precision fp16 needs a GPU (CPUs here have no fp16 arithmetic); use fp32 or bf16")
        store = queries = None
        # Model, tokenizer and context length first: a mismatch ends the run before any work.
        loaded = load_model(a.weights, a.run, a.model, a.text_model, a.vocab, a.context_length)
        if loaded.weights is None and dist.is_main():
            print("extract.py: warning: no --weights, encoding with random weights", file=sys.stderr)
        if a.queries and loaded.tokenizer is None:
            raise InputError("--queries needs --vocab (or a model file that carries its vocabulary)")
        if a.image_lmdb:
            from data.images.store import ImageStore

            store = ImageStore(a.image_lmdb)
            check_store(store, loaded, a.image_lmdb)
        if a.queries:
            from data.queries import read_queries

            queries = read_queries(a.queries)
            if dist.is_main():
                from data.queries import describe_schema

                print(describe_schema(a.queries, queries.schema), file=sys.stderr)
        model = loaded.model.to(device=device, dtype=getattr(torch, PRECISIONS[a.precision]))
        written = extract_split(model, a.output, device, a.batch_size, store=store, queries=queries,
                                tokenizer=loaded.tokenizer, context_length=loaded.context_length,
                                feature_dtype=np.dtype(a.feature_dtype), jsonl=a.jsonl,
                                progress=not a.no_progress,
                                models={"image_model": a.model, "text_model": a.text_model,
                                        "weights": str(loaded.weights.resolve()) if loaded.weights else None})
        if dist.is_main():
            print(f"extracted on {dist.world_size()} rank(s) in {time.perf_counter() - t0:.1f}s: "
                  + ", ".join(f"{k} -> {v}" for k, v in written.items()))
    except ValueError as e:  # InputError / WeightConversionError (bad files), unknown config names
        return report_input_error("extract.py", e)
    return 0


if __name__ == "__main__":
    from engine import dist

    dist.exit_process(main())  # waits for the other ranks on success; never blocks on a dead one
