"""DeepSpeed's CPU comm op across two checkouts on one machine: seconds per launch, and whether a launch
rewrote the op's library, for launches A, B, A again.

  python tests/benchmarks/bench_op_builds.py [--code TREE] [--workdir /tmp/bench_op_builds]

TREE is a checkout's code (default: this one; `git worktree add /tmp/old <commit>` gives an older
one). Each of the two checkouts gets a copy of TREE's code and a venv of its own that sees this venv's
packages through a .pth file but has its own copy of DeepSpeed, whose source paths go into the build,
as two real venvs would. HOME is a fresh folder. A launch is what launch/train.py does before
training: the process set-up (engine/train/ops.py, when TREE has it) and joining a 1-rank group
through DeepSpeed, which loads the op and JIT-builds it when needed.
"""
import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NEW = ("import sys; sys.path.insert(0, sys.argv[1]); from engine import dist; from engine.train import ops; "
       "ops.prepare_process(); ops.comm_op_notice(); dist.init_distributed(always=True)")
OLD = "import sys; sys.path.insert(0, sys.argv[1]); from engine import dist; dist.init_distributed(always=True)"


def checkout(code: Path, root: Path) -> Path:
    import deepspeed

    for part in ("engine", "models", "data", "launch"):
        shutil.copytree(code / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
                    str(root / ".venv")], check=True)
    site = next((root / ".venv" / "lib").glob("python*/site-packages"))
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shutil.copytree(Path(deepspeed.__file__).parent, site / "deepspeed", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", type=Path, default=REPO)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_op_builds"))
    a = p.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    home = a.workdir / "home"
    home.mkdir(parents=True)
    launch = NEW if (a.code / "engine" / "train" / "ops.py").is_file() else OLD
    first, second = checkout(a.code, a.workdir / "a"), checkout(a.code, a.workdir / "b")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "PYTHONPATH")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    print(f"{'launch':8} {'seconds':>8}  op library written  notice")
    for name, root in (("A", first), ("B", second), ("A again", first)):
        before = {q: q.stat().st_mtime_ns for q in a.workdir.rglob("deepspeed_shm_comm.so")}
        t0 = time.perf_counter()
        run = subprocess.run([str(root / ".venv" / "bin" / "python"), "-c", launch, str(root)], cwd=root, env=env,
                             capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        written = [str(q.relative_to(a.workdir)) for q in a.workdir.rglob("deepspeed_shm_comm.so")
                   if before.get(q) != q.stat().st_mtime_ns]
        notice = next((line for line in run.stdout.splitlines() if line.startswith(("building", "waiting"))), "-")
        print(f"{name:8} {seconds:8.1f}  {', '.join(written) or 'none'}  {notice[:60]}", flush=True)
        if run.returncode:
            sys.exit(run.stderr[-2000:])


if __name__ == "__main__":
    main()
