"""FLAME (Cao et al., CVPR 2025, arXiv 2411.11927): a frozen decoder-only LLM is the text
encoder, and only the image side trains.

As its code (github:MIV-XJTU/FLAME) defines it:

- Text: the caption is cleaned (a final '.' added, '"' -> "'") and wrapped in a prompt,
  ``Detailed Image description : "<caption>" . After thinking step by step ,`` followed by a
  <s> separator and seven facet prompts (``this image description means in just one word:"``,
  ``the category of the main object in this image means in just one word:"``, ...). One LLM
  pass embeds all seven: facet-decoupled attention lets each facet prompt see the shared part
  and itself only, and a facet's embedding is the hidden state of its last token (the closing
  quote) after decoder layer 39 of Mistral-Nemo's 40 (``layer``), L2-normalised. Fewer
  facets: the short template (3, ``Image description``) or the raw PromptEOL one (1, no <s>).
- Image: a ViT trained from scratch whose patch tokens (no final LayerNorm, no projection) go
  through an MLP projector (Linear, GELU, Linear, LayerNorm) to the LLM's width, then are
  averaged (class token excluded).
- Loss: multi-positive sigmoid: each image is scored against ``positives`` facet embeddings
  of its own caption (drawn per sample, as FLAME draws 6 of its stored embeddings) and all
  other texts' as negatives, logit scale e^log(10) and bias -10 at start.
- Inference: retrieval texts are the mean of the seven facets' states (normalised);
  classification prompts use the raw single-prompt template.

FLAME embeds captions offline once; here the frozen LLM runs under no_grad in every step (the
caption a policy draws changes per epoch). It is never saved: checkpoints hold the trainable
parts and a record of the LLM, which is rebuilt from its source when loading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip import AugmentationCfg
from open_clip.loss import gather_features
from open_clip.transformer import VisionTransformer
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, MistralConfig

from hic.clip_model import CONFIG_DIR
from hic.methods.base import Context, Method
from hic.models import ModelRef, unavailable_error

# The seven facet prompts of FLAME's long template (model.py, embed_cc3m_mask.py), in order;
# the short template is the first three, the raw one the first alone.
FACETS = (
    ' this image description means in just one word:"',
    ' the category of the main object in this image means in just one word:"',
    " the prominent characteristic or pattern of the main object in this image means in just"
    ' one word:"',
    ' the category of the minor object in this image means in just one word:"',
    " the prominent characteristic or pattern of the minor object in this image means in just"
    ' one word:"',
    ' the primary action or event taking place in this image means in just one word:"',
    ' the overall atmosphere or emotion of this image means in just one word:"',
)
TEMPLATES = {"raw": 1, "short": 3, "long": 7}
# FLAME's LLM (FLAME-Mistral-Nemo-ViT-B-16.json). Its architecture (Mistral-Nemo config.json),
# lets the paper configuration be built on the meta device to count parameters offline.
PAPER_LLM = "mistralai/Mistral-Nemo-Instruct-2407"
PAPER_LLM_CONFIG = {
    "hidden_size": 5120,
    "intermediate_size": 14336,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 131072,
    "max_position_embeddings": 1024000,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "sliding_window": None,
    "tie_word_embeddings": False,
}


def clean_caption(text: str) -> str:
    """FLAME's caption normalisation before templating (multiprompteol_embeddings.py): a
    final '.' unless it ends in . ? " ', double quotes become single, a final '?' a '.'."""
    if text and text[-1] not in ".?\"'":
        text += "."
    text = text.replace('"', "'")
    if text.endswith("?"):
        text = text[:-1] + "."
    return text


def shared_prompt(caption: str, template: str) -> str:
    head = "Detailed Image description" if template == "long" else "Image description"
    return f'{head} : "{clean_caption(caption)}" . After thinking step by step ,'


