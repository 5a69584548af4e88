#!/usr/bin/env bash
# Chinese-CLIP's two-stage recipe on one machine with N ranks:
#   stage 1: the pretrained image tower locked (--lock-image): the text tower learns to meet its features;
#   stage 2: every weight trains, starting from stage 1's export (--init-from <run>/model_fp32.pt).
#
#   STAGE1_WEIGHTS="--clip-weight-path PRETRAINED/vit-b-16.pt --bert-weight-path PRETRAINED/roberta" \
#   STAGE1_EPOCHS=2 STAGE2_EPOCHS=1 STAGE1_LR=1e-4 STAGE2_LR=2e-5 \
#   bash launch/train_two_stage.sh ds_configs/zero2_bf16.json 8 muge \
#       --train-data DATA/train_queries.jsonl --train-img DATA/lmdb/train \
#       --val-data DATA/valid_queries.jsonl --val-img DATA/lmdb/valid --vocab PRETRAINED/roberta
#
# The flags after NAME go to both stages; the runs are <LOGS>/<NAME>-stage1 and <LOGS>/<NAME>-stage2
# (LOGS defaults to ./logs). Environment: STAGE1_WEIGHTS (stage 1's starting weights, e.g. --init-from X),
# STAGE1_LOCK (default "--lock-image"; "--lock-image --lock-image-proj" freezes the projection too, as
# Chinese-CLIP's --freeze-vision does), STAGE{1,2}_EPOCHS and STAGE{1,2}_LR (default: the flags' own).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 3 ]; then
  echo "usage: $0 DS_CONFIG NUM_RANKS NAME [launch/train.py flags for both stages]" >&2
  exit 2
fi
DS_CONFIG=$1
NUM_RANKS=$2
NAME=$3
shift 3
for flag in "$@"; do
  case "$flag" in
    --logs|--logdir|--name|--init-from|--export|--lock-image|--freeze-image-tower|--epochs|--lr)
      echo "$0: error: $flag is set by this script (see its header: LOGS, NAME, STAGE1_WEIGHTS, STAGE1_LOCK, STAGE{1,2}_EPOCHS, STAGE{1,2}_LR)" >&2
      exit 2 ;;
  esac
done
LOGS=${LOGS:-./logs}
stage_flags() {  # stage number -> its --epochs/--lr when set
  local epochs lr
  epochs=$(eval echo "\${STAGE$1_EPOCHS:-}")
  lr=$(eval echo "\${STAGE$1_LR:-}")
  [ -n "$epochs" ] && printf -- "--epochs\n%s\n" "$epochs"
  [ -n "$lr" ] && printf -- "--lr\n%s\n" "$lr"
  return 0
}
mapfile -t STAGE1 < <(stage_flags 1)
mapfile -t STAGE2 < <(stage_flags 2)
# shellcheck disable=SC2086  # STAGE1_WEIGHTS and STAGE1_LOCK are lists of flags
bash "$REPO/launch/train_single_node.sh" "$DS_CONFIG" "$NUM_RANKS" --logs "$LOGS" --name "$NAME-stage1" \
  ${STAGE1_WEIGHTS:-} ${STAGE1_LOCK:---lock-image} --export ${STAGE1[@]+"${STAGE1[@]}"} "$@"
STAGE1_MODEL="$LOGS/$NAME-stage1/model_fp32.pt"
if [ ! -f "$STAGE1_MODEL" ]; then
  echo "$0: error: stage 1 wrote no $STAGE1_MODEL" >&2
  exit 1
fi
bash "$REPO/launch/train_single_node.sh" "$DS_CONFIG" "$NUM_RANKS" --logs "$LOGS" --name "$NAME-stage2" \
  --init-from "$STAGE1_MODEL" --export ${STAGE2[@]+"${STAGE2[@]}"} "$@"
