"""FLAIR (Xiao et al., CVPR 2025, github.com/ExplainableML/flair): fine-grained, text-conditioned
image embeddings, trained from scratch.

- Model: an open_clip CLIP (ViT-B/16 in the paper) whose image tower also returns its patch
  tokens (after ln_post, projected by the same ``visual.proj`` as the class token, as FLAIR's
  shared ``image_post``), plus one text-conditioned attention-pooling layer: the text's global
  embedding is the query, the image's patch tokens the keys and values (LayerNorm on q, k, v;
  multi-head attention with a zero key/value slot, FLAIR's ``PureAttentionPoolingBlock``).
- Data: each image's caption is split into sentences and K sub-captions are drawn, each merging
  s ~ U{1..S} sentences, half the time consecutive ones, half the time random ones (FLAIR's
  "diverse sampling").
- Loss: (L_tcs + L_mps) / 2, both sigmoid losses with multiple positives (all K sub-captions of
  an image): L_tcs scores each image pooled with each text against that text (its own K texts
  and one random sub-caption of every other image), L_mps the global image token against every
  sub-caption of the batch.
- Inference: each image is pooled with each text query and scored by the cosine of the pooled
  embedding and the text embedding (FLAIR's ``--inference-with-flair``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import gather_features
from torch import nn

from hic.clip_model import CONFIG_DIR
from hic.methods.base import Context, Method

INFERENCE = ("text_conditioned", "global")


@dataclass(frozen=True)
class FlairOptions:
    # K sub-captions per image: 8 for CC3M-recap (src/train_cc3m_slurm.sh), 10 for Merged-30M.
    num_captions: int = 8
    # S: a sub-caption merges 1..S sentences (--max-merged-num default, src/flair/params.py).
    max_merged: int = 3
    # Heads of the pooling layer (PureAttentionPoolingBlock's n_head, src/flair/transformer.py).
    pool_heads: int = 8
    # SigLIP-style temperature and bias at init (FLAIR model config: init_logit_bias -10, the
    # CLIP default temperature 1/0.07).
    init_logit_bias: float = -10.0
    # Scoring at evaluation: text-conditioned (the paper's) or global token against text.
    inference: str = "text_conditioned"

    def __post_init__(self):
        if self.num_captions < 1 or self.max_merged < 1:
            raise ValueError(
                f"flair needs num_captions >= 1 and max_merged >= 1, got "
                f"{self.num_captions} and {self.max_merged}"
            )
        if self.inference not in INFERENCE:
            raise ValueError(f"flair inference {self.inference!r} is not one of {INFERENCE}")


# ------------------------------------------------------------------ sub-captions
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """A caption's sentences: split after '.', '!' or '?' followed by white space, and at line
    breaks (FLAIR splits at every '.'; this keeps '3.5' and 'e.g.x' whole)."""
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    if not sentences:
        raise ValueError(f"caption {text!r} has no sentence to sample sub-captions from")
    return sentences


def sample_subcaptions(text: str, k: int, max_merged: int, rng) -> list[str]:
    """K sub-captions of ``text``: each merges s ~ U{1..min(S, n)} of its n sentences, with
    probability 1/2 a consecutive run, else s distinct sentences in random order. A caption
    of one sentence (an alt-text) gives K copies of itself."""
    sentences = split_sentences(text)
    n = len(sentences)
    out = []
    for _ in range(k):
        s = rng.randint(1, min(max_merged, n))
        if s > 1 and rng.random() < 0.5:
            start = rng.randint(0, n - s)
            chosen = sentences[start : start + s]
        else:
            chosen = rng.sample(sentences, s)
        out.append(" ".join(chosen))
    return out


# ------------------------------------------------------------------ the model
class TextConditionedPool(nn.Module):
    """Attention pooling of an image's tokens with text queries: LayerNorm on q, k and v,
    then multi-head attention with a zero key/value slot (``add_zero_attn``: an image can
    give a text little), as FLAIR's ``PureAttentionPoolingBlock``. The weights are an
    ``nn.MultiheadAttention``'s; ``forward`` computes the same function with the key and
    value projections made once per image and the query projection once per text, so scoring
    every image with every text costs attention only, per pair."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"pooling width {dim} does not split into {heads} heads")
        self.heads = heads
        self.ln_q, self.ln_k, self.ln_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, add_zero_attn=True)

    def project_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """(..., d) texts -> (..., heads, d/heads), scaled for the dot product."""
        d = queries.shape[-1]
        w, b = self.attn.in_proj_weight[:d], self.attn.in_proj_bias[:d]
        q = F.linear(self.ln_q(queries), w, b).unflatten(-1, (self.heads, -1))
        return q / math.sqrt(q.shape[-1])

    def project_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d) image tokens -> keys and values (B, heads, N, d/heads)."""
        d = tokens.shape[-1]
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        k = F.linear(self.ln_k(tokens), w[d : 2 * d], b[d : 2 * d])
        v = F.linear(self.ln_v(tokens), w[2 * d :], b[2 * d :])
        return (x.unflatten(-1, (self.heads, -1)).transpose(1, 2) for x in (k, v))

    def attend(self, q, k, v, weights: bool = False):
        """Projected queries (B, T, h, e) over keys/values (B, h, N, e) -> (B, T, d) pooled,
        and with ``weights`` the head-averaged attention (B, T, N) over the image tokens."""
        scores = torch.einsum("bthe,bhne->bthn", q, k)
        zero = scores.new_zeros(scores.shape[:-1] + (1,))  # the zero key: score 0, value 0
        attn = torch.cat([scores, zero], dim=-1).softmax(dim=-1)[..., :-1]
        pooled = torch.einsum("bthn,bhne->bthe", attn, v).flatten(-2)
        out = self.attn.out_proj(pooled)
        return (out, attn.mean(dim=2)) if weights else out

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, weights: bool = False):
        """Queries (B, T, d) pool tokens (B, N, d): (B, T, d) [and weights (B, T, N)]."""
        return self.attend(self.project_queries(queries), *self.project_tokens(tokens), weights)


class FlairModel(nn.Module):
    """An open_clip CLIP and FLAIR's pooling layer. ``forward(image, text)`` takes images
    (B, 3, H, W) and K tokenised sub-captions per image (B, K, L)."""

    def __init__(self, clip: nn.Module, heads: int):
        super().__init__()
        self.clip = clip
        clip.visual.output_tokens = True  # open_clip returns (class token, patch tokens)
        self.pool = TextConditionedPool(clip.text_projection.shape[1], heads)

    @property
    def visual(self):
        return self.clip.visual

    @property
    def logit_scale(self):
        return self.clip.logit_scale

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) global embedding and (B, N, d) patch tokens, both unnormalised."""
        pooled, tokens = self.clip.visual(image)
        return pooled, tokens @ self.clip.visual.proj

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(text), dim=-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict:
        pooled, tokens = self.encode_image(image)
        return {
            "image_features": F.normalize(pooled, dim=-1),
            "image_tokens": tokens,
            "text_features": self.encode_text(text.flatten(0, 1)),  # (B*K, d), image-major
            "logit_scale": self.clip.logit_scale.exp(),
            "logit_bias": self.clip.logit_bias,
            "pool": self.pool,
        }


