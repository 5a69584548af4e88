"""Locked towers (models.towers, engine.train.recipe): every parameter of the CLIP has a place in a
tower; a locked tower freezes embeddings, blocks and norms, keeps its last N blocks (and the norm after
them) and its projection trainable as asked; a locked prefix keeps no activation for backward; the
optimizer gets no group entry for a frozen parameter; --freeze-image-tower still freezes all of visual."""
import pytest
import torch

from engine.train.optim import param_groups
from engine.train.recipe import apply_locks
from engine.train.recipe_settings import RecipeSettings
from models import build_clip
from models.towers import lock_tower, place_of, tower_depths


def tiny():
    torch.manual_seed(0)
    return build_clip("ViT-tiny-test", "BERT-tiny-test")  # 2 image blocks, 2 text layers


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_every_parameter_has_a_place():
    m = tiny()
    m.add_logit_bias()
    depths = tower_depths(m)
    assert depths == {"image": 3, "text": 3}
    places = {n: place_of(n, depths) for n, _ in m.named_parameters()}
    assert places["visual.conv1.weight"].layer == 0 and places["visual.ln_pre.weight"].layer == 0
    assert places["visual.transformer.resblocks.1.mlp.c_fc.weight"].layer == 2
    assert places["visual.proj"].projection and places["visual.ln_post.bias"].layer == 3
    assert places["bert.embeddings.word_embeddings.weight"].layer == 0
    assert places["bert.encoder.layer.0.attention.self.query.weight"].layer == 1
    assert places["text_projection"].projection and places["text_projection"].layer == 3
    assert places["logit_bias"].tower is None and places["logit_scale"].tower is None
    with pytest.raises(ValueError, match="no place"):
        place_of("visual.new_thing", depths)


def test_locked_image_tower_trains_only_its_projection():
    m = tiny()
    lock_tower(m, "image")
    visual = {n for n in trainable(m) if n.startswith("visual.")}
    assert visual == {"visual.proj"}
    assert any(n.startswith("bert.") for n in trainable(m)) and "logit_scale" in trainable(m)


def test_unlocked_layers_and_locked_projections_are_respected():
    m = tiny()
    frozen = lock_tower(m, "image", unlocked_layers=1, lock_projection=True)
    visual = {n for n in trainable(m) if n.startswith("visual.")}
    assert visual and all(n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post.")) for n in visual)
    assert {"visual.ln_post.weight", "visual.ln_post.bias"} <= visual  # what follows the unlocked block trains
    assert frozen == sum(p.numel() for n, p in m.named_parameters() if n.startswith("visual.") and not p.requires_grad)
    lock_tower(m, "text", unlocked_layers=2)
    text = {n for n in trainable(m) if n.startswith(("bert.", "text_projection"))}
    assert "text_projection" in text and not any(n.startswith("bert.embeddings.") for n in text)
    assert {n.split(".")[3] for n in text if n.startswith("bert.encoder.")} == {"0", "1"}
    with pytest.raises(ValueError, match="2 blocks"):
        lock_tower(m, "text", unlocked_layers=3)


def test_freeze_image_tower_alias_freezes_all_of_visual():
    m = tiny()
    apply_locks(m, RecipeSettings(lock_image=True, lock_image_proj=True))
    assert not any(n.startswith("visual.") for n in trainable(m))


def test_frozen_parameters_get_no_optimizer_group_entry():
    m = tiny()
    lock_tower(m, "image", unlocked_layers=1)
    for decay in (None, {"image": 0.8, "text": 0.9}):
        in_groups = {id(p) for g in param_groups(m, 0.1, decay) for p in g["params"]}
        assert in_groups == {id(p) for p in m.parameters() if p.requires_grad}


def _saved_activation_shapes(model, pixels, ids):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(pixels, ids)
    (out["image_features"].sum() + out["text_features"].sum()).backward()
    return shapes


def test_a_locked_prefix_keeps_no_activations_for_backward():
    """The image tower's tokens are [B, 17, 48] (16 patches + class token, width 48): with the tower
    locked no tensor of that shape is kept for backward; with its last block unlocked only that
    block's (and nothing of the locked block before it, whose output is that block's input)."""
    pixels, ids = torch.randn(3, 3, 32, 32), torch.randint(5, 100, (3, 8))
    tokens = (3, 17, 48)
    m = tiny()
    assert _saved_activation_shapes(m, pixels, ids).count(tokens) > 0  # the meter sees the tower's activations
    full = _saved_activation_shapes(m, pixels, ids).count(tokens)
    m = tiny()
    lock_tower(m, "image")
    assert _saved_activation_shapes(m, pixels, ids).count(tokens) == 0
    m = tiny()
    lock_tower(m, "image", unlocked_layers=1)
    one_block = _saved_activation_shapes(m, pixels, ids).count(tokens)
    assert 0 < one_block and 2 * one_block <= full + 1, (one_block, full)
