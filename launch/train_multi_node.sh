#!/usr/bin/env bash
# Train on the nodes of a hostfile (see launch/hostfile.example).
#
# With passwordless ssh from this node to every node (DeepSpeed's pdsh launcher), run once:
#   bash launch/train_multi_node.sh launch/hostfile ds_configs/zero2_bf16.json --train-data ... --name run1
#
# Without ssh (a scheduler starts one copy per node, or by hand), run on EVERY node with its index:
#   NODE_RANK=0 bash launch/train_multi_node.sh launch/hostfile ds_configs/zero2_bf16.json ...   # on node-a
#   NODE_RANK=1 bash launch/train_multi_node.sh launch/hostfile ds_configs/zero2_bf16.json ...   # on node-b
# This runs DeepSpeed's per-node launcher (deepspeed.launcher.launch) with the world described by
# the hostfile, which is what `deepspeed --hostfile` runs on each node over ssh.
#
# MASTER_ADDR defaults to the hostfile's first host, MASTER_PORT to 29500.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: [NODE_RANK=n] $0 HOSTFILE DS_CONFIG [launch/train.py flags]" >&2
  exit 2
fi
HOSTFILE=$1
DS_CONFIG=$2
shift 2
if [ -d .venv/bin ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
FIRST_HOST=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
MASTER_ADDR=${MASTER_ADDR:-$FIRST_HOST}
MASTER_PORT=${MASTER_PORT:-29500}

if [ -z "${NODE_RANK:-}" ]; then
  exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    launch/train.py --deepspeed_config "$DS_CONFIG" "$@"
fi

# {"host": [0, 1, ..., slots-1], ...} in hostfile order, base64 as the launcher expects.
WORLD_INFO=$(python - "$HOSTFILE" <<'PY'
import base64, json, re, sys
world = {}
for n, line in enumerate(open(sys.argv[1]), 1):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
    if not m:
        sys.exit(f"{sys.argv[1]}:{n}: expected '<host> slots=<n>', got {line!r}")
    world[m.group(1)] = list(range(int(m.group(2))))
print(base64.urlsafe_b64encode(json.dumps(world).encode()).decode())
PY
)
exec python -m deepspeed.launcher.launch --world_info="$WORLD_INFO" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  launch/train.py --deepspeed_config "$DS_CONFIG" "$@"
