"""The distillation teacher: a trained CLIP, frozen, run without gradient in the training precision,
on the training device or a device of its own (--distill-device), once per micro-batch.

It is loaded by engine.inference.model.load_model, like every tool's model, so --distill-from takes
what --init-from takes (our model file, a ChineseCLIPModel folder, a Chinese-CLIP checkpoint with
--distill-model/--distill-text-model). It reads the student's token ids, so its vocabulary must be the
training one: a teacher that carries another one is refused (there is no mapping between two
tokenizers' ids); one that carries none must at least have the same number of tokens. Images arrive
normalised for the student's store; they are brought to the teacher's resolution and mean/std.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Optional

import torch
from torch.nn import functional as F

from data.files import InputError
from engine.inference.model import load_model

log = logging.getLogger("clip")


class Teacher:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, student_mean, student_std,
                 teacher_mean, teacher_std, resolution: int):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype, self.resolution = device, dtype, resolution
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(teacher_mean), torch.tensor(teacher_std)
        # x_teacher = (x_student * s_std + s_mean - t_mean) / t_std = x_student * a + b, per channel
        self._renorm = None if (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std)) else (
            (s_std / t_std).view(1, 3, 1, 1).to(device), ((s_mean - t_mean) / t_std).view(1, 3, 1, 1).to(device))
        self.seconds, self.calls = 0.0, 0

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The teacher's features and logit scale for a micro-batch, on the student's device, fp32."""
        t0 = time.perf_counter()
        home = pixels.device
        first_on_cuda = self.calls == 0 and self.device.type == "cuda"
        if first_on_cuda:  # its activations' peak, once: the parameters are known from the start
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        to_gpu = self.device.type == "cuda"  # a non-blocking copy to the host could be read before it lands
        x = pixels.to(self.device, non_blocking=to_gpu).float()
        if self._renorm is not None:
            x = x * self._renorm[0] + self._renorm[1]
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False,
                              antialias=True)
        image = self.model.encode_image(x.to(self.dtype))
        text = self.model.encode_text(input_ids.to(self.device, non_blocking=to_gpu))
        out = {"teacher_image_features": image.float().to(home), "teacher_text_features": text.float().to(home),
               "teacher_logit_scale": self.model.scale().float().to(home)}
        if self.device.type == "cuda":  # its work is queued: count it in its own time
            torch.cuda.synchronize(self.device)
        if first_on_cuda:
            log.info("distillation teacher: %.1f MB of activations at its peak for a micro-batch of %d on %s",
                     (torch.cuda.max_memory_allocated(self.device) - base) / 2 ** 20, pixels.shape[0], self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def take_seconds(self) -> float:
        """Seconds spent in the teacher since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _same_vocabulary(teacher_tokenizer, student_tokenizer) -> bool:
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


def load_teacher(path: str, model: Optional[str], text_model: Optional[str], tokenizer, store, context_length: int,
                 device: torch.device, dtype: torch.dtype) -> Teacher:
    """Load, check and place the teacher; raise InputError (one line) when it cannot serve."""
    t0 = time.perf_counter()
    loaded = load_model(weights=path, model=model, text_model=text_model)
    flag = f"--distill-from {path}"
    student_tokens = len(tokenizer.get_vocab())
    if loaded.tokenizer is not None and not _same_vocabulary(loaded.tokenizer, tokenizer):
        raise InputError(f"{flag}: the teacher's tokenizer ({len(loaded.tokenizer.get_vocab())} tokens) differs "
                         f"from the training one ({student_tokens} tokens): it would read the token ids as other "
                         "words, and there is no mapping between the two; distil from a teacher trained with this "
                         "vocab.txt")
    teacher_tokens = loaded.model.text_config.vocab_size
    if loaded.tokenizer is None and teacher_tokens != student_tokens:
        raise InputError(f"{flag}: the teacher's text tower has {teacher_tokens} tokens, the training tokenizer "
                         f"{student_tokens}: it cannot read these token ids")
    max_pos = loaded.model.text_config.max_position_embeddings
    if context_length > max_pos:
        raise InputError(f"{flag}: --context-length {context_length} exceeds the teacher's "
                         f"max_position_embeddings {max_pos}")
    image = loaded.image
    teacher = Teacher(loaded.model, device, dtype, store.mean, store.std, image["mean"], image["std"],
                      loaded.resolution)
    vision = loaded.model.vision_config
    log.info("distillation teacher %s: ViT %d layers x %d wide (embed %d) + text %d layers x %d wide, "
             "%.2fM parameters, %.1f MB in %s on %s%s; loaded in %.1fs%s", path, vision.vision_layers,
             vision.vision_width, vision.embed_dim, loaded.model.text_config.num_hidden_layers,
             loaded.model.text_config.hidden_size, sum(p.numel() for p in teacher.model.parameters()) / 1e6,
             teacher.parameter_bytes / 2 ** 20, str(dtype).replace("torch.", ""), device,
             "" if loaded.resolution == store.resolution else
             f"; images resized {store.resolution} -> {loaded.resolution} px for it",
             time.perf_counter() - t0, "" if loaded.tokenizer is not None else
             "; it carries no vocabulary: assuming the training one (same size)")
    return teacher
