"""What a training method is: its model, its per-sample data, its loss, its inference.

The paper compares methods trained on the same data ("we keep the model architecture fixed and
vary only the training datasets"), so one loop (``hic.train_clip``) reads the data, plans the
order, checkpoints, resumes and runs DDP for every method; a method supplies only what its own
paper defines. The loop's contract with a method:

1. ``build(device)`` returns the method's ``nn.Module`` (every part it trains or freezes) and
   sets ``train_transform`` / ``eval_transform`` (used inside ``example`` and by evaluation).
2. ``example(image, text, rng)`` runs in DataLoader workers (the method is pickled to them, the
   model is not): one sample's tensors, a dict; the loop collates a batch of them. ``text`` is
   the caption the run's caption policy drew (alt-text, short, long, a region's); ``rng`` and
   torch's RNG are seeded by (seed, epoch, key), so a sample is the same in any process.
3. ``model(**batch)`` (through DDP when distributed) returns the outputs ``loss`` scores:
   ``loss(outputs, ctx)`` -> (loss, {name: float} to log). ``ctx`` says rank, world size and
   whether features must be gathered across ranks (``open_clip.loss.gather_features``).
4. ``after_step(model, step, total)`` after each optimiser step (clamps, EMA teachers).
5. Evaluation: ``image_features(model, pixels)`` per image (any shape, batch first),
   ``text_features(model, texts)`` per text (normalised, (n, d)), and
   ``similarity(model, image_features, text_features)`` -> (n_images, n_texts) scores. A plain
   CLIP's similarity is a dot product; FLAIR's pools each image's tokens with each text.
   Evaluation keeps the features on the CPU (10k images' patch tokens would fill a GPU); a
   similarity that needs the model moves blocks of them to its device.

A method's own settings come from the run's ``options`` (a dataclass per method: an unknown key
is an error naming the method's options).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from torch import nn


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class Context:
    """Where this process trains: ``gather`` is true under torch.distributed."""

    rank: int = 0
    world: int = 1
    step: int = 0
    total: int = 1

    @property
    def gather(self) -> bool:
        return self.world > 1


class Method:
    """The interface, and what most methods share. Subclasses set ``name`` and ``Options``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # DDP must look for parameters a step leaves unused (e.g. a branch a batch skips).
    find_unused_parameters: ClassVar[bool] = False
    # AdamW's betas and eps (open_clip_train's for CLIP training; a method's paper may differ).
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.98)
    adam_eps: ClassVar[float] = 1e-6
    # Zero-shot classification's prompts: OpenAI's 80 ImageNet templates, as the long-text
    # CLIP papers report ImageNet (a method whose paper used others overrides this).
    templates: ClassVar[tuple] = tuple(OPENAI_IMAGENET_TEMPLATES)
    templates_name: ClassVar[str] = "OpenAI ImageNet templates (80)"

    def __init__(self, settings):
        self.settings = settings
        fields = {f.name for f in dataclasses.fields(self.Options)}
        unknown = set(settings.options) - fields
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no option(s) {sorted(unknown)}; "
                f"its options are {sorted(fields) or 'none'}"
            )
        self.options = self.Options(**settings.options)
        self.train_transform = self.eval_transform = None

    # -------------------------------------------------------------- building
    def build(self, device: str | torch.device = "cpu", pretrained: bool = True) -> nn.Module:
        """The model on ``device``; ``pretrained=False`` skips loading weights (evaluation
        loads a checkpoint over it; the meta device counts parameters)."""
        raise NotImplementedError

    def input_side(self, model: nn.Module) -> int:
        """The image input's side in pixels (JPEGs are decoded no larger than needed)."""
        size = model.visual.image_size
        return max(size) if isinstance(size, tuple | list) else int(size)

    # -------------------------------------------------------------- training
    def example(self, image: Image.Image, text: str, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, outputs: dict, ctx: Context) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        """Default: CLIP's temperature clamp, when the model has one."""
        scale = getattr(model, "logit_scale", None)
        if isinstance(scale, torch.Tensor):
            with torch.no_grad():
                scale.clamp_(0, math.log(100))

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """AdamW groups of the trainable parameters, as open_clip_train makes them: no weight
        decay on gains, biases, norms and temperatures (under 2-D, or named bn/ln/bias/
        logit_scale/logit_bias). Frozen parameters (requires_grad False) are left out."""
        groups: dict[bool, list] = {True: [], False: []}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            exempt = param.ndim < 2 or any(
                k in name for k in ("bn", "ln", "bias", "logit_scale", "logit_bias")
            )
            groups[not exempt].append(param)
        return [
            {"params": groups[False], "weight_decay": 0.0},
            {"params": groups[True], "weight_decay": weight_decay},
        ]

    def saved_state(self, model: nn.Module) -> dict:
        """What a checkpoint and model.pt hold (a frozen pretrained part may be left out)."""
        return model.state_dict()

    def load_saved(self, model: nn.Module, state: dict) -> None:
        model.load_state_dict(state)

    # -------------------------------------------------------------- evaluation
    def image_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model.encode_image(pixels, normalize=True)

    def text_features(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def similarity(
        self, model: nn.Module, images: torch.Tensor, texts: torch.Tensor
    ) -> torch.Tensor:
        return images @ texts.T

    def class_features(self, model: nn.Module, classnames: list[str]) -> torch.Tensor:
        """One text feature per class: the normalised mean of its templates' features (CLIP's
        zero-shot recipe)."""
        rows = []
        for name in classnames:
            feats = self.text_features(model, [t(name) for t in self.templates])
            rows.append(nn.functional.normalize(feats.mean(0), dim=-1))
        return torch.stack(rows)

    def protocol(self) -> dict:
        """How this method scores images against texts, for the evaluation JSON."""
        return {
            "method": self.name,
            "similarity": "cosine of L2-normalised embeddings",
            "templates": self.templates_name,
        }


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameters (works on the meta device)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}