class PromptEncoder:
    """Caption -> token ids of the shared prompt part; the constant facet part, and where each
    facet ends in it. Picklable (DataLoader workers tokenise)."""

    def __init__(self, tokenizer, template: str, max_text_tokens: int):
        if template not in TEMPLATES:
            raise ValueError(f"unknown FLAME template {template!r}; choose one of {TEMPLATES}")
        if tokenizer.bos_token_id is None:
            raise ValueError("FLAME's facet separator is <s>: the tokenizer has no BOS token")
        self.tokenizer, self.template, self.max_text_tokens = tokenizer, template, max_text_tokens
        n = TEMPLATES[template]
        # The short and long templates put <s> between the shared part and the facets.
        sep = [tokenizer.bos_token_id] if n > 1 else []
        ends, ids = [], []
        for k in range(n):
            ids = self._ids("".join(FACETS[: k + 1]), special=False)
            if ends and ids[: ends[-1] + 1] != self._ids("".join(FACETS[:k]), special=False):
                raise ValueError(f"the tokenizer merges across FLAME's facet prompts {k - 1}/{k}")
            ends.append(len(ids) - 1)
        self.facet_ids = sep + ids
        self.facet_ends = [len(sep) + e for e in ends]
        overhead = len(self._ids(shared_prompt("", template), special=True))
        self.shared_cap = overhead + max_text_tokens + 16  # re-tokenising may merge differently

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def shared_ids(self, caption: str) -> list[int]:
        """BOS + the shared prompt with the caption cut to ``max_text_tokens`` (FLAME tokenises
        the caption, truncates, decodes and templates the text)."""
        tokens = self._ids(caption, special=False)
        if len(tokens) > self.max_text_tokens:
            caption = self.tokenizer.decode(tokens[: self.max_text_tokens])
        ids = self._ids(shared_prompt(caption, self.template), special=True)
        if len(ids) > self.shared_cap:
            raise ValueError(f"FLAME prompt of {len(ids)} tokens exceeds {self.shared_cap}")
        return ids

    def padded(self, caption: str) -> tuple[torch.Tensor, int]:
        """(shared ids left-padded to ``shared_cap``, their length): fixed-size for collation."""
        ids = self.shared_ids(caption)
        row = torch.full((self.shared_cap,), self.tokenizer.unk_token_id or 0, dtype=torch.long)
        row[self.shared_cap - len(ids) :] = torch.tensor(ids)
        return row, len(ids)

    def batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.padded(c) for c in captions]
        return torch.stack([r for r, _ in rows]), torch.tensor([n for _, n in rows])


def facet_attention(lengths: torch.Tensor, shared: int, ends: list[int], dtype, device):
    """Additive (B, 1, L, L) mask for left-padded rows [pad | shared part | facets]: causal,
    padding never attended, and each facet prompt sees the shared part and itself only
    (FLAME's facet-decoupled attention). ``shared``: padded shared width; ``ends``: each
    facet's last index within the facet part."""
    n_facets = ends[-1] + 1
    length = shared + n_facets
    pos = torch.arange(length, device=device)
    valid = pos[None, :] >= (shared - lengths.to(device))[:, None]  # (B, L)
    segment = torch.full((length,), -1, device=device)  # -1: shared, k: facet k
    start = shared
    for k, end in enumerate(ends):
        segment[start : shared + end + 1] = k
        start = shared + end + 1
    # The <s> separator is in facet 0's span: FLAME's shared part ends at the comma of
    # "step by step ," (its sep_token), so later facets do not see the <s>.
    causal = pos[None, :] <= pos[:, None]
    same = (segment[None, :] == -1) | (segment[None, :] == segment[:, None])
    allowed = causal & same
    allowed = allowed[None] & valid[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=device)[None]  # pad rows: no NaN
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None], valid


