"""Rank worker: several short launch/train.py runs in one process (imports and the process group
are paid once). Each run is `NAME:DS_CONFIG[:EXTRA FLAGS separated by commas]`; all share the data
and the run root. ZeRO-3 must run in a process of its own (DeepSpeed 0.19.8 cannot build a second
ZeRO-3 engine in one process).

usage: engine_runs.py DATA_DIR LOGS RUN [RUN ...]
"""
import importlib.util
import sys
from pathlib import Path

from tests.dist.workers.engine_common import TRAIN, make_data, train_argv


def main() -> int:
    data_dir, logs, runs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    data = make_data(Path(data_dir))
    spec = importlib.util.spec_from_file_location("train_cli", TRAIN)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for run in runs:
        name, ds, *extra = run.split(":")
        flags = extra[0].split(",") if extra else []
        rc = cli.main(train_argv(data, ds, logs, name, flags)[1:])
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    from engine import dist

    dist.exit_process(main())
