#!/usr/bin/env bash
# The whole pipeline on bundled synthetic MUGE-format data, on this machine's CPU (`make demo`):
# data -> LMDB -> DeepSpeed training on 2 ranks -> extraction on 2 ranks -> top-k -> MUGE evaluator
# -> HTML gallery. Everything goes under runs/demo/ (override with DEMO_DIR).
# Sizes and steps can be shrunk through the environment (the end-to-end test does):
#   DEMO_TRAIN_IMAGES, DEMO_VALID_IMAGES, DEMO_EPOCHS, DEMO_DS_CONFIG, DEMO_MIN_MEAN_RECALL
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
MODEL="--model ViT-demo-64 --text-model BERT-demo"
# Each rank runs one intra-op thread: 2 ranks fill the 2 cores. A huge mmap threshold keeps glibc
# from returning and re-faulting memory on every step (measured: the first minutes ran ~10x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
# `deepspeed --num_gpus N` on a machine without GPUs starts N CPU ranks on gloo.
LAUNCH="deepspeed --num_gpus $NPROC --master_port ${DEMO_MASTER_PORT:-29517}"

start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

mkdir -p "$OUT"
step "1/7 synthetic MUGE-format data -> $DATA"
python launch/make_synthetic.py --out "$DATA" --train-images "$TRAIN_IMAGES" --valid-images "$VALID_IMAGES" \
    --test-images "${DEMO_TEST_IMAGES:-500}"

step "2/7 LMDB image stores (uint8 tensors, built once) -> $OUT/lmdb"
for split in train valid; do
    python launch/build_lmdb.py --input "$DATA/${split}_imgs.tsv" --output "$OUT/lmdb/$split" --resolution 64
done

step "3/7 training a tiny CLIP with DeepSpeed ($DS_CONFIG) on $NPROC CPU ranks"
rm -rf "$OUT/train"
$LAUNCH launch/train.py --deepspeed_config "$DS_CONFIG" $MODEL --vocab "$DATA/vocab.txt" \
    --train-data "$DATA/train_queries.jsonl" --train-img "$OUT/lmdb/train" \
    --val-data "$DATA/valid_queries.jsonl" --val-img "$OUT/lmdb/valid" \
    --epochs "$EPOCHS" --lr "$LR" --wd 0.1 --warmup "$WARMUP" --context-length 16 --num-workers 0 \
    --save-frequency 0 --logs "$OUT" --name train --export

step "4/7 extracting valid image and query features on $NPROC ranks"
rm -rf "$OUT/features"
# The run's model_fp32.pt records its configs, vocab and context length: --run is all it needs.
$LAUNCH launch/extract.py --run "$OUT/train" \
    --image-lmdb "$OUT/lmdb/valid" --queries "$DATA/valid_queries.jsonl" \
    --output "$OUT/features" --no-progress

step "5/7 exact top-10"
python launch/retrieve.py --image-feats "$OUT/features/image_feats" --text-feats "$OUT/features/text_feats" \
    --top-k 10 --output "$OUT/valid_predictions.jsonl" --no-progress

step "6/7 MUGE evaluator"
python launch/evaluate.py "$OUT/valid_predictions.jsonl" "$DATA/valid_queries.jsonl" "$OUT/valid_score.json"

step "7/7 gallery"
python launch/gallery.py --predictions "$OUT/valid_predictions.jsonl" --queries "$DATA/valid_queries.jsonl" \
    --images "$OUT/lmdb/valid" --output "$OUT/gallery.html" --run "$OUT/train"

python - "$OUT/valid_score.json" "$MIN_MR" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["scoreJson"]
print(f"\nvalid split: R@1 {s['r1']:.2f}  R@5 {s['r5']:.2f}  R@10 {s['r10']:.2f}  mean recall {s['mean_recall']:.2f}")
if s["mean_recall"] < float(sys.argv[2]):
    sys.exit(f"mean recall {s['mean_recall']:.2f} is below the required {sys.argv[2]}")
PY
cat <<MSG

done in $(( $(date +%s) - start ))s. Everything is under $OUT/:
  data/                  synthetic MUGE-format tsv/jsonl + vocab.txt
  lmdb/{train,valid}     image stores
  train/                 run dir: config.json, train.log, checkpoints/, model_fp32.pt
  train/tensorboard/     TensorBoard logs:  tensorboard --logdir $OUT/train/tensorboard
  features/              image_feats/ and text_feats/ shards (.npz)
  valid_predictions.jsonl  top-10 per query (MUGE format)
  valid_score.json       the evaluator's score
  gallery.html           sample queries with their top-10 images
MSG
