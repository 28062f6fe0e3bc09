"""COSMOS (Kim et al., CVPR 2025): cross-modality self-distillation beside CLIP's contrastive loss.

An open_clip CLIP student is trained from scratch with an EMA copy of itself as teacher
(github:ExplainableML/cosmos, ``src/main.py`` and ``src/training/train.py``):

- multi-modal crops of each pair: 2 global and ``local_crops`` local image crops (DINO's
  multi-crop, scales (s, 1) and (0.05, s)) and ``text_crops`` text crops of the caption's
  sentences (2 global crops of 1-5 random sentences, the rest single sentences:
  ``sample_dict(..., sampling_mode='textcrop_pixelprose')``);
- a cross-attention module per modality: each image crop's embedding attends to the tokens of
  the first global caption, each text crop's embedding to the patch tokens of the first global
  image crop, added to the embedding (residual) and normalised: the cross-modal embeddings;
- the loss: CLIP's InfoNCE of the 2 global image crops against every text crop, plus the
  distillation loss: InfoNCE (with its own temperature) of the student's cross-modal
  embeddings of EVERY crop against the teacher's unimodal embeddings of the global crops,
  image->image, image->text, text->image, text->text, averaged (``COSMOSLoss``), weight 1:1;
- after each step the teacher moves to ``m * teacher + (1 - m) * student``.

Inference uses one encoder pair's unimodal embeddings (student by default) with cosine
similarity, as the repository's ``retrieval_on_split`` does.
"""

from __future__ import annotations

import copy
import math
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from open_clip.transformer import text_global_pool
from PIL import Image, ImageFilter
from timm.layers import resample_abs_pos_embed
from torch import nn
from torchvision import transforms as T

from hic.clip_model import create_long_clip
from hic.methods.base import Context, Method


@dataclass(frozen=True)
class CosmosOptions:
    """Defaults: the repository's training scripts (src/train_*.sh) and argument defaults."""

    local_crops: int = 6  # --local-crops-number 6
    local_size: int = 96  # DataAugmentationMulticrop: local crops are 96 px (224-px model)
    crop_scale: float = 0.4  # --crop-scale: local (0.05, s), global (s, 1)
    text_crops: int = 8  # --num-sampled-captions 8: 2 global + 6 local
    global_sentences: int = 5  # a global text crop joins 1..5 sentences
    momentum: float = 0.99  # --momentum-teacher 0.99 (batch 4096; 0.999 at batch 1024)
    momentum_schedule: str = "fixed"  # --fix-momentum; "cosine": m -> 1 (cosine_scheduler)
    cross_heads: int = 8  # attn_pooler_heads
    inference: str = "student"  # the encoders evaluation uses: "student" or "teacher"

    def __post_init__(self):
        if self.local_crops < 0 or self.text_crops < 2 or self.global_sentences < 1:
            raise ValueError(
                f"cosmos needs local_crops >= 0, text_crops >= 2 (2 global) and "
                f"global_sentences >= 1; got {self.local_crops}, {self.text_crops}, "
                f"{self.global_sentences}"
            )
        if not 0.05 < self.crop_scale < 1:
            raise ValueError(f"cosmos crop_scale {self.crop_scale} must lie in (0.05, 1)")
        if not 0 <= self.momentum <= 1 or self.momentum_schedule not in ("fixed", "cosine"):
            raise ValueError(
                f"cosmos momentum {self.momentum} must be in [0, 1] and momentum_schedule "
                f"{self.momentum_schedule!r} one of 'fixed', 'cosine'"
            )
        if self.inference not in ("student", "teacher"):
            raise ValueError(f"cosmos inference {self.inference!r}: 'student' or 'teacher'")


# ------------------------------------------------------------------ text crops
def split_sentences(text: str) -> list[str]:
    """The caption's sentences (split at newlines, full stops and ``</s>``, as the repository's
    ``split_caption``); a caption with no full stop is one sentence."""
    parts = [s.strip() for s in re.split(r"\n|</s>|[.]", text)]
    return [s for s in parts if s] or [text.strip()]


