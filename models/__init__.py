"""Model library: plain nn.Modules, architecture JSONs and weight conversion. No DeepSpeed, no
torch.distributed, no engine imports here (the engine injects what it needs, e.g. the loss's gather)."""
from .clip import CLIP, LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, build_clip
from .config import list_model_configs, load_text_config, load_vision_config
from .loss import ClipLoss, DistillLoss, contrastive_loss
from .sigmoid_loss import SigmoidLoss
from .vit import VisionConfig, VisionTransformer

__all__ = ["CLIP", "build_clip", "list_model_configs", "load_vision_config", "load_text_config",
           "ClipLoss", "DistillLoss", "SigmoidLoss", "contrastive_loss", "VisionConfig", "VisionTransformer",
           "LOGIT_SCALE_INIT", "LOGIT_SCALE_MAX"]
