"""LLM2CLIP (Huang et al. 2024, arXiv 2411.04997; github microsoft/LLM2CLIP): a large language
model replaces CLIP's text encoder, in two stages, each a run of this method (``stage``):

1. ``caption_contrastive``: the LLM becomes a caption embedder, LLM2Vec-style: bidirectional
   attention, mean pooling over the caption's tokens (not its instruction), LoRA on every
   projection (r 16, alpha 32, dropout 0.05), trained with LLM2Vec's supervised-SimCSE loss
   (one direction, in-batch negatives, cosine x 50) on pairs of captions of one image, the
   query carrying a retrieval instruction (repo: llm_caption_contrastive/, E5_cc3m.py).
   Images are not used.
2. ``clip``: the LLM (stage 1's LoRA merged, ``llm_checkpoint``) is frozen and embeds each
   caption; a trainable adapter (4 residual MLP blocks, LayerNorm, linear to ``embed_dim``, on
   the L2-normalised LLM embedding; repo: eva_clip/model.py TextProj) and the pretrained CLIP
   vision tower, with a new projection to ``embed_dim``, train with CLIP's contrastive loss.

A run gets ONE caption per image (the caption policy's draw), so stage 1's two captions of an
image come from that caption: a caption of several sentences gives one of its sentences (a
short caption) and the others (a long one), the paper's short/long pair; a one-sentence caption
(an alt-text) is its own positive, told apart from itself by LoRA dropout only (LLM2Vec's
unsupervised SimCSE). Dropout masks come from a generator seeded by the batch's samples: the
loop restores no RNG state, and a resumed run must draw the same masks.

Neither stage's checkpoint holds the LLM's pretrained weights: stage 1 saves its LoRA, stage 2
its adapter, vision tower and temperature; the LLM is rebuilt from its source (and stage 1's
LoRA) whenever the model is built off the meta device.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip import ClipLoss
from open_clip.loss import gather_features
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from hic.clip_model import CONFIG_DIR
from hic.methods.base import Context, Method

STAGES = ("caption_contrastive", "clip")
TINY_LLM = "tiny-llama"
# Meta-Llama-3-8B-Instruct's architecture (its config.json), so that the paper configuration
# builds on the meta device with no download.
LLAMA3_8B = "meta-llama/Meta-Llama-3-8B-Instruct"
# Hub commits used when a run names no llm_revision (this one: as seen in public cache paths
# of that repository; not checked against the hub from here).
PINNED_REVISIONS = {LLAMA3_8B: "8afb486c1db24fe5011ec46dfbe5b5dccdb575c2"}
LLAMA3_8B_CONFIG = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "tie_word_embeddings": False,
}
# LLM2Vec's LoRA targets for Llama (llm_caption_contrastive/run_supervised.py).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Llama-3-Instruct's user turn, as LLM2Vec wraps every text (llm2vec.prepare_for_tokenization).
HEADER, EOT = "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", EOT)  # fmt: skip
# The caption-pair instructions of LLM2CLIP's stage 1 (dataset/E5_cc3m.py): the query is the
# short caption (0) or the long one (1), at random.
INSTRUCTIONS = (
    "Given a sentence, retrieve a detailed relevant sentence",
    "Given a detailed sentence, retrieve a short relevant sentence",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Options:
    stage: str = "clip"  # "caption_contrastive" (stage 1) or "clip" (stage 2)
    llm: str = LLAMA3_8B  # a hub id, a local directory, or "tiny-llama" (tests, demo)
    llm_revision: str | None = None  # None: PINNED_REVISIONS[llm]
    llm_dtype: str = "bfloat16"  # the LLM's weights (the paper's; tiny-llama is float32)
    llm_seed: int = 0  # tiny-llama's initialisation (it is rebuilt, never saved)
    llm_checkpoint: str | None = None  # stage 2: a stage-1 run's model.pt (its LoRA)
    max_length: int = 512  # tokens per caption (LLM2Vec's max_seq_length)
    lora_r: int = 16
    lora_alpha: int = 32  # LLM2Vec: 2 x r
    lora_dropout: float = 0.05
    contrastive_scale: float = 50.0  # HardNegativeNLLLoss's scale (temperature 0.02)
    embed_dim: int = 1280  # the joint space (repo model configs: embed_dim 1280)
    adapter_layers: int = 4  # TextProj: num_layers_text
    adapter_expansion: int = 2  # TextProj: expansion_factor

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"llm2clip stage {self.stage!r}: choose one of {STAGES}")
        if self.stage == "caption_contrastive" and self.llm_checkpoint:
            raise ValueError("llm_checkpoint is stage 2's (clip): stage 1 trains from the LLM")


# ------------------------------------------------------------------ LoRA (no peft here)
class Noise:
    """The dropout generator every LoRA layer of one LLM shares, set per forward."""

    generator: torch.Generator | None = None


class LoraLinear(nn.Module):
    """``base(x) + scaling * B(A(dropout(x)))`` with ``base`` frozen; B starts at zero, so the
    wrapped layer starts as the pretrained one (A: Kaiming-uniform, as LoRA initialises)."""

    def __init__(self, base: nn.Linear, r: int, alpha: int, dropout: float, noise: Noise):
        super().__init__()
        self.base = base.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        if base.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling, self.p, self.noise = alpha / r, dropout, noise

    def forward(self, x):
        h = x
        if self.training and self.p > 0:
            gen = self.noise.generator
            keep = torch.rand(x.shape, generator=gen, device=x.device) >= self.p
            h = x * keep / (1 - self.p)
        update = (h.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return self.base(x) + (self.scaling * update).to(x.dtype)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            delta = self.scaling * (self.lora_B @ self.lora_A)
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def add_lora(llm: nn.Module, r: int, alpha: int, dropout: float) -> Noise:
    """Wrap every target projection of ``llm`` in LoRA; only the LoRA factors train."""
    llm.requires_grad_(False)
    noise = Noise()
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if name in LORA_TARGETS and isinstance(child, nn.Linear):
                setattr(module, name, LoraLinear(child, r, alpha, dropout, noise))
    return noise


def merge_lora(llm: nn.Module) -> None:
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                setattr(module, name, child.merged())


# ------------------------------------------------------------------ the LLM as an encoder
class LlmEncoder(nn.Module):
    """LLM2Vec: the decoder with bidirectional attention, its last hidden states mean-pooled
    over ``embed_mask`` (the caption and its end-of-turn token, not the prompt)."""

    def __init__(self, llm: LlamaModel):
        super().__init__()
        llm.config.is_causal = False  # masks: transformers builds a bidirectional one
        for layer in llm.layers:
            layer.self_attn.is_causal = False  # kernels given no mask (flash) read this
        self.llm = llm
        self.noise = Noise()

    def forward(self, input_ids, attention_mask, embed_mask, noise_seed=None):
        if noise_seed is not None:
            seed = int(noise_seed.sum().item()) % (2**63)
            self.noise.generator = torch.Generator(input_ids.device).manual_seed(seed)
        n = int(attention_mask.sum(1).max())  # right-padded: drop the all-padding columns
        hidden = self.llm(
            input_ids=input_ids[:, :n], attention_mask=attention_mask[:, :n]
        ).last_hidden_state
        weights = embed_mask[:, :n].unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


class CaptionContrastive(nn.Module):
    """Stage 1: query and positive captions through one LLM forward."""

    def __init__(self, encoder: LlmEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, query_ids, query_mask, query_embed, doc_ids, doc_mask, doc_embed, noise):
        both = self.encoder(
            torch.cat([query_ids, doc_ids]),
            torch.cat([query_mask, doc_mask]),
            torch.cat([query_embed, doc_embed]),
            noise_seed=noise,
        )
        query, doc = both.split(len(query_ids))
        return {"query": query, "doc": doc}


class AdapterBlock(nn.Module):
    """Pre-norm residual MLP (the repo's LinearBlock)."""

    def __init__(self, dim: int, expansion: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fn = nn.Sequential(
            nn.Linear(dim, expansion * dim), nn.GELU(), nn.Linear(expansion * dim, dim)
        )

    def forward(self, x):
        return x + self.fn(self.ln(x))


def text_adapter(dim: int, out: int, layers: int, expansion: int) -> nn.Sequential:
    blocks = [AdapterBlock(dim, expansion) for _ in range(layers)]
    return nn.Sequential(*blocks, nn.LayerNorm(dim), nn.Linear(dim, out))


class Llm2ClipModel(nn.Module):
    """Stage 2: CLIP's vision tower against the frozen LLM's caption embeddings, adapted."""

    def __init__(self, visual: nn.Module, encoder: LlmEncoder, adapter: nn.Module, logit_scale):
        super().__init__()
        self.visual, self.adapter = visual, adapter
        self.encoder = encoder.requires_grad_(False).eval()
        self.logit_scale = nn.Parameter(logit_scale.detach().clone())

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode
        return self

    def encode_image(self, image, normalize: bool = False):
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids, attention_mask, embed_mask, normalize: bool = False):
        with torch.no_grad():
            embedding = self.encoder(input_ids, attention_mask, embed_mask)
        features = self.adapter(F.normalize(embedding.float(), dim=-1))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image, input_ids, attention_mask, embed_mask):
        return {
            "image_features": self.encode_image(image, normalize=True),
            "text_features": self.encode_text(
                input_ids, attention_mask, embed_mask, normalize=True
            ),
            "logit_scale": self.logit_scale.exp(),
        }


