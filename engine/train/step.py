"""One optimizer step of the contrastive loss over k micro-batches, exact or plain.

Notation: W ranks, k = gradient_accumulation_steps micro-batches of m rows each, so one step sees
N = k*W*m pairs. The target is the gradient of the single-process loss L over all N pairs.

The loss function (models.loss.ClipLoss with engine.dist.all_gather_with_grad) gives, on rank r,
L_r = the loss of r's rows against all gathered columns (local) or of all rows (global). Either way
the gradient the gather sends back to r's own rows is W * dL/dF_r, and DeepSpeed's average over
ranks turns that into exactly dL/dF_r. So k = 1 needs nothing more than the gathered loss.

k > 1, exact (GradCache): the negatives of a step must come from all k micro-batches, but only one
micro-batch's activations fit at a time.
  pass 1: encode every micro-batch without grad, keep only the features (k*m rows per rank);
          compute L_r on them with leaf tensors; one backward through the loss (and the gather)
          gives G = W * dL/dF for this rank's rows, and g_s = dL_r/ds for the logit scale.
  pass 2: per micro-batch j, re-encode with grad (the same RNG state as in pass 1, so dropout draws
          the same masks) and backpropagate the surrogate  k * <F_j, G_j>  (+ k * s * g_s once, j=0).
DeepSpeed divides each backward by k and averages over W, leaving sum_j,r dL/dF_rj dF_rj/dtheta +
dL/ds ds/dtheta: the exact gradient of one k-times larger batch.

k > 1, plain: each micro-batch's loss is backpropagated on its own (negatives from that micro-batch
only). Cheaper and NOT equivalent to a larger batch; offered for comparison.

The same holds for any loss of the model's outputs whose cross-rank parts flow through injected
collectives with gradient: the sigmoid loss (models.sigmoid_loss; its `logit_bias` is a scalar like
the logit scale) and distillation (models.loss.DistillLoss; the teacher's outputs are constants,
made once per micro-batch in pass 1 and never again).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from engine import dist

Batch = Tuple[torch.Tensor, torch.Tensor]  # (pixels on device, input_ids on device)


def _model_inputs(micro_batch) -> Batch:
    """(pixels, input_ids) of a micro-batch: a loader's DeviceBatch normalises its images on the
    device when asked (engine/loader/batches.py); tests and benchmarks may hand the tuple itself."""
    return micro_batch.inputs() if hasattr(micro_batch, "inputs") else micro_batch


class NonFiniteLoss(FloatingPointError):
    pass


@dataclass
class StepResult:
    loss: float          # the step's loss (mean over ranks of the rank losses = the full-batch loss)
    logit_scale: float   # exp(logit_scale) as used in the loss
    parts: Optional[Dict[str, float]] = None  # the loss's named parts (loss_fn.parts), mean over ranks


_FIRST = ("image_features", "text_features", "logit_scale")  # what every loss takes, in this order


def _is_rows(name: str) -> bool:
    """Outputs with one row per sample (split by micro-batch); the others are step-wide scalars."""
    return name.endswith("_features")


@contextlib.contextmanager
def _replay_rng(state):
    """Run a block with given CPU/CUDA RNG states, then put the outer states back."""
    cpu, cuda = torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _capture_rng():
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


class ContrastiveStep:
    """Runs forward/backward/step for one optimizer step on a DeepSpeed engine (or any object with
    the same __call__/backward/step interface, for tests).

    loss_fn(image_features, text_features, logit_scale, **more) -> scalar, where `more` holds the
    model's other outputs by name (logit_bias when the model has one) and the teacher's, e.g.
    ClipLoss(gather=dist.all_gather_with_grad, rank=dist.rank(), local_loss=True). Outputs are cast
    to fp32 before the loss: the softmax over a large batch is where bf16/fp16 would lose the most.
    A loss that sets `parts` (a dict of 0-dim tensors) has them averaged over ranks into the result.
    teacher(pixels, input_ids) -> {"teacher_image_features", ...}: constants for the loss, without grad.
    """

    def __init__(self, engine, loss_fn: Callable, grad_accum: int, exact: bool = True,
                 step_index: Callable[[], int] = None, before_last_step: Callable[[], None] = None,
                 teacher: Optional[Callable] = None):
        self.engine = engine
        self.loss_fn = loss_fn
        self.k = grad_accum
        self.exact = exact and grad_accum > 1
        self.step_index = step_index or (lambda: -1)
        # Called after the last backward of the step, before its engine.step(): gradients are
        # complete (and, at ZeRO 0, averaged over ranks) then, e.g. for a grad-norm readout.
        self.before_last_step = before_last_step or (lambda: None)
        self.teacher = teacher

    def _check_finite(self, loss: torch.Tensor):
        """The mean loss (and loss parts) over ranks; every rank raises together if it is NaN/inf anywhere."""
        parts = getattr(self.loss_fn, "parts", None) or {}
        values = torch.stack([loss.detach().float().reshape(())] +
                             [v.detach().float().reshape(()).to(loss.device) for v in parts.values()])
        total = dist.all_reduce_sum(values) / dist.world_size()
        value = total[0].item()
        if not torch.isfinite(total).all():
            raise NonFiniteLoss(f"loss is {value} at optimizer step {self.step_index() + 1}: stopping "
                                "(weights of this step were not updated; lower --lr, or use bf16/fp32)")
        return value, ({name: v.item() for name, v in zip(parts, total[1:])} if parts else None)

    def _inputs(self, micro_batch) -> Tuple[Dict[str, torch.Tensor], Batch]:
        """The teacher's outputs for a micro-batch (none without a teacher), and the model's inputs."""
        pixels, ids = _model_inputs(micro_batch)
        return (self.teacher(pixels, ids) if self.teacher is not None else {}), (pixels, ids)

    def _loss(self, outputs: Dict[str, torch.Tensor], extra: Dict[str, torch.Tensor]) -> torch.Tensor:
        """loss_fn(image_features, text_features, logit_scale, **the other outputs and the teacher's)."""
        rest = {name: v for name, v in outputs.items() if name not in _FIRST}
        return self.loss_fn(*(outputs[name] for name in _FIRST), **rest, **extra)

    def run(self, micro_batches: Sequence[object]) -> StepResult:
        assert len(micro_batches) == self.k, f"expected {self.k} micro-batches, got {len(micro_batches)}"
        return self._run_exact(micro_batches) if self.exact else self._run_direct(micro_batches)

    def _run_direct(self, micro_batches: Sequence[object]) -> StepResult:
        losses, parts, scale = [], [], 0.0
        for mb in micro_batches:
            extra, (pixels, ids) = self._inputs(mb)
            out = self.engine(pixels, ids)
            loss = self._loss({name: v.float() for name, v in out.items()}, extra)
            value, named = self._check_finite(loss)
            losses.append(value)
            parts.append(named)
            scale = out["logit_scale"].detach().float().reshape(-1)[0].item()
            self.engine.backward(loss)
            if len(losses) == self.k:
                self.before_last_step()
            self.engine.step()
        mean_parts = ({name: sum(p[name] for p in parts) / len(parts) for name in parts[0]} if parts[0] else None)
        return StepResult(sum(losses) / len(losses), scale, mean_parts)

    def _run_exact(self, micro_batches: Sequence[object]) -> StepResult:
        k = self.k
        # pass 1: outputs of the whole step (and the teacher's), no activations kept
        rng, outs, extras = [], [], []
        with torch.no_grad():
            for mb in micro_batches:
                extra, (pixels, ids) = self._inputs(mb)
                rng.append(_capture_rng())
                outs.append({name: v.detach().float() for name, v in self.engine(pixels, ids).items()})
                extras.append(extra)
        rows = [o["image_features"].shape[0] for o in outs]
        # leaves: the rows of every micro-batch concatenated, and the step-wide scalars (logit scale, bias)
        leaves = {name: (torch.cat([o[name] for o in outs]) if _is_rows(name) else outs[-1][name].clone())
                  .requires_grad_(True) for name in outs[0]}
        constants = {name: torch.cat([e[name] for e in extras]) if _is_rows(name) else extras[-1][name]
                     for name in extras[0]}
        loss = self._loss(leaves, constants)
        value, parts = self._check_finite(loss)
        loss.backward()  # through the loss and its collectives only: cheap
        grads = {name: (leaf.grad.split(rows) if _is_rows(name) else leaf.grad) for name, leaf in leaves.items()}

        # pass 2: re-encode each micro-batch with grad and push the cached output gradients in.
        # (_replay_rng puts the outer RNG state back, so the run's RNG advances as in pass 1 only.)
        for j, mb in enumerate(micro_batches):
            pixels, ids = _model_inputs(mb)
            with _replay_rng(rng[j]):
                out = self.engine(pixels, ids)
            # the scalars' gradients come from the loss once per step (j = 0)
            surrogate = sum((out[name].float() * (g[j] if _is_rows(name) else g)).sum()
                            for name, g in grads.items() if _is_rows(name) or j == 0)
            self.engine.backward(surrogate * k)  # DeepSpeed divides every backward by k
            if j == k - 1:
                self.before_last_step()
            self.engine.step()
        return StepResult(value, outs[-1]["logit_scale"].reshape(-1)[0].item(), parts)
