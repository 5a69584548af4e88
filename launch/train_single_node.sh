#!/usr/bin/env bash
# Train on one machine with N ranks (GPUs; on a CPU-only box N processes on gloo).
#
#   bash launch/train_single_node.sh ds_configs/zero2_bf16.json 8 \
#       --train-data DATA/train_queries.jsonl --train-img DATA/lmdb/train \
#       --val-data DATA/valid_queries.jsonl --val-img DATA/lmdb/valid \
#       --vocab DATA/vocab.txt --name my_run [more launch/train.py flags]
#
# Relative paths (DeepSpeed config, data, the default ./logs) are read from the directory you run this
# in; the repository's launch/train.py is found from this script.
# MASTER_PORT (default 29500) picks the rendezvous port when several jobs share a machine.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: $0 DS_CONFIG NUM_RANKS [launch/train.py flags]" >&2
  exit 2
fi
DS_CONFIG=$1
NUM_RANKS=$2
shift 2
# The venv's bin first: DeepSpeed rebuilds its JIT ops whenever it finds a different ninja.
if [ -d "$REPO/.venv/bin" ]; then export PATH="$REPO/.venv/bin:$PATH"; fi
exec deepspeed --num_gpus "$NUM_RANKS" --master_port "${MASTER_PORT:-29500}" \
  "$REPO/launch/train.py" --deepspeed_config "$DS_CONFIG" "$@"
