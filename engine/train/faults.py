"""Fault injection for the fault tests: the environment tells a rank to die (or hang) at a chosen step.
Unset in every real run, where `inject_test_fault` returns at once."""
from __future__ import annotations

import os
import signal

from engine import dist


def inject_test_fault(step: int, before_update: bool = False) -> None:
    """Test hook: CLIP_TEST_DIE_AT_STEP=N [CLIP_TEST_DIE_RANK=r] [CLIP_TEST_DIE_HOW=exit|kill|stop] ends
    this rank right after optimizer step N (after any checkpoint of that step), like a crash; `stop`
    SIGSTOPs it instead (a hung rank: alive, silent). CLIP_TEST_DIE_BEFORE_UPDATE=1 moves the fault to
    step N's last backward, before its update, where the peers wait in ZeRO's own collectives."""
    at = os.environ.get("CLIP_TEST_DIE_AT_STEP")
    if not at or int(at) != step or before_update != (os.environ.get("CLIP_TEST_DIE_BEFORE_UPDATE") == "1"):
        return
    who = os.environ.get("CLIP_TEST_DIE_RANK")
    if who is not None and int(who) != dist.rank():
        return
    how = os.environ.get("CLIP_TEST_DIE_HOW", "kill")
    if how in ("kill", "stop"):
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    os._exit(1)
