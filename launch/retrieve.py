"""Exact top-k over feature files: images per text (MUGE predictions) or texts per image.

  python launch/retrieve.py --image-feats OUT/image_feats --text-feats OUT/text_feats \
      --top-k 10 --output pred.jsonl [--direction t2i|i2t]
  torchrun --nproc_per_node 2 launch/retrieve.py ...   (or deepspeed --num_gpus 2 ...)

--direction t2i (default) writes {"query_id": q, "item_ids": [k image ids]} per query, or
{"text_id": t, "image_ids": [...]} when the texts came from a Chinese-CLIP *_texts.jsonl (the
text features record the schema of their queries); --direction i2t writes {"image_id": i,
"text_ids": [k text ids]} per image (Chinese-CLIP's image->text format), from the same engine with
the texts as the database.

Features: an .npz (ids, feats), a folder of .npz shards, or MUGE jsonl. Image features are
streamed in blocks (--max-memory-mb bounds the working set); with several ranks each takes a
share of the database blocks and rank 0 writes the merged result. Ties go to the lower database
row (image row for t2i, text row for i2t).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.files import InputError, report_input_error  # noqa: E402

# direction -> (what the queries are, what the database is, the output's key names)
DIRECTIONS = {"t2i": ("queries", "images", "query_id", "item_ids"),
              "i2t": ("images", "texts", "image_id", "text_ids")}


def _warn(warning) -> None:
    """Print a feature-record warning once (rank 0)."""
    dist = sys.modules.get("engine.dist")  # not loaded: one local process (see _one_cpu_process)
    if warning and (dist is None or dist.is_main()):
        print(f"retrieve.py: warning: {warning}", file=sys.stderr)


def _one_cpu_process(device: str) -> bool:
    """No launcher and no GPU asked for or present: search in this process with numpy only, so
    neither torch (2 s to import, much more on a busy machine) nor a process group is loaded."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # as engine.dist.launched_distributed
        return False
    if device == "cpu":
        return True
    gpu_nodes = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL: let torch decide
    return device == "auto" and not any(os.path.exists(p) for p in gpu_nodes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-feats", required=True, help="image features: .npz, folder of .npz, or .jsonl")
    p.add_argument("--text-feats", required=True, help="query features: .npz, folder of .npz, or .jsonl")
    p.add_argument("--direction", choices=sorted(DIRECTIONS), default="t2i",
                   help="t2i: top-k images per text (MUGE); i2t: top-k texts per image")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--output", required=True, help="prediction jsonl to write")
    p.add_argument("--max-memory-mb", type=float, default=2048,
                   help="bound on queries + results + working buffers (process RSS adds ~0.5 GB)")
    p.add_argument("--query-chunk", type=int, default=None, help="queries per matmul (default: from the budget)")
    p.add_argument("--image-block", type=int, default=None,
                   help="database rows (images; texts with --direction i2t) per block (default: from the budget)")
    p.add_argument("--device", default="auto", help="auto (this rank's GPU if any), cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    from engine.inference.feature_files import check_kind, check_same_model, open_features, read_all
    from engine.retrieval.search import distributed_search, plan_blocks, rows_to_ids, search_local
    from engine.scoring.predictions import write_predictions

    local = _one_cpu_process(a.device)
    if not local:
        import torch

        from engine import dist

        dist.init_distributed(use_deepspeed=False)
    try:
        t0 = time.perf_counter()
        device = "cpu" if local else dist.device() if a.device == "auto" else torch.device(a.device)
        q_what, db_what, q_key, db_key = DIRECTIONS[a.direction]
        images = open_features(a.image_feats)
        _warn(check_kind(images.meta, "image", f"--image-feats {a.image_feats}"))
        texts = open_features(a.text_feats)
        _warn(check_kind(texts.meta, "text", f"--text-feats {a.text_feats}"))
        if a.direction == "t2i" and (texts.meta or {}).get("queries_schema") == "chinese-clip":
            q_key, db_key = "text_id", "image_ids"  # answer in the schema of the queries
        check_same_model(images.meta, texts.meta, f"--image-feats {a.image_feats}", f"--text-feats {a.text_feats}")
        queries, database = (texts, images) if a.direction == "t2i" else (images, texts)
        q_ids, q_feats = read_all(queries)
        plan = plan_blocks(len(q_ids), len(database), database.dim, a.top_k, a.max_memory_mb,
                           a.query_chunk, a.image_block)
        if local:
            _, rows = search_local(q_feats, database, a.top_k, plan, progress=not a.no_progress)
        else:
            _, rows = distributed_search(q_feats, database, a.top_k, plan, device=device,
                                         progress=not a.no_progress)
        if local or dist.is_main():
            write_predictions(a.output, q_ids, rows_to_ids(database.ids, rows), q_key, db_key)
            print(f"top-{a.top_k} of {len(database)} {db_what} for {len(q_ids)} {q_what} on "
                  f"{1 if local else dist.world_size()} rank(s), {getattr(device, 'type', device)}, in "
                  f"{time.perf_counter() - t0:.1f}s (blocks {plan.query_chunk} x {plan.image_block}) -> {a.output}")
        if not local:
            dist.barrier()
    except InputError as e:
        return report_input_error("retrieve.py", e)
    return 0


if __name__ == "__main__":
    rc = main()
    if "engine.dist" not in sys.modules:  # one local process: no group to wait for
        sys.exit(rc)
    from engine import dist

    dist.exit_process(rc)  # waits for the other ranks on success; never blocks on a dead one