def sample_sentences(sentences: list[str], k: int, rng: random.Random) -> list[str]:
    """``k`` sentences without repeats while there are enough, else every sentence as often as
    fits and a random rest (the repository's ``random_sample_from_list``)."""
    if len(sentences) >= k:
        return rng.sample(sentences, k)
    return sentences * (k // len(sentences)) + rng.sample(sentences, k % len(sentences))


def text_crops(text: str, n: int, most: int, rng: random.Random) -> list[str]:
    """2 global crops (1..``most`` random sentences each, joined) then ``n - 2`` local crops
    (one sentence each). A one-sentence caption gives ``n`` copies of itself."""
    sentences = split_sentences(text)
    drawn = [rng.randint(1, most) for _ in range(2)]
    # At most every sentence once within one crop (the repository would repeat them).
    globals_ = [". ".join(rng.sample(sentences, min(d, len(sentences)))) for d in drawn]
    return globals_ + sample_sentences(sentences, n - 2, rng)


# ------------------------------------------------------------------ image crops
class RandomBlur:
    """PIL Gaussian blur with probability ``p`` and a radius in [0.1, 2] (DINO's), drawn from
    torch's RNG so the loop's per-sample seed fixes it."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return image
        radius = 0.1 + 1.9 * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


def multicrop_transforms(size: int, local_size: int, scale: float, mean, std):
    """DINO's three pipelines as COSMOS configures them: global 1 (blur), global 2 (rare blur,
    solarisation), local (half blur), each with flip, colour jitter and greyscale."""
    jitter = [
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    bicubic = T.InterpolationMode.BICUBIC

    def crop(side, scales):
        return T.RandomResizedCrop(side, scale=scales, interpolation=bicubic)

    return (
        T.Compose([crop(size, (scale, 1.0)), *jitter, RandomBlur(1.0), *tail]),
        T.Compose(
            [crop(size, (scale, 1.0)), *jitter, RandomBlur(0.1), T.RandomSolarize(128, 0.2)] + tail
        ),
        T.Compose([crop(local_size, (0.05, scale)), *jitter, RandomBlur(0.5), *tail]),
    )


# ------------------------------------------------------------------ the model
class CrossAttention(nn.Module):
    """One modality's embeddings (queries) attend to the other's tokens (the repository's
    ``AttentionalCrossPooler``: layer norms on queries and keys, multi-head attention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_q, self.ln_k = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, queries, tokens, padding=None):
        """queries (B, Q, D), tokens (B, L, D), padding (B, L) true where ignored."""
        keys = self.ln_k(tokens)
        return self.attn(self.ln_q(queries), keys, keys, key_padding_mask=padding)[0]