# ------------------------------------------------------------------ text side
def caption_views(text: str, rng) -> tuple[str, str, int]:
    """(query, positive, instruction index) from one caption: one of its sentences (short)
    and the others (long), the query the short or the long one at random; a one-sentence
    caption is its own positive."""
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
    if len(sentences) > 1:
        i = rng.randrange(len(sentences))
        short, long = sentences[i], " ".join(sentences[:i] + sentences[i + 1 :])
    else:
        short = long = text.strip()
    query_is_long = rng.random() < 0.5
    return (long, short, 1) if query_is_long else (short, long, 0)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Llama-3's special tokens, learned offline on scene sentences."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from hic.tiny_models import scene_sentences

    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=list(LLAMA3_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(scene_sentences(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=LLAMA3_SPECIALS[0], eos_token=LLAMA3_SPECIALS[1]
    )


def tiny_llama_config(tokenizer) -> LlamaConfig:
    """Llama-3's layout (GQA, SwiGLU, RMSNorm, RoPE 5e5) at toy scale."""
    return LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOT),
        tie_word_embeddings=False,
    )


def new_projection(visual: nn.Module, dim: int) -> nn.Module:
    """The vision tower with a new, randomly initialised projection to ``dim`` (the repo drops
    the pretrained head, ``visual.head``): open_clip's ViT (OpenAI's) or a timm tower whose
    trunk's head projects (EVA02)."""
    proj = getattr(visual, "proj", None)
    if isinstance(proj, nn.Parameter):
        width = proj.shape[0]
        visual.proj = nn.Parameter(width**-0.5 * torch.randn(width, dim, device=proj.device))
        visual.output_dim = dim
        return visual
    head = getattr(getattr(visual, "trunk", None), "head", None)
    if isinstance(head, nn.Linear):
        kw = {"bias": head.bias is not None, "device": head.weight.device}
        visual.trunk.head = nn.Linear(head.in_features, dim, **kw)
        return visual
    raise ValueError(f"llm2clip cannot find the projection of a {type(visual).__name__} tower")


