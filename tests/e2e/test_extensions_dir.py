"""Two checkouts on one machine, each with its own venv, in one HOME: launched one after the other, each
builds DeepSpeed's CPU comm op once into its own folder (saying so on one line first), and neither
rebuilds the other's. Before, both built into ~/.cache/torch_extensions from different source paths,
so every launch rebuilt the op (minutes, in silence).

A launch here is what launch/train.py does before any training (engine/train/ops.py's set-up and
notice, then joining the process group through DeepSpeed, which loads and when needed JIT-builds the
op) and what `make venv` does to pre-build it."""
import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.ranks import REPO

pytestmark = pytest.mark.slow

OP = "deepspeed_shm_comm"
LAUNCH = ("import sys; sys.path.insert(0, sys.argv[1]); from engine import dist; from engine.train import ops; "
          "ops.prepare_process(); ops.comm_op_notice(); dist.init_distributed(always=True); print('joined')")


def _checkout(root: Path) -> Path:
    """The code of this repository and a venv of its own: a fresh venv that sees the shared packages
    through a .pth file, with its own copy of DeepSpeed (whose source paths go into the op's build)."""
    for part in ("engine", "models", "data", "launch"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root / ".venv")], check=True, timeout=300)
    shared = Path(sysconfig.get_paths()["purelib"])
    site = next((root / ".venv" / "lib").glob("python*/site-packages"))
    (site / "shared.pth").write_text(str(shared) + "\n")
    import deepspeed

    shutil.copytree(Path(deepspeed.__file__).parent, site / "deepspeed", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _launch(checkout: Path, home: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "PYTHONPATH")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # ninja
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([str(checkout / ".venv" / "bin" / "python"), "-c", LAUNCH, str(checkout)], cwd=checkout,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0 and "joined" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _stamp(build: Path):
    """What a rebuild changes: the library's inode and mtime, and ninja's log of what it ran."""
    so = (build / f"{OP}.so").stat()
    return so.st_ino, so.st_mtime_ns, (build / ".ninja_log").read_bytes()


@pytest.mark.timeout(3600)  # two real C++ builds on a busy 2-core machine
def test_two_checkouts_never_rebuild_each_others_ops(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    a, b = (_checkout(tmp_path / name) for name in ("a", "b"))

    first = _launch(a, home)
    assert f"building DeepSpeed's CPU shared-memory comm op for this checkout in {a / '.torch_extensions'}" in first
    (build_a,) = (a / ".torch_extensions").glob(f"*/{OP}")  # one folder per venv of the checkout
    stamp_a = _stamp(build_a)
    second = _launch(b, home)  # the other checkout builds its own, beside
    assert f"for this checkout in {b / '.torch_extensions'}" in second and _stamp(build_a) == stamp_a
    third = _launch(a, home)  # back to the first: nothing to build, nothing said
    assert "building" not in third and "waiting" not in third
    assert _stamp(build_a) == stamp_a
    assert not (home / ".cache" / "torch_extensions").exists()


def test_the_notice_says_build_wait_or_nothing(tmp_path, monkeypatch, capsys):
    """The one line before a load: a build (nothing built for these sources), a wait (another
    process holds the build's lock), or nothing (built here from these very sources)."""
    from deepspeed.accelerator import get_accelerator

    from engine.train.ops import jit_build_notice

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    what = "the comm op"
    assert jit_build_notice("ShareMemCommBuilder", what).startswith(f"building {what} for this checkout in {tmp_path}")
    build = tmp_path / OP
    (build / "lock").touch()  # torch leaves it after every build: only a held lock means a wait
    assert jit_build_notice("ShareMemCommBuilder", what).startswith("building")
    with open(build / "lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another process building (torch's FileLock is an flock)
        held = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                               "from engine.train.ops import jit_build_notice as n; print(n('ShareMemCommBuilder', 'x'))",
                               str(REPO)], env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "RANK": "0"},
                              capture_output=True, text=True, timeout=600)
    assert "waiting for another process building x" in held.stdout, held.stdout + held.stderr
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    (build / f"{OP}.so").touch()
    (build / "build.ninja").write_text("build shm.o: compile /elsewhere/.venv/deepspeed/ops/csrc/cpu/comm/shm.cpp\n")
    assert jit_build_notice("ShareMemCommBuilder", what).startswith("building")  # another venv's build
    (build / "build.ninja").write_text(f"build x.o: compile {os.path.abspath(builder.deepspeed_src_path(builder.sources()[0]))}\n")
    assert jit_build_notice("ShareMemCommBuilder", what) is None
    monkeypatch.setenv("RANK", "1")
    (build / f"{OP}.so").unlink()
    assert jit_build_notice("ShareMemCommBuilder", what) is None  # rank 0 speaks for all
    capsys.readouterr()
