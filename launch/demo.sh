#!/usr/bin/env bash
# The whole pipeline on bundled synthetic MUGE-format data, on this machine's CPU (`make demo`):
# data -> built training set + valid LMDB -> DeepSpeed training on 2 ranks -> extraction on 2 ranks ->
# top-k both ways -> MUGE evaluator -> zero-shot -> HTML gallery. Everything goes under runs/demo/ (override with DEMO_DIR).
# The data holds some colour x shape x position cells and caption phrasings out of training: the
# target (DEMO_MIN_MEAN_RECALL) is on the seen queries; the held-out scores show generalisation.
# Sizes and steps can be shrunk through the environment (the end-to-end test does):
#   DEMO_TRAIN_IMAGES, DEMO_VALID_IMAGES, DEMO_EPOCHS, DEMO_DS_CONFIG, DEMO_MIN_MEAN_RECALL,
#   DEMO_HOLDOUT_CELLS
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_DIR:-runs/demo}
DATA=$OUT/data
NPROC=${DEMO_RANKS:-2}
TRAIN_IMAGES=${DEMO_TRAIN_IMAGES:-20000}
VALID_IMAGES=${DEMO_VALID_IMAGES:-1500}
EPOCHS=${DEMO_EPOCHS:-6}
LR=${DEMO_LR:-1e-3}
WARMUP=${DEMO_WARMUP:-100}
DS_CONFIG=${DEMO_DS_CONFIG:-ds_configs/cpu_demo_zero2_fp32.json}
MIN_MR=${DEMO_MIN_MEAN_RECALL:-90}
HOLDOUT_CELLS=${DEMO_HOLDOUT_CELLS:-43}  # 10% of the 432 cells
MODEL="--model ViT-demo-64 --text-model BERT-demo"
# Each rank runs one intra-op thread: 2 ranks fill the 2 cores. A huge mmap threshold keeps glibc
# from returning and re-faulting memory on every step (measured: the first minutes ran ~10x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}
# `deepspeed --num_gpus N` on a machine without GPUs starts N CPU ranks on gloo. Naming the CPU
# accelerator there spares DeepSpeed's warning that it found none; and its launcher's own lines on
# one machine ("Unable to find hostfile", "Setting CUDA_VISIBLE_DEVICES=0,1", the commands it runs)
# read like trouble but are routine here: it prints errors only (a failed rank still shows).
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
LAUNCH="deepspeed --log_level error --num_gpus $NPROC --master_port ${DEMO_MASTER_PORT:-29517}"

start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

mkdir -p "$OUT"
step "1/8 synthetic MUGE-format data -> $DATA ($HOLDOUT_CELLS cells and 2 phrasings held out of training)"
python launch/make_synthetic.py --out "$DATA" --train-images "$TRAIN_IMAGES" --valid-images "$VALID_IMAGES" \
    --test-images "${DEMO_TEST_IMAGES:-500}" --holdout-cells "$HOLDOUT_CELLS" --holdout-phrasings

step "2/8 the training set built as at scale (sharded, pre-tokenized) -> $OUT/built/train; valid store -> $OUT/lmdb/valid"
rm -rf "$OUT/built/train"
python launch/build_dataset.py --queries "$DATA/train_queries.jsonl" --images "$DATA/train_imgs.tsv" \
    --output "$OUT/built/train" --vocab "$DATA/vocab.txt" --context-length 16 --resolution 64
python launch/build_lmdb.py --input "$DATA/valid_imgs.tsv" --output "$OUT/lmdb/valid" --resolution 64

step "3/8 training a tiny CLIP with DeepSpeed ($DS_CONFIG) on $NPROC CPU ranks"
rm -rf "$OUT/train"
$LAUNCH launch/train.py --deepspeed_config "$DS_CONFIG" $MODEL --vocab "$DATA/vocab.txt" \
    --train-data "$OUT/built/train" \
    --val-data "$DATA/valid_queries.jsonl" --val-img "$OUT/lmdb/valid" \
    --epochs "$EPOCHS" --lr "$LR" --wd 0.1 --warmup "$WARMUP" --context-length 16 --num-workers 0 \
    --save-frequency 0 --logs "$OUT" --name train --export

step "4/8 extracting valid image and query features on $NPROC ranks"
rm -rf "$OUT/features"
# The run's model_fp32.pt records its configs, vocab and context length: --run is all it needs.
$LAUNCH launch/extract.py --run "$OUT/train" \
    --image-lmdb "$OUT/lmdb/valid" --queries "$DATA/valid_queries.jsonl" \
    --output "$OUT/features" --no-progress

