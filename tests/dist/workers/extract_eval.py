"""Worker: evaluate_retrieval on every rank of a gloo group; writes rank<r>.json with the scores
and whether the model's training flag survived."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from data.images.store import ImageStore  # noqa: E402
from data.queries import read_queries  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from engine import dist  # noqa: E402
from engine.train.validation import evaluate_retrieval  # noqa: E402
from tests.dist.workers.extract_fixture import load_tiny_model  # noqa: E402


def main(root: str, out: str) -> None:
    dist.init_distributed(use_deepspeed=False)
    root_p = Path(root)
    model = load_tiny_model(root_p)
    model.train()
    scores = evaluate_retrieval(model, ImageStore(root_p / "lmdb"), read_queries(root_p / "queries.jsonl"),
                                load_tokenizer(root_p / "vocab.txt"), 16, 4, torch.device("cpu"), k=10)
    Path(out, f"rank{dist.rank()}.json").write_text(json.dumps({"scores": scores, "training": model.training}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
    dist.exit_process(0)
