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
# Relative paths (hostfile, DeepSpeed config, data, the default ./logs) are read from the directory
# you run this in, as for any command; the repository's launch/train.py is found from this script.
# Each host appears once in the hostfile. Two "nodes" on one machine (a trial of the multi-node path):
# a hostfile with the lines `localhost slots=1` and `127.0.0.1 slots=1`, MASTER_ADDR=127.0.0.1, and
# NODE_RANK=0 and NODE_RANK=1 started in two shells.
#
# MASTER_ADDR defaults to the hostfile's first host, MASTER_PORT to 29500.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: [NODE_RANK=n] $0 HOSTFILE DS_CONFIG [launch/train.py flags]" >&2
  exit 2
fi
HOSTFILE=$1
DS_CONFIG=$2
shift 2
if [ ! -f "$HOSTFILE" ]; then
  echo "train_multi_node.sh: error: hostfile $HOSTFILE not found (relative to $PWD)" >&2
  exit 2
fi
if [ -d "$REPO/.venv/bin" ]; then export PATH="$REPO/.venv/bin:$PATH"; fi

# Check the hostfile and build {"host": [0, 1, ..., slots-1], ...} in hostfile order, base64 as the
# per-node launcher expects. A duplicated host would silently merge two nodes into one.
WORLD_INFO=$(python - "$HOSTFILE" "${NODE_RANK:-}" <<'PY'
import base64, json, re, sys
path, node_rank = sys.argv[1], sys.argv[2]
world, first_line = {}, {}
for n, line in enumerate(open(path), 1):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
    if not m:
        sys.exit(f"train_multi_node.sh: error: {path}:{n}: expected '<host> slots=<n>', got {line!r}")
    host = m.group(1)
    if host in world:
        sys.exit(f"train_multi_node.sh: error: {path}:{n}: host {host} is already listed on line {first_line[host]}; "
                 f"list each node once (two nodes on one machine: localhost and 127.0.0.1)")
    world[host], first_line[host] = list(range(int(m.group(2)))), n
if not world:
    sys.exit(f"train_multi_node.sh: error: {path}: no hosts")
if node_rank and not (node_rank.isdigit() and int(node_rank) < len(world)):
    sys.exit(f"train_multi_node.sh: error: NODE_RANK={node_rank}, but {path} lists {len(world)} node(s): "
             f"NODE_RANK must be 0..{len(world) - 1}")
print(base64.urlsafe_b64encode(json.dumps(world).encode()).decode())
PY
) || exit 2
FIRST_HOST=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
MASTER_ADDR=${MASTER_ADDR:-$FIRST_HOST}
MASTER_PORT=${MASTER_PORT:-29500}

if [ -z "${NODE_RANK:-}" ]; then
  exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$REPO/launch/train.py" --deepspeed_config "$DS_CONFIG" "$@"
fi
exec python -m deepspeed.launcher.launch --world_info="$WORLD_INFO" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  "$REPO/launch/train.py" --deepspeed_config "$DS_CONFIG" "$@"