# ------------------------------------------------------------------ the loss
def multi_positive_sigmoid(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Sum over all pairs of -log sigmoid(+-logit): +1 for a positive pair, -1 otherwise."""
    return -F.logsigmoid(torch.where(positive, logits, -logits)).sum()


def text_choices(rows: torch.Tensor, n_images: int, k: int, seed: tuple) -> torch.Tensor:
    """For each image of ``rows`` (global indices), the texts it is pooled with in L_tcs: its
    own K sub-captions first, then one random sub-caption of every other image of the batch:
    (len(rows), n_images + K - 1) indices into the batch's n_images * K texts. Row i's draw
    is a function of (seed, i) alone, so any split of the batch over ranks draws alike."""
    others = torch.arange(n_images).expand(len(rows), -1)
    others = others[others != rows[:, None]].view(len(rows), n_images - 1)
    pick = torch.stack(
        [
            # A tuple of ints hashes alike in every process (only str hashes are salted).
            torch.randint(0, k, (n_images - 1,), generator=_generator((*seed, int(row))))
            for row in rows
        ]
    )
    own = rows[:, None] * k + torch.arange(k)
    return torch.cat([own, others * k + pick], dim=1)


def _generator(key: tuple) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) & (2**63 - 1))


def flair_loss(outputs: dict, k: int, ctx: Context, seed: tuple = ()):
    """(L_tcs + L_mps) / 2 of the batch, and its parts. Each rank scores its own images
    against the whole batch's texts (gathered with gradients when ``ctx.gather``); its share
    is scaled by the world size for the gradient, so DDP's mean gradient is one process's on
    the whole batch, and the value returned is the whole batch's (the shares, summed)."""
    tokens, texts = outputs["image_tokens"], outputs["text_features"]
    images = outputs["image_features"]
    scale, bias, pool = outputs["logit_scale"], outputs["logit_bias"], outputs["pool"]
    local = len(images)
    if ctx.gather:
        _, texts = gather_features(
            images, texts, gather_with_grad=True, rank=ctx.rank, world_size=ctx.world
        )
    n_images = len(texts) // k
    rows = torch.arange(local) + ctx.rank * local  # this rank's images, by global index

    # L_tcs: each image pooled with its own texts (positives) and one of each other image's.
    chosen = text_choices(rows, n_images, k, seed).to(texts.device)
    queries = texts[chosen]  # (B, n_images + K - 1, d)
    conditioned = F.normalize(pool(queries, tokens), dim=-1)
    logits = scale * (conditioned * queries).sum(-1) + bias
    positive = torch.zeros_like(logits, dtype=torch.bool)
    positive[:, :k] = True
    tcs = multi_positive_sigmoid(logits, positive) / chosen.shape[1]

    # L_mps: the global image token against every text of the batch.
    logits = scale * images @ texts.T + bias
    owner = torch.arange(len(texts), device=texts.device) // k
    positive = owner[None, :] == rows.to(texts.device)[:, None]
    mps = multi_positive_sigmoid(logits, positive) / len(texts)

    share = (tcs + mps) / 2
    parts = torch.stack([share, tcs, mps]).detach()
    if ctx.gather:
        torch.distributed.all_reduce(parts)
    loss = ctx.world * share + (parts[0] - ctx.world * share).detach()
    return loss, {"loss_tcs": parts[1].item(), "loss_mps": parts[2].item()}


# ------------------------------------------------------------------ the method
class Flair(Method):
    name = "flair"
    Options = FlairOptions
    adam_eps = 1e-8  # src/train_*_slurm.sh; betas 0.9/0.98 as open_clip_train's

    def build(self, device="cpu", pretrained=True):
        s, o = self.settings, self.options
        open_clip.add_model_config(CONFIG_DIR)
        clip, self.train_transform, self.eval_transform = open_clip.create_model_and_transforms(
            s.arch,
            pretrained=s.pretrained if pretrained else None,
            device=device,
            init_logit_bias=o.init_logit_bias,
        )
        # FLAIR keeps CLIP's 77 text positions (its sub-captions are 1-3 sentences): the run's
        # keep_positions / stretch (Long-CLIP's) do not apply.
        self.tokenizer = open_clip.get_tokenizer(s.arch)
        return FlairModel(clip, o.pool_heads).to(device)

    def example(self, image, text, rng):
        o = self.options
        captions = sample_subcaptions(text, o.num_captions, o.max_merged, rng)
        return {"image": self.train_transform(image), "text": self.tokenizer(captions)}

    def loss(self, outputs, ctx: Context):
        # The negatives' draw is a function of (seed, step): a resumed run draws the same.
        seed = (self.settings.seed, ctx.step)
        return flair_loss(outputs, self.options.num_captions, ctx, seed)

    # -------------------------------------------------------------- evaluation
    def image_features(self, model, pixels):
        """(n, 1 + N, d): the global embedding, then the N patch tokens (unnormalised)."""
        pooled, tokens = model.encode_image(pixels)
        return torch.cat([pooled[:, None], tokens], dim=1)

    def text_features(self, model, texts):
        device = next(model.parameters()).device
        return model.encode_text(self.tokenizer(texts).to(device))

    def similarity(self, model, images, texts, pairs_per_block: int = 2**16):
        """(n_images, n_texts) cosines. Text-conditioned: every image pooled with every text,
        blockwise (about ``pairs_per_block`` image-text pairs at a time, on the model's
        device), so 10k x 10k never holds more than a block's attention."""
        if self.options.inference == "global":
            return F.normalize(images[:, 0], dim=-1) @ texts.T
        device = next(model.parameters()).device
        pool = model.pool
        text_block = min(len(texts), 1024)
        image_block = max(1, pairs_per_block // text_block)
        out = torch.empty(len(images), len(texts))
        for i in range(0, len(images), image_block):
            tokens = images[i : i + image_block, 1:].to(device)
            k, v = pool.project_tokens(tokens)
            for j in range(0, len(texts), text_block):
                t = texts[j : j + text_block].to(device)
                q = pool.project_queries(t).expand(len(tokens), -1, -1, -1)
                conditioned = F.normalize(pool.attend(q, k, v), dim=-1)
                out[i : i + len(tokens), j : j + len(t)] = (conditioned * t).sum(-1).float().cpu()
        return out

    def protocol(self):
        if self.options.inference == "global":
            how = "cosine of the global image embedding and the text embedding"
        else:
            how = (
                "text-conditioned: each image's patch tokens attention-pooled with each text "
                "embedding as query, cosine of the pooled image embedding and that text's"
            )
        return {**super().protocol(), "similarity": how}
