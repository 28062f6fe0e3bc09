"""The plain method: an open_clip CLIP with Long-CLIP's stretched text positions, trained with
open_clip's contrastive loss on one caption per image (what ``train_clip`` trained before the
baselines; their extra cost is measured against it)."""

from __future__ import annotations

from open_clip import ClipLoss

from hic.clip_model import create_long_clip
from hic.methods.base import Context, Method


class Clip(Method):
    name = "clip"

    def build(self, device="cpu", pretrained=True):
        s = self.settings
        model, self.train_transform, self.eval_transform, self.tokenizer = create_long_clip(
            s.arch,
            pretrained=s.pretrained if pretrained else None,
            keep=s.keep_positions,
            factor=s.stretch,
            device=device,
        )
        return model

    def example(self, image, text, rng):
        return {"image": self.train_transform(image), "text": self.tokenizer([text])[0]}

    def loss(self, outputs, ctx: Context):
        loss_fn = ClipLoss(gather_with_grad=ctx.gather, rank=ctx.rank, world_size=ctx.world)
        return loss_fn(
            outputs["image_features"], outputs["text_features"], outputs["logit_scale"]
        ), {}

    def text_features(self, model, texts):
        device = next(model.parameters()).device
        return model.encode_text(self.tokenizer(texts).to(device), normalize=True)