def encode_image_tokens(visual: nn.Module, pixels: torch.Tensor):
    """(projected embedding, patch tokens) of an open_clip VisionTransformer, at any input
    side divisible by its patch size: the positional embedding is resampled (bicubic) to the
    input's grid, as DINO and COSMOS do for local crops."""
    x = visual.conv1(pixels)
    grid = list(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding
    if grid != list(visual.grid_size):
        pos = resample_abs_pos_embed(
            pos.unsqueeze(0), grid, list(visual.grid_size), num_prefix_tokens=1
        )[0]
    x = visual.ln_pre(visual.patch_dropout(x + pos.to(x.dtype)))
    pooled, tokens = visual._pool(visual.transformer(x))
    return (pooled @ visual.proj if visual.proj is not None else pooled), tokens


def trim(text: torch.Tensor) -> torch.Tensor:
    """Token ids cut after the batch's last end-of-text token (the highest id, as open_clip's
    argmax pooling assumes). Exact for a causal text encoder: no token attends to a later
    one, so the padding after every EOT changes no embedding; it saves the long context's
    padding (248 positions, most captions far shorter)."""
    return text[:, : int(text.argmax(-1).max()) + 1]


def encode_text_tokens(clip: nn.Module, text: torch.Tensor):
    """(projected embedding, token states after the final norm) of an open_clip CLIP with a
    causal mask, for ``text`` of at most its context length (e.g. ``trim``med)."""
    n = text.shape[1]
    x = clip.token_embedding(text) + clip.positional_embedding[:n]
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    pooled = text_global_pool(x, text, clip.text_pool_type)
    proj = clip.text_projection
    pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
    return pooled, x


class Tower(nn.Module):
    """A CLIP with COSMOS's additions: token mappings into the joint space, the two
    cross-attention modules and the distillation temperature."""

    def __init__(self, clip: nn.Module, heads: int):
        super().__init__()
        self.clip = clip
        dim = clip.visual.output_dim  # the joint embedding
        self.image_token_mapping = nn.Linear(clip.visual.transformer.width, dim)
        self.text_token_mapping = nn.Linear(clip.transformer.width, dim)
        self.image_cross = CrossAttention(dim, heads)  # image embeddings attend to text tokens
        self.text_cross = CrossAttention(dim, heads)  # text embeddings attend to image tokens
        self.distill_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class CosmosModel(nn.Module):
    """Student (trained) and teacher (its EMA, no gradients) in one module, so a checkpoint
    holds both and ``train_clip``'s resume restores the teacher exactly."""

    def __init__(self, clip: nn.Module, heads: int):
        super().__init__()
        self.student = Tower(clip, heads)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def forward(self, global_images, local_images, texts):
        """global_images (B, 2, 3, S, S), local_images (B, n, 3, s, s), texts (B, k, L);
        crops are stacked crop-major (crop c of every sample is rows [c*B, (c+1)*B))."""
        b = texts.shape[0]
        s = self.student
        crops = [global_images.transpose(0, 1).flatten(0, 1)]
        if local_images.shape[1]:
            crops.append(local_images.transpose(0, 1).flatten(0, 1))
        embeds = [encode_image_tokens(s.clip.visual, c) for c in crops]
        image = torch.cat([e for e, _ in embeds])  # (C*B, D), unnormalised
        image_tokens = s.image_token_mapping(embeds[0][1][:b])  # first global crop
        flat = trim(texts.transpose(0, 1).flatten(0, 1))
        text, text_tokens = encode_text_tokens(s.clip, flat)
        first = flat[:b]  # first global caption
        # Keys stop at the end-of-text token (argmax): the long context is mostly padding.
        padding = torch.arange(first.shape[1], device=first.device) > first.argmax(-1, True)
        text_tokens = s.text_token_mapping(text_tokens[:b])

        def crossed(feats, module, tokens, mask):
            queries = feats.view(-1, b, feats.shape[-1]).transpose(0, 1)  # (B, crops, D)
            attended = module(queries, tokens, mask).transpose(0, 1).reshape(feats.shape)
            return F.normalize(feats + attended, dim=-1)

        out = {
            "image_features": F.normalize(image, dim=-1),
            "text_features": F.normalize(text, dim=-1),
            "image_cross": crossed(image, s.image_cross, text_tokens, padding),
            "text_cross": crossed(text, s.text_cross, image_tokens, None),
            "logit_scale": s.clip.logit_scale.exp(),
            "distill_logit_scale": s.distill_logit_scale.exp(),
            "batch": b,
        }
        with torch.no_grad():  # the teacher sees the global crops only
            t = self.teacher.clip
            out["teacher_image"] = t.encode_image(crops[0], normalize=True)
            out["teacher_text"] = F.normalize(encode_text_tokens(t, flat[: 2 * b])[0], dim=-1)
        return out


def momentum_at(options: CosmosOptions, step: int, total: int) -> float:
    """The EMA momentum of ``step`` (0-based): fixed, or the repository's cosine_scheduler
    from ``momentum`` to 1 over the run."""
    if options.momentum_schedule == "fixed":
        return options.momentum
    return 1 + 0.5 * (1 + math.cos(math.pi * step / total)) * (options.momentum - 1)


def mean_clip_loss(loss_fn, a: torch.Tensor, b: torch.Tensor, n_a, n_b, scale) -> torch.Tensor:
    """CLIP's InfoNCE averaged over every (crop of ``a``, crop of ``b``) pair."""
    terms = [loss_fn(x, y, scale) for x in a.chunk(n_a) for y in b.chunk(n_b)]
    return torch.stack(terms).mean()


class Cosmos(Method):
    name = "cosmos"
    adam_eps = 1e-8  # src/train_*.sh; betas 0.9/0.98 as open_clip_train's
    Options = CosmosOptions

    def build(self, device="cpu", pretrained=True):
        s, o = self.settings, self.options
        clip, _, self.eval_transform, self.tokenizer = create_long_clip(
            s.arch,
            pretrained=s.pretrained if pretrained else None,
            keep=s.keep_positions,
            factor=s.stretch,
            device=device,
        )
        size = self.input_side_of(clip)
        patch = clip.visual.patch_size
        patch = patch[0] if isinstance(patch, tuple | list) else patch
        if o.local_size % patch or o.local_size > size:
            raise ValueError(
                f"cosmos local_size {o.local_size} must be a multiple of the patch size "
                f"{patch} and at most the image size {size}"
            )
        mean, std = clip.visual.image_mean, clip.visual.image_std
        self.crops = multicrop_transforms(size, o.local_size, o.crop_scale, mean, std)
        self.train_transform = self.crops[0]
        return CosmosModel(clip, o.cross_heads).to(device)

    @staticmethod
    def input_side_of(clip) -> int:
        size = clip.visual.image_size
        return max(size) if isinstance(size, tuple | list) else int(size)

    def input_side(self, model):
        return self.input_side_of(model.student.clip)

    def example(self, image, text, rng):
        o = self.options
        first, second, local = self.crops
        locals_ = [local(image) for _ in range(o.local_crops)]
        side = o.local_size
        return {
            "global_images": torch.stack([first(image), second(image)]),
            "local_images": torch.stack(locals_) if locals_ else torch.empty(0, 3, side, side),
            "texts": self.tokenizer(text_crops(text, o.text_crops, o.global_sentences, rng)),
        }

    def losses(self, outputs, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP loss, distillation loss) of a forward's outputs."""
        o = self.options
        loss_fn = ClipLoss(gather_with_grad=ctx.gather, rank=ctx.rank, world_size=ctx.world)
        n_images, n_texts = 2 + o.local_crops, o.text_crops
        # CLIP: the global image crops against every text crop (the repository leaves the
        # local image crops out: they overfit).
        global_images = outputs["image_features"][: 2 * outputs["batch"]]
        clip = mean_clip_loss(
            loss_fn, global_images, outputs["text_features"], 2, n_texts, outputs["logit_scale"]
        )
        scale = outputs["distill_logit_scale"]
        pairs = [
            (outputs[s], n, outputs[t])
            for s, n in (("image_cross", n_images), ("text_cross", n_texts))
            for t in ("teacher_image", "teacher_text")
        ]
        distill = torch.stack(
            [mean_clip_loss(loss_fn, a, t.detach(), n, 2, scale) for a, n, t in pairs]
        ).mean()
        return clip, distill

    def loss(self, outputs, ctx: Context):
        clip, distill = self.losses(outputs, ctx)
        return clip + distill, {"clip_loss": clip.item(), "distill_loss": distill.item()}

    def after_step(self, model, step, total):
        """Temperature clamps (both towers), then the teacher's EMA update."""
        m = momentum_at(self.options, step, total)
        with torch.no_grad():
            for tower in (model.student, model.teacher):
                tower.clip.logit_scale.clamp_(0, math.log(100))
                tower.distill_logit_scale.clamp_(0, math.log(100))
            student = dict(model.student.named_parameters())
            for name, param in model.teacher.named_parameters():
                param.mul_(m).add_(student[name].detach(), alpha=1 - m)

    def encoder(self, model) -> nn.Module:
        return getattr(model, self.options.inference).clip

    def image_features(self, model, pixels):
        return self.encoder(model).encode_image(pixels, normalize=True)

    def text_features(self, model, texts):
        device = next(model.parameters()).device
        tokens = trim(self.tokenizer(texts).to(device))
        return F.normalize(encode_text_tokens(self.encoder(model), tokens)[0], dim=-1)

    def protocol(self):
        return {
            **super().protocol(),
            "encoders": f"COSMOS {self.options.inference}'s unimodal image and text encoders "
            "(no cross-attention at inference)",
        }