step "5/8 exact top-10, text->image and image->text"
python launch/retrieve.py --image-feats "$OUT/features/image_feats" --text-feats "$OUT/features/text_feats" \
    --top-k 10 --output "$OUT/valid_predictions.jsonl" --no-progress
python launch/retrieve.py --image-feats "$OUT/features/image_feats" --text-feats "$OUT/features/text_feats" \
    --top-k 10 --output "$OUT/valid_predictions_i2t.jsonl" --direction i2t --no-progress

step "6/8 MUGE evaluator: seen queries (the target), held-out cells, held-out phrasings; both directions"
python launch/evaluate.py "$OUT/valid_predictions.jsonl" "$DATA/valid_queries_seen.jsonl" "$OUT/valid_score.json"
for cat in heldout_cells heldout_phrasings; do
    if [ -s "$DATA/valid_queries_$cat.jsonl" ]; then
        python launch/evaluate.py "$OUT/valid_predictions.jsonl" "$DATA/valid_queries_$cat.jsonl" \
            "$OUT/valid_score_$cat.json"
    fi
done
python launch/evaluate.py --mode both --pred "$OUT/valid_predictions.jsonl" \
    --pred-i2t "$OUT/valid_predictions_i2t.jsonl" --ref "$DATA/valid_queries.jsonl" --out "$OUT/valid_score_both.json"

step "7/8 zero-shot classification of the valid images by colour and by shape"
for task in colour shape; do
    python launch/zeroshot.py --run "$OUT/train" \
        --classes "$DATA/classes_$task.txt" --labels "$DATA/valid_labels_$task.jsonl" \
        --templates "$DATA/zeroshot_templates.txt" --image-feats "$OUT/features/image_feats" \
        --output "$OUT/zeroshot_$task.json"
done

step "8/8 gallery"
python launch/gallery.py --predictions "$OUT/valid_predictions.jsonl" --queries "$DATA/valid_queries.jsonl" \
    --images "$OUT/lmdb/valid" --output "$OUT/gallery.html" --run "$OUT/train"

python - "$OUT" "$MIN_MR" <<'PY'
import json, os, sys
out, need = sys.argv[1], float(sys.argv[2])
load = lambda name: json.load(open(os.path.join(out, name)))
row = lambda s: f"R@1 {s['r1']:6.2f}  R@5 {s['r5']:6.2f}  R@10 {s['r10']:6.2f}  mean recall {s['mean_recall']:.2f}"
s = load("valid_score.json")["scoreJson"]
print(f"\nvalid, seen cells and phrasings (target >= {need:g}):")
print(f"  text->image        {row(s)}")
for cat, name in (("heldout_cells", "held-out cells"), ("heldout_phrasings", "held-out phrasings")):
    if os.path.exists(os.path.join(out, f"valid_score_{cat}.json")):
        print(f"  {name:18} {row(load(f'valid_score_{cat}.json')['scoreJson'])}")
both = load("valid_score_both.json")["scoreJson"]
print("valid, all queries, both directions:")
print(f"  text->image        {row(both['t2i'])}")
print(f"  image->text        {row(both['i2t'])}")
print(f"  mean of the six    {both['mean_recall']:.2f}")
for task in ("colour", "shape"):
    z = load(f"zeroshot_{task}.json")
    print(f"zero-shot {task:6} ({z['classes']} classes, {z['images']} images): top-1 {z['top1']:.2f}  "
          f"top-5 {z['top5']:.2f}")
if s["mean_recall"] < need:
    sys.exit(f"mean recall {s['mean_recall']:.2f} on the seen queries is below the required {need:g}")
PY
cat <<MSG

done in $(( $(date +%s) - start ))s. Everything is under $OUT/:
  data/                  synthetic MUGE-format tsv/jsonl + vocab.txt
  built/train            the training set (launch/build_dataset.py: image shards + token arrays)
  lmdb/valid             the valid image store
  train/                 run dir: config.json, train.log, checkpoints/, model_fp32.pt
  train/tensorboard/     TensorBoard logs:  tensorboard --logdir $OUT/train/tensorboard
  features/              image_feats/ and text_feats/ shards (.npz)
  valid_predictions.jsonl  top-10 images per query (MUGE format)
  valid_predictions_i2t.jsonl  top-10 queries per image
  valid_score*.json      the evaluator's scores (seen, held-out cells/phrasings, both directions)
  zeroshot_{colour,shape}.json  zero-shot accuracy, overall and per class
  gallery.html           sample queries with their top-10 images
MSG
