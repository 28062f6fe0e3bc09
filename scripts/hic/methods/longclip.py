"""Long-CLIP (Zhang et al., ECCV 2024; github.com/beichenzbc/Long-CLIP): fine-tune CLIP on long
captions with (1) knowledge-preserved stretching of the text positions and (2) primary
component matching.

(1) ``hic.clip_model.create_long_clip`` stretches 77 positions to 248 (the first 20 kept, the
rest interpolated 4x). As in Long-CLIP's ``model/longclip.py``/``model_longclip.py``, the kept
positions are a separate, frozen tensor: the text encoder reads rows [0, keep) from it and rows
[keep, 248) from the trainable embedding, so fine-tuning never moves the well-trained ones.

(2) Each image is matched twice (``model_longclip.CLIP.forward``): its full feature against
the long caption, and its feature reduced to the batch's top ``pca_dim`` (32) principal
components (PCA over this rank's batch, reconstructed in feature space) against the short
caption; both contrastive, with label smoothing 0.1, summed with equal weights. The short
caption is the long caption's first sentence, cut at the first ". " as Long-CLIP's
``train/sharegpt4v.py`` does (a one-sentence caption is its own short caption).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip import ClipLoss
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from hic.clip_model import create_long_clip
from hic.methods.base import Context, Method


@dataclass(frozen=True)
class Options:
    pca_dim: int = 32  # principal components kept for the short caption (model_longclip.py)
    short_weight: float = 1.0  # loss = long + short_weight * short (train.py: loss_long+short)
    label_smoothing: float = 0.1  # both contrastive losses (model_longclip.py)
    logit_scale: float | None = 4.6052  # log(100), train.py --log_scale; None: the arch's own


def first_sentence(text: str) -> str:
    """The short caption Long-CLIP pairs with the PCA features: up to the first ". "."""
    return text.replace("\n", " ").split(". ")[0]


def pca_reconstruct(features: torch.Tensor, k: int) -> torch.Tensor:
    """``features`` (n, d) projected onto their top-``k`` principal components (centred,
    SVD, back to feature space, mean added back), in float32; differentiable, as
    Long-CLIP trains through it."""
    x = features.float()
    mean = x.mean(0, keepdim=True)
    centred = x - mean
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:k].T  # (d, <=k)
    return centred @ components @ components.T + mean


class KeptPositions(nn.Module):
    """A parametrization of the text positional embedding: rows [0, keep) come from a frozen
    copy (Long-CLIP's ``positional_embedding``, requires_grad False), the rest from the
    trained tensor (its ``positional_embedding_res``)."""

    def __init__(self, kept: torch.Tensor):
        super().__init__()
        self.kept = nn.Parameter(kept.detach().clone(), requires_grad=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.kept.to(positions.dtype), positions[len(self.kept) :]])


class LongClipModel(nn.Module):
    """An open_clip CLIP (positions stretched and split) whose forward also encodes the short
    caption: one forward per step, so DDP sees every parameter the loss uses."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    def encode_image(self, image, normalize: bool = False):
        return self.clip.encode_image(image, normalize=normalize)

    def encode_text(self, text, normalize: bool = False):
        return self.clip.encode_text(text, normalize=normalize)

    def forward(self, image, text, short_text):
        return {
            "image_features": self.encode_image(image, normalize=True),
            "text_features": self.encode_text(text, normalize=True),
            "short_text_features": self.encode_text(short_text, normalize=True),
            "logit_scale": self.clip.logit_scale.exp(),
        }


class SmoothedClipLoss(ClipLoss):
    """open_clip's contrastive loss (each rank: its images against all texts and its texts
    against all images, features gathered with gradients) with label smoothing, as
    Long-CLIP's ``forward`` computes it."""

    def __init__(self, label_smoothing: float, **kw):
        super().__init__(local_loss=True, **kw)
        self.label_smoothing = label_smoothing

    def forward(self, image_features, text_features, logit_scale):
        per_image, per_text = self.get_logits(image_features, text_features, logit_scale)
        labels = self.get_ground_truth(image_features.device, per_image.shape[0])
        return (
            F.cross_entropy(per_image, labels, label_smoothing=self.label_smoothing)
            + F.cross_entropy(per_text, labels, label_smoothing=self.label_smoothing)
        ) / 2


class LongClip(Method):
    name = "longclip"
    Options = Options
    # train/train.py: AdamW with torch's defaults.
    adam_betas = (0.9, 0.999)
    adam_eps = 1e-8

    def build(self, device="cpu", pretrained=True):
        s = self.settings
        clip, self.train_transform, self.eval_transform, self.tokenizer = create_long_clip(
            s.arch,
            pretrained=s.pretrained if pretrained else None,
            keep=s.keep_positions,
            factor=s.stretch,
            device=device,
        )
        kept = clip.positional_embedding.data[: s.keep_positions]
        parametrize.register_parametrization(clip, "positional_embedding", KeptPositions(kept))
        if self.options.logit_scale is not None:
            with torch.no_grad():
                clip.logit_scale.fill_(self.options.logit_scale)
        return LongClipModel(clip)

    def example(self, image, text, rng):
        long, short = self.tokenizer([text, first_sentence(text)])
        return {"image": self.train_transform(image), "text": long, "short_text": short}

    def loss(self, outputs, ctx: Context):
        loss_fn = SmoothedClipLoss(
            self.options.label_smoothing,
            gather_with_grad=ctx.gather,
            rank=ctx.rank,
            world_size=ctx.world,
        )
        scale = outputs["logit_scale"]
        image = outputs["image_features"]
        long = loss_fn(image, outputs["text_features"], scale)
        # PCA over this rank's batch before gathering, as Long-CLIP does.
        primary = pca_reconstruct(image, self.options.pca_dim)
        short = loss_fn(primary, outputs["short_text_features"].float(), scale)
        return long + self.options.short_weight * short, {
            "loss_long": long.item(),
            "loss_short": short.item(),
        }

    def after_step(self, model, step, total):
        """Long-CLIP trains the temperature with no clamp (train.py)."""

    def parameter_groups(self, model, weight_decay):
        """Long-CLIP's AdamW decays every trainable parameter (``AdamW(model.parameters(),
        weight_decay=...)``); the frozen kept positions have no gradient and stay put."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    def text_features(self, model, texts):
        device = next(model.parameters()).device
        return model.encode_text(self.tokenizer(texts).to(device), normalize=True)

    def protocol(self):
        return {
            **super().protocol(),
            "text_positions": "248 (20 kept + 57 stretched 4x), Long-CLIP",
        }
