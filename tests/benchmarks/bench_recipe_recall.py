"""What each training recipe does to held-out recall at equal steps, on the synthetic benchmark (CPU).

The demo's data (launch/make_synthetic.py with 43 colour x shape x position cells and two caption
phrasings held out of training) and model (ViT-demo-64 + BERT-demo), trained by launch/train.py in
one process for the same number of steps per recipe and seed, then scored text->image (mean recall,
full pool of the valid images) on the seen queries, the held-out cells and the held-out phrasings.

Recipes (--recipes picks some):
  clip        the default softmax loss, from scratch (the reference for the next three)
  siglip      --loss siglip, from scratch
  distill     --distill-from a teacher: a larger model (6 blocks x 192 wide image tower, 4 text layers x
              192) trained --teacher-steps on the same data with the clip loss
  ft          fine-tuning a pretrained model: --init-from the seed-1 clip run, --ft-steps more steps
  ft-lock     the same with the image tower locked (--lock-image)
  ft-decay    the same with layer-wise lr decay (--image-lr-decay 0.75 --text-lr-decay 0.75)

  python tests/benchmarks/bench_recipe_recall.py --workdir runs/recipe_recall --seeds 1,2,3
  python tests/benchmarks/bench_recipe_recall.py --recipes clip,siglip --seeds 1,2,3 --steps 300

Runs already done in --workdir (their score file exists) are reused, so a table can grow run by run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TEACHER_VISION = {"embed_dim": 128, "image_resolution": 64, "vision_layers": 6, "vision_width": 192,
                  "vision_patch_size": 16, "vision_heads": 6, "act": "quick_gelu"}
TEACHER_TEXT = {"vocab_size": 21128, "hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 6,
                "intermediate_size": 768, "max_position_embeddings": 128, "type_vocab_size": 2,
                "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "pad_token_id": 0}
CATEGORIES = ("seen", "heldout_cells", "heldout_phrasings")
ALL_RECIPES = ("clip", "siglip", "distill", "ft", "ft-lock", "ft-decay")


def _run(cmd, log: Path) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}; see {log}")


def make_data(work: Path, train_images: int, valid_images: int) -> Path:
    data = work / "data"
    if not (data / "lmdb" / "valid" / "data.mdb").is_file():
        work.mkdir(parents=True, exist_ok=True)
        _run(["launch/make_synthetic.py", "--out", data, "--train-images", train_images, "--valid-images",
              valid_images, "--test-images", 50, "--image-size", 64, "--holdout-cells", 43, "--holdout-phrasings",
              "--build-lmdb", "--no-progress", "--workers", 1], work / "make_synthetic.log")
    return data


def train(work: Path, data: Path, name: str, steps: int, seed: int, extra, model=("ViT-demo-64", "BERT-demo"),
          batch: int = 64) -> Path:
    """One launch/train.py run of `steps` steps with a cosine schedule that ends with them."""
    run = work / "runs" / name
    if (run / "model_fp32.pt").is_file():
        return run
    ds = work / f"ds_micro{batch}.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
                              "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
                              "steps_per_print": 10 ** 9}))
    per_epoch = max(1, _pairs(data) // batch)
    epochs = math.ceil(steps / per_epoch)
    _run(["launch/train.py", "--deepspeed_config", ds, "--model", model[0], "--text-model", model[1],
          "--vocab", data / "vocab.txt", "--train-data", data / "train_queries.jsonl", "--train-img",
          data / "lmdb" / "train", "--epochs", epochs, "--max-steps", steps, "--lr", "1e-3", "--wd", "0.1",
          "--warmup", max(1, steps // 10), "--context-length", 16, "--num-workers", 0, "--save-frequency", 0,
          "--log-every-steps", 50, "--seed", seed, "--logs", work / "runs", "--name", name, "--export",
          "--overwrite", *extra], work / f"{name}.log")
    return run


def _pairs(data: Path) -> int:
    from data.queries import read_queries, training_pairs

    return len(training_pairs(read_queries(data / "train_queries.jsonl")))


def score(run: Path, data: Path) -> dict:
    """Text->image mean recall of the run's model_fp32.pt on each query category (cached in the run)."""
    out = run / "recipe_scores.json"
    if out.is_file():
        return json.loads(out.read_text())
    import torch

    from data.images.store import ImageStore
    from data.queries import read_queries
    from engine.inference.model import load_model
    from engine.train.validation import evaluate_both_directions

    m = load_model(str(run / "model_fp32.pt"))
    store = ImageStore(data / "lmdb" / "valid")
    res = {}
    for cat in CATEGORIES:
        queries = read_queries(data / f"valid_queries_{cat}.jsonl")
        metrics = evaluate_both_directions(m.model, store, queries, m.tokenizer, m.context_length, 256,
                                           torch.device("cpu"))
        res[cat] = {"mean_recall": metrics["mean_recall"], "r1": metrics["r1"]}
    out.write_text(json.dumps(res))
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/recipe_recall")
    p.add_argument("--recipes", default=",".join(ALL_RECIPES))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=300, help="steps of each from-scratch run")
    p.add_argument("--ft-steps", type=int, default=150, help="steps of each fine-tuning run")
    p.add_argument("--teacher-steps", type=int, default=900)
    p.add_argument("--train-images", type=int, default=8000)
    p.add_argument("--valid-images", type=int, default=1000)
    a = p.parse_args()
    work = Path(a.workdir).resolve()
    data = make_data(work, a.train_images, a.valid_images)
    seeds = [int(s) for s in a.seeds.split(",")]
    recipes = a.recipes.split(",")
    t0, load0 = time.time(), os.getloadavg()
    teacher = None
    if "distill" in recipes:
        cfgs = work / "teacher_configs"
        cfgs.mkdir(exist_ok=True)
        (cfgs / "ViT-teacher.json").write_text(json.dumps(TEACHER_VISION))
        (cfgs / "BERT-teacher.json").write_text(json.dumps(TEACHER_TEXT))
        teacher = train(work, data, "teacher", a.teacher_steps, 1000, [],
                        model=(str(cfgs / "ViT-teacher.json"), str(cfgs / "BERT-teacher.json")))
    extra = {"clip": [], "siglip": ["--loss", "siglip"],
             "distill": ["--distill-from", teacher / "model_fp32.pt"] if teacher else [],
             "ft": [], "ft-lock": ["--lock-image"], "ft-decay": ["--image-lr-decay", "0.75", "--text-lr-decay", "0.75"]}
    table = {}
    if teacher is not None:
        table["teacher"] = {1000: score(teacher, data)}
    pretrained = None
    for recipe in recipes:
        for seed in seeds:
            if recipe.startswith("ft"):
                pretrained = pretrained or train(work, data, "clip-seed1", a.steps, 1, [])
                run = train(work, data, f"{recipe}-seed{seed}", a.ft_steps, seed,
                            ["--init-from", pretrained / "model_fp32.pt", *extra[recipe]])
            else:
                run = train(work, data, f"{recipe}-seed{seed}", a.steps, seed, extra[recipe])
            table.setdefault(recipe, {})[seed] = score(run, data)
            print(f"{recipe} seed {seed}: " + ", ".join(f"{c} {v['mean_recall']:.2f}" for c, v in
                                                        table[recipe][seed].items()), flush=True)
    print(f"\n{a.train_images} training images, steps: {a.steps} from scratch, {a.ft_steps} fine-tuning (from "
          f"clip-seed1), teacher {a.teacher_steps}; batch 64, one process; text->image mean recall, mean "
          f"+- half range over seeds {a.seeds}\n")
    print("| recipe | " + " | ".join(CATEGORIES) + " | R@1 held-out cells |\n|---|---|---|---|---|")
    for recipe, by_seed in table.items():
        cells = []
        for cat in CATEGORIES:
            v = [s[cat]["mean_recall"] for s in by_seed.values()]
            cells.append(f"{statistics.mean(v):.1f} ± {(max(v) - min(v)) / 2:.1f}")
        r1 = [s["heldout_cells"]["r1"] for s in by_seed.values()]
        print(f"| {recipe} | " + " | ".join(cells) + f" | {statistics.mean(r1):.1f} ± {(max(r1) - min(r1)) / 2:.1f} |")
    print(f"\n{(time.time() - t0) / 60:.1f} min; load average {' '.join(f'{v:.2f}' for v in load0)} at the start, "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end")
    (work / "table.json").write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