class FlameModel(nn.Module):
    """Trainable ViT + projector and temperature/bias; the frozen LLM (``llm``) beside them."""

    def __init__(self, visual: VisionTransformer, width: int, llm: nn.Module, depth: int):
        super().__init__()
        self.visual = visual
        dim = llm.config.hidden_size
        # FLAME's mm projector: Linear(width, h), [GELU, Linear(h, dim)] * (depth - 1), LN,
        # with h = max(projector_dim, 4096) = 5120 = the LLM's width; here h = the LLM's width.
        layers: list[nn.Module] = [nn.Linear(width, dim)]
        for _ in range(1, depth):
            layers += [nn.GELU(), nn.Linear(dim, dim)]
        self.projector = nn.Sequential(*layers, nn.LayerNorm(dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.llm = llm.requires_grad_(False).eval()
        self.layer = 0  # set by the method
        self.facet_ids: list[int] = []
        self.facet_ends: list[int] = []
        self.llm_batch = 32

    def train(self, mode: bool = True):
        super().train(mode)
        self.llm.eval()  # frozen: never in training mode
        return self

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        tokens = self.projector(self.visual(image))  # (B, 1 + patches, dim)
        features = tokens[:, 1:].mean(dim=1)  # FLAME's "avg" pool leaves the class token out
        return F.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def facet_states(self, shared: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, facets, dim) hidden states after decoder layer ``layer`` at each facet's last
        token, in chunks of ``llm_batch`` captions (the LLM's attention mask is L x L)."""
        out = []
        for start in range(0, len(shared), self.llm_batch):
            out.append(
                self._facet_states(
                    shared[start : start + self.llm_batch], lengths[start : start + self.llm_batch]
                )
            )
        return torch.cat(out)

    def _facet_states(self, shared: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Only the longest row's padding is kept; masked padding leaves a caption's states
        # independent of its batch mates.
        width = int(lengths.max())
        shared, device = shared[:, shared.shape[1] - width :], shared.device
        facets = torch.tensor(self.facet_ids, device=device).expand(len(shared), -1)
        ids = torch.cat([shared, facets], dim=1)
        dtype = self.llm.get_input_embeddings().weight.dtype
        mask, _ = facet_attention(lengths, width, self.facet_ends, dtype, device)
        # Default positions: RoPE scores depend on offsets only, so left padding shifts nothing.
        hidden = self.llm(
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[self.layer]
        return hidden[:, [width + e for e in self.facet_ends]]

    def forward(self, image, shared, lengths, picks):
        image_features = self.encode_image(image, normalize=True)
        states = self.facet_states(shared, lengths)  # (B, F, dim), no grad
        chosen = states.gather(1, picks[..., None].expand(-1, -1, states.shape[-1]))
        text_features = F.normalize(chosen.float(), dim=-1).flatten(0, 1)  # (B * P, dim)
        return {
            "image_features": image_features,
            "text_features": text_features.to(image_features.dtype),
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }


def multi_positive_sigmoid_loss(image, text, scale, bias) -> torch.Tensor:
    """FLAME's MultiPositiveSigmoidLoss: texts come in groups of P per image (text rows
    i*P..i*P+P-1 belong to image i); -sum log sigmoid(+-logits) over all pairs / #texts."""
    positives = text.shape[0] // image.shape[0]
    logits = scale * image @ text.T + bias
    owner = torch.arange(text.shape[0], device=text.device) // positives
    labels = 2.0 * (owner[None, :] == torch.arange(image.shape[0], device=text.device)[:, None])
    return -F.logsigmoid((labels - 1.0) * logits).sum() / text.shape[0]


class Flame(Method):
    name = "flame"
    templates_name = "OpenAI ImageNet templates (80), FLAME's raw single prompt"
    # Training.md: AdamW beta2 0.95, eps 1e-8.
    adam_betas = (0.9, 0.95)
    adam_eps = 1e-8

    @dataclass(frozen=True)
    class Options:
        llm: str = PAPER_LLM  # HF id (pin ``revision``) or a local folder (tiny-mistral)
        revision: str | None = None
        layer: int = 39  # decoder layer whose output embeds (FLAME: "39" of Mistral-Nemo's 40)
        template: str = "long"  # training prompt: long (7 facets), short (3), raw (1)
        positives: int = 6  # facet embeddings per image in the loss (FLAME: 6 drawn per sample)
        eval_template: str = "long"  # retrieval texts: mean of the 7 facets (eval_*.py)
        class_template: str = "raw"  # zero-shot prompts: encode_text's default single prompt
        max_text_tokens: int = 1024  # caption tokens kept (FLAME's context_length)
        projector_depth: int = 2  # mm_cfg.mlp_depth
        llm_batch: int = 32  # captions per LLM pass (FLAME embeds offline in batches of 32)

    def __init__(self, settings):
        super().__init__(settings)
        o = self.options
        for key in ("template", "eval_template", "class_template"):
            if getattr(o, key) not in TEMPLATES:
                raise ValueError(f"flame option {key}={getattr(o, key)!r}: one of {TEMPLATES}")
        if not 1 <= o.positives <= TEMPLATES[o.template]:
            raise ValueError(
                f"flame: {o.positives} positives from the {o.template!r} template's "
                f"{TEMPLATES[o.template]} facets"
            )
        self._prompts: dict[str, PromptEncoder] = {}
        self._tokenizer = None

    # ------------------------------------------------------------------ building
    def llm_record(self) -> dict:
        o = self.options
        return {"llm": o.llm, "revision": o.revision, "layer": o.layer}

    def _llm_config(self, device) -> MistralConfig:
        o = self.options
        meta = torch.device(device).type == "meta"
        try:  # counting on the meta device needs no network: the cache or the known config
            return AutoConfig.from_pretrained(o.llm, revision=o.revision, local_files_only=meta)
        except OSError:
            # Offline, only counting parameters: the paper's LLM from its known architecture.
            if meta and o.llm == PAPER_LLM:
                return MistralConfig(**PAPER_LLM_CONFIG)
            raise

    def _load_llm(self, device) -> nn.Module:
        o = self.options
        if torch.device(device).type == "meta":
            with torch.device("meta"):
                return AutoModel.from_config(self._llm_config(device))
        cuda = torch.device(device).type == "cuda"
        try:
            llm = AutoModel.from_pretrained(
                o.llm, revision=o.revision, dtype=torch.bfloat16 if cuda else torch.float32
            )
        except OSError as err:
            raise unavailable_error(ModelRef(o.llm, o.revision), err) from err
        return llm.to(device)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(
                self.options.llm, revision=self.options.revision
            )
        return self._tokenizer

    def prompts(self, template: str) -> PromptEncoder:
        if template not in self._prompts:
            self._prompts[template] = PromptEncoder(
                self.tokenizer, template, self.options.max_text_tokens
            )
        return self._prompts[template]

    def build(self, device="cpu", pretrained=True):
        """The ViT (from scratch, as FLAME trains it; ``pretrained`` has nothing to load) and
        the frozen LLM, always from its source (it is not in checkpoints)."""
        s, o = self.settings, self.options
        open_clip.add_model_config(CONFIG_DIR)
        cfg = open_clip.get_model_config(s.arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip architecture {s.arch!r}")
        v = cfg["vision_cfg"]
        llm = self._load_llm(device)
        n_layers = llm.config.num_hidden_layers
        if not 1 <= o.layer <= n_layers:
            raise ValueError(f"flame layer {o.layer}: {o.llm} has decoder layers 1..{n_layers}")
        with torch.device(device):
            visual = VisionTransformer(
                image_size=v["image_size"],
                patch_size=v["patch_size"],
                width=v["width"],
                layers=v["layers"],
                heads=v["width"] // v.get("head_width", 64),
                mlp_ratio=v.get("mlp_ratio", 4.0),
                output_dim=cfg["embed_dim"],
                pool_type="none",
            )
            # FLAME's get_features: the tokens straight out of the transformer.
            visual.ln_post, visual.proj = nn.Identity(), None
            model = FlameModel(visual, v["width"], llm, o.projector_depth)
        model.layer, model.llm_batch = o.layer, o.llm_batch
        if torch.device(device).type != "meta":
            prompts = self.prompts(o.template)
            model.facet_ids, model.facet_ends = prompts.facet_ids, prompts.facet_ends
        size = v["image_size"]
        # FLAME trains with --aug-cfg scale='(0.9, 1.0)' (Training.md).
        self.train_transform = open_clip.image_transform(
            size, is_train=True, aug_cfg=AugmentationCfg(scale=(0.9, 1.0))
        )
        self.eval_transform = open_clip.image_transform(size, is_train=False)
        return model

    # ------------------------------------------------------------------ training
    def example(self, image, text, rng):
        shared, length = self.prompts(self.options.template).padded(text)
        # Which facets are this sample's positives (FLAME: torch.randperm per sample).
        picks = torch.randperm(TEMPLATES[self.options.template])[: self.options.positives]
        return {
            "image": self.train_transform(image),
            "shared": shared,
            "lengths": torch.tensor(length),
            "picks": picks,
        }

    def loss(self, outputs, ctx: Context):
        image, text = outputs["image_features"], outputs["text_features"]
        if ctx.gather:  # every rank scores the global batch, as ClipLoss with gather_with_grad
            image, text = gather_features(
                image, text, gather_with_grad=True, rank=ctx.rank, world_size=ctx.world
            )
        loss = multi_positive_sigmoid_loss(
            image, text, outputs["logit_scale"], outputs["logit_bias"]
        )
        return loss, {"logit_bias": outputs["logit_bias"].item()}

    def saved_state(self, model):
        """The trainable parts and which LLM they were trained with (not its weights)."""
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}
        return {"trainable": state, "llm": self.llm_record()}

    def load_saved(self, model, state):
        if state.get("llm") != self.llm_record():
            raise ValueError(
                f"this FLAME state was trained with LLM {state.get('llm')}, not {self.llm_record()}"
            )
        missing, unexpected = model.load_state_dict(state["trainable"], strict=False)
        missing = [k for k in missing if not k.startswith("llm.")]
        if missing or unexpected:
            raise ValueError(f"FLAME state: missing {missing}, unexpected {unexpected}")

    # ------------------------------------------------------------------ evaluation
    def prompt_features(self, model, texts: list[str], template: str) -> torch.Tensor:
        """Mean of the template's facet states (FLAME's infer=True), normalised."""
        prompts = self.prompts(template)
        device = next(model.parameters()).device
        shared, lengths = prompts.batch(texts)
        saved = model.facet_ids, model.facet_ends
        model.facet_ids, model.facet_ends = prompts.facet_ids, prompts.facet_ends
        try:
            states = model.facet_states(shared.to(device), lengths.to(device))
        finally:
            model.facet_ids, model.facet_ends = saved
        return F.normalize(states.float().mean(dim=1), dim=-1)

    def text_features(self, model, texts):
        return self.prompt_features(model, texts, self.options.eval_template)

    def class_features(self, model, classnames):
        rows = []
        for name in classnames:
            feats = self.prompt_features(
                model, [t(name) for t in self.templates], self.options.class_template
            )
            rows.append(F.normalize(feats.mean(0), dim=-1))
        return torch.stack(rows)

    def protocol(self):
        o = self.options
        return {
            **super().protocol(),
            "text_encoder": f"frozen {o.llm}@{o.revision or 'unpinned'}, layer {o.layer}",
            "retrieval_texts": f"mean of the {o.eval_template} template's facet states",
            "class_texts": f"{o.class_template} template per prompt, mean over templates",
            "image": "ViT tokens -> MLP projector -> mean over patch tokens",
        }
