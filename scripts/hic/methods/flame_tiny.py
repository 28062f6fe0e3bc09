"""A tiny offline stand-in of FLAME's frozen LLM (Mistral-Nemo): the same architecture
(``MistralForCausalLM``) at toy scale, randomly initialised, with a byte-level BPE whose
specials sit where Mistral's do (<unk> = 0, <s> = 1, </s> = 2, BOS prepended), saved the way hub
checkpoints are so that ``hic.methods.flame`` loads it through ``from_pretrained`` like the
real weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from hic.methods.flame import FACETS, shared_prompt
from hic.tiny_models import scene_sentences

SPECIALS = ("<unk>", "<s>", "</s>")
# Tekken-style splitting (Mistral-Nemo's tokenizer is a byte-level BPE with a GPT-4-like regex).
SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_mistral_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    backend = Tokenizer(BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),  # ids 0, 1, 2, as in Mistral's vocabulary
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # FLAME's prompt words are whole tokens in a real LLM vocabulary: the corpus repeats them.
    prompts = [shared_prompt("", t) + "".join(FACETS) for t in ("long", "short")] * 50
    backend.train_from_iterator([*scene_sentences(2000), *prompts], trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=4096,
    )


def tiny_mistral_config(vocab: int) -> MistralConfig:
    """Mistral-Nemo's layout (GQA, explicit head_dim, RoPE theta 1e6, untied head) at toy size."""
    return MistralConfig(
        vocab_size=-(-vocab // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny_mistral(out_dir: Path, *, seed: int = 0) -> None:
    """Save a tiny random Mistral with its tokenizer to ``out_dir`` (deterministic per seed)."""
    out_dir = Path(out_dir)
    tokenizer = train_mistral_tokenizer()
    with torch.random.fork_rng(devices=[]):  # building must not reseed the caller's RNG
        torch.manual_seed(seed)
        model = MistralForCausalLM(tiny_mistral_config(len(tokenizer)))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    card = {"architecture": "MistralForCausalLM", "kind": "tiny random", "seed": seed}
    (out_dir / "hic_model.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
