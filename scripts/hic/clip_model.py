"""open_clip models that read long text, by stretching the text positional embedding.

Long-CLIP's recipe: CLIP's 77 text positions are well trained near the start and poorly at the
end, so the first ``keep`` (20) positions are kept exactly and the remaining ones are linearly
interpolated ``factor`` (4) times as densely: 20 + 57 × 4 = 248 positions. Everything else is
open_clip's own model, tokenizer and transforms.
"""

from __future__ import annotations

import types
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import text_global_pool
from torch import nn
from torch.nn import functional as F

CONFIG_DIR = Path(__file__).resolve().parents[2] / "data" / "clip"


def stretch_positional_embedding(
    pos: torch.Tensor, keep: int = 20, factor: int = 4
) -> torch.Tensor:
    """(n, d) -> (keep + (n - keep) * factor, d); rows [0, keep) and every ``factor``-th row
    after them are the original positions, the rows between are linear interpolations (the
    last original position is extrapolated from its predecessor)."""
    n = pos.shape[0]
    if not 0 < keep < n or factor < 1:
        raise ValueError(f"cannot keep {keep} of {n} positions and stretch by {factor}")
    rest = pos[keep:]
    following = torch.cat([rest[1:], 2 * rest[-1:] - rest[-2:-1]]) if len(rest) > 1 else rest
    steps = torch.arange(factor, dtype=pos.dtype, device=pos.device).view(1, factor, 1) / factor
    stretched = rest.unsqueeze(1) * (1 - steps) + following.unsqueeze(1) * steps
    return torch.cat([pos[:keep], stretched.reshape(-1, pos.shape[1])])


def make_long(model: nn.Module, keep: int, factor: int) -> int:
    """Stretch an open_clip CLIP's text positions in place; returns the new context length."""
    pos = stretch_positional_embedding(model.positional_embedding.data, keep, factor)
    model.positional_embedding = nn.Parameter(pos)
    model.context_length = pos.shape[0]
    mask = torch.full((pos.shape[0], pos.shape[0]), float("-inf")).triu_(1)
    model.attn_mask = mask.to(model.attn_mask.device)  # causal, as open_clip builds it
    if model.text_pool_type == "argmax":
        model.encode_text = types.MethodType(encode_used_positions, model)
    return pos.shape[0]


def encode_used_positions(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` over the batch's used positions only: up to its last
    end-of-text token, not all 248. Exact: under the causal mask no position sees the padding
    after it, and the feature is read at each text's end-of-text token (argmax pooling). A
    batch of alt-texts (~20 tokens) costs a tenth of the full context."""
    used = int(text.argmax(dim=-1).max()) + 1
    text = text[:, :used]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:used].to(cast_dtype)
    x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:used, :used]))
    x = text_global_pool(x, text, self.text_pool_type)
    if self.text_projection is not None:
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        else:
            x = x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def create_long_clip(
    arch: str, *, pretrained: str | None, keep: int, factor: int, device: str = "cpu"
) -> tuple[nn.Module, object, object, object]:
    """(model, train transform, eval transform, tokenizer) with the long text context.

    ``pretrained`` is an open_clip tag (e.g. "openai"), a local checkpoint path, or None for a
    randomly initialised model; weights are loaded BEFORE the positions are stretched."""
    open_clip.add_model_config(CONFIG_DIR)  # the project's tiny configs (HIC-Tiny-CLIP)
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(
        arch, pretrained=pretrained, device=device, output_dict=True
    )
    context = make_long(model, keep, factor)
    tokenizer = open_clip.get_tokenizer(arch, context_length=context)
    return model, train_tf, eval_tf, tokenizer