class LLM2CLIP(Method):
    name = "llm2clip"
    Options = Options

    # -------------------------------------------------------------- building
    def build(self, device="cpu", pretrained=True):
        o = self.options
        meta = torch.device(device).type == "meta"
        encoder = LlmEncoder(self._llm(device, load=not meta))
        if o.stage == "caption_contrastive":
            encoder.noise = add_lora(encoder.llm, o.lora_r, o.lora_alpha, o.lora_dropout)
            return CaptionContrastive(encoder)
        if o.llm_checkpoint and not meta:
            self._merge_stage1(encoder, Path(o.llm_checkpoint), device)
        s = self.settings
        open_clip.add_model_config(CONFIG_DIR)
        clip, self.train_transform, self.eval_transform = open_clip.create_model_and_transforms(
            s.arch, pretrained=s.pretrained if pretrained else None, device=device
        )
        visual = new_projection(clip.visual, o.embed_dim)
        adapter = text_adapter(
            encoder.llm.config.hidden_size, o.embed_dim, o.adapter_layers, o.adapter_expansion
        ).to(device)
        return Llm2ClipModel(visual, encoder, adapter, clip.logit_scale)

    def _llm(self, device, load: bool) -> LlamaModel:
        """The LLM (its weights loaded unless ``load`` is false: the meta device), and
        ``self.tokenizer``."""
        o = self.options
        dtype = getattr(torch, o.llm_dtype)
        revision = o.llm_revision or PINNED_REVISIONS.get(o.llm)
        if o.llm == TINY_LLM:  # float32: a CPU stand-in whose runs must repeat exactly
            self.tokenizer = tiny_tokenizer()
            config = tiny_llama_config(self.tokenizer)
            with torch.random.fork_rng(devices=[]):  # the same LLM in every build
                torch.manual_seed(o.llm_seed)
                llm = LlamaModel(config)
            return llm.to(device)
        if not load:
            self.tokenizer = None
            config = LlamaConfig(**LLAMA3_8B_CONFIG) if o.llm == LLAMA3_8B else None
            if config is None:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(o.llm, revision=revision)
            with torch.device(device):
                return LlamaModel(config).to(dtype)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(o.llm, revision=revision)
        llm = LlamaModel.from_pretrained(o.llm, revision=revision, dtype=dtype)
        return llm.to(device)

    def _merge_stage1(self, encoder: LlmEncoder, path: Path, device) -> None:
        """Stage 1's LoRA, from its model.pt, merged into the LLM's weights."""
        saved = torch.load(path, map_location=device, weights_only=False)
        stage1 = saved["settings"]["options"]
        if stage1.get("stage") != "caption_contrastive" or stage1.get("llm", LLAMA3_8B) != (
            self.options.llm
        ):
            raise ValueError(
                f"llm_checkpoint {path} is not a caption_contrastive run of {self.options.llm}"
            )
        first = Options(**stage1)
        add_lora(encoder.llm, first.lora_r, first.lora_alpha, first.lora_dropout)
        state = {k.removeprefix("encoder."): v for k, v in saved["model"].items()}
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        lora_missing = [k for k in missing if "lora_" in k]
        if lora_missing or unexpected:
            raise ValueError(
                f"{path}: LoRA missing {lora_missing[:3]}, unexpected {unexpected[:3]}"
            )
        merge_lora(encoder.llm)
        encoder.llm.requires_grad_(False)

    def input_side(self, model):
        if self.options.stage == "caption_contrastive":
            return 8  # images are not used: decode them as small as JPEG allows
        return super().input_side(model)

    # -------------------------------------------------------------- training
    def tokens(self, text: str, instruction: str | None = None) -> dict[str, torch.Tensor]:
        """LLM2Vec's input: <bos>, the user header, the instruction (``{instruction}; ``) and
        the caption with its end-of-turn token; the mean pools the caption and end token.
        Right-padded to ``max_length`` (the caption is cut to fit)."""
        tok, n = self.tokenizer, self.options.max_length
        prompt = HEADER + (f"{instruction}; " if instruction else "")
        prefix = [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]
        room = n - len(prefix) - 1
        if room < 1:
            raise ValueError(f"max_length {n} leaves no room for a caption after its prompt")
        body = [
            *tok.encode(text.strip(), add_special_tokens=False)[:room],
            tok.convert_tokens_to_ids(EOT),
        ]
        pad = n - len(prefix) - len(body)
        pad_id = tok.eos_token_id
        return {
            "ids": torch.tensor(prefix + body + [pad_id] * pad),
            "mask": torch.tensor([1] * (len(prefix) + len(body)) + [0] * pad),
            "embed": torch.tensor([0] * len(prefix) + [1] * len(body) + [0] * pad),
        }

    def example(self, image, text, rng):
        if self.options.stage == "caption_contrastive":
            query, doc, which = caption_views(text, rng)
            q, d = self.tokens(query, INSTRUCTIONS[which]), self.tokens(doc)
            return {
                **{f"query_{k}": v for k, v in q.items()},
                **{f"doc_{k}": v for k, v in d.items()},
                "noise": torch.tensor(rng.getrandbits(62)),
            }
        t = self.tokens(text)
        return {
            "image": self.train_transform(image),
            "input_ids": t["ids"],
            "attention_mask": t["mask"],
            "embed_mask": t["embed"],
        }

    def loss(self, outputs, ctx: Context):
        if self.options.stage == "clip":
            loss_fn = ClipLoss(gather_with_grad=ctx.gather, rank=ctx.rank, world_size=ctx.world)
            return loss_fn(
                outputs["image_features"], outputs["text_features"], outputs["logit_scale"]
            ), {}
        return caption_contrastive_loss(
            outputs["query"], outputs["doc"], self.options.contrastive_scale, ctx
        )

    def saved_state(self, model):
        """Stage 1: the LoRA factors; stage 2: all but the frozen LLM."""
        state = model.state_dict()
        if self.options.stage == "caption_contrastive":
            return {k: v for k, v in state.items() if ".lora_" in k}
        return {k: v for k, v in state.items() if not k.startswith("encoder.")}

    def load_saved(self, model, state):
        missing, unexpected = model.load_state_dict(state, strict=False)
        expected = set(self.saved_state(model))
        lost = [k for k in missing if k in expected]
        if lost or unexpected:
            raise ValueError(
                f"llm2clip ({self.options.stage}) checkpoint lacks {lost[:3]} "
                f"or has unknown {list(unexpected)[:3]}"
            )

    # -------------------------------------------------------------- evaluation
    def _stage2(self, model):
        if self.options.stage != "clip":
            raise ValueError(
                "an llm2clip caption_contrastive run trains the LLM alone: evaluate the clip "
                "run that names its model.pt in llm_checkpoint"
            )

    def image_features(self, model, pixels):
        self._stage2(model)
        return model.encode_image(pixels, normalize=True)

    def text_features(self, model, texts):
        self._stage2(model)
        device = next(model.parameters()).device
        items = [self.tokens(t) for t in texts]
        batch = {k: torch.stack([i[k] for i in items]).to(device) for k in items[0]}
        return model.encode_text(batch["ids"], batch["mask"], batch["embed"], normalize=True)

    def protocol(self):
        return {
            **super().protocol(),
            "text_encoder": f"{self.options.llm} (LLM2Vec: bidirectional, mean-pooled, "
            "frozen) + MLP adapter",
            "llm_checkpoint": self.options.llm_checkpoint,
        }


def caption_contrastive_loss(query, doc, scale: float, ctx: Context):
    """LLM2Vec's HardNegativeNLLLoss without hard negatives: each query against every
    positive of the (gathered) batch, cosine x ``scale``, cross-entropy to its own."""
    if ctx.gather:
        query, doc = gather_features(
            query, doc, gather_with_grad=True, rank=ctx.rank, world_size=ctx.world
        )
    scores = scale * F.normalize(query.float(), dim=-1) @ F.normalize(doc.float(), dim=-1).T
    labels = torch.arange(len(scores), device=scores.device)
    accuracy = (scores.argmax(1) == labels).float().mean()
    return F.cross_entropy(scores, labels), {"pair_accuracy": accuracy.item()}
