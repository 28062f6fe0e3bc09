"""Tiny offline stand-ins of the real models, built and saved the way hub checkpoints are.

A Qwen2.5-VL with a byte-level BPE trained here on generated scene sentences (the real special
and added tokens, the real chat template) and an OWLv2 with the real CLIP BPE, each a few MB,
randomly initialised: ``hic.models`` loads them through exactly the path real weights take.
The random builders serve the tests that need a model of a given shape fast.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    CLIPTokenizer,
    GenerationConfig,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Qwen2.5-VL's special tokens in their real order; like the real tokenizer, they follow the
# learned vocabulary, so relative ids match (real: <|endoftext|> = 151643, ... <|video_pad|>).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Then the real tokenizer's added tokens that are not special (decoding keeps them):
# tool-call and fill-in-the-middle markers, <tool_call> = 151657 ... <|file_sep|> = 151664.
QWEN_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Renders what Qwen2.5-VL's own template renders: a default system turn, ChatML turns, and
# each image or video as a vision span the processor expands to one pad per merged patch.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small pixel budgets (4 to 64 merged 28x28 patches per image) keep tiny-model runs fast on CPU.
TINY_MIN_PIXELS = 28 * 28 * 4
TINY_MAX_PIXELS = 28 * 28 * 64
TINY_VOCAB_SIZE = 2000

_COLOURS = (
    "red orange yellow green blue purple pink brown black white grey silver golden beige "
    "turquoise crimson navy olive maroon teal ivory pale dark bright faded"
).split()
_TEXTURES = (
    "wooden metal glass plastic stone brick leather woollen paper concrete ceramic marble "
    "rusty shiny wet dusty striped spotted checkered wrinkled polished cracked painted "
    "muddy frosted velvet cotton copper bronze wicker bamboo rubber"
).split()
_SIZES = (
    "small large tiny huge tall short long narrow wide round square old new empty full "
    "crowded lonely broken open closed curved flat steep"
).split()
_THINGS = (
    "car bus bicycle motorcycle truck train boat airplane dog cat horse cow sheep bird duck "
    "elephant giraffe zebra bear person man woman child boy girl baby chair table bench sofa "
    "bed lamp window door wall fence tree flower bush plant grass road street sidewalk "
    "building house tower bridge river lake mountain hill cloud sky umbrella bag backpack "
    "bottle cup glass bowl plate fork knife spoon banana apple orange sandwich pizza cake "
    "laptop phone keyboard television clock book vase kite ball skateboard surfboard frisbee "
    "sign pole light shadow roof chimney balcony staircase statue fountain tent rock wave "
    "beach field forest garden kitchen bedroom office shelf mirror painting curtain carpet "
    "pillow blanket helmet jacket shirt dress hat shoe scarf glove basket box bucket ladder "
    "tractor scooter wagon carriage ferry yacht canoe helicopter rocket lighthouse windmill "
    "castle cathedral temple mosque church stadium market bakery cafe restaurant library "
    "museum hospital school factory warehouse garage barn stable farm vineyard orchard "
    "meadow valley canyon desert glacier volcano island harbour pier dock cliff cave "
    "waterfall pond stream puddle snow ice sand gravel pebble leaf branch trunk root "
    "mushroom cactus palm pine oak willow tulip rose daisy sunflower lily fern moss "
    "squirrel rabbit fox deer wolf lion tiger monkey penguin parrot pigeon seagull owl "
    "eagle butterfly bee spider snail turtle frog fish crab dolphin whale goat pig chicken "
    "donkey camel kangaroo koala panda puppy kitten lamb calf pony guitar piano violin drum "
    "microphone camera tripod poster banner flag candle lantern bulb switch socket cable "
    "wire pipe hose faucet sink bathtub towel soap toothbrush comb brush bucket shovel "
    "hammer saw drill wrench screwdriver toolbox wheelbarrow lawnmower broom mop sponge "
    "teapot kettle pan pot oven stove fridge microwave toaster blender jar lid tray napkin "
    "tablecloth menu receipt wallet purse suitcase ticket map compass binoculars telescope "
    "globe calendar notebook pencil pen marker eraser ruler scissors stapler envelope "
    "newspaper magazine sculpture mural graffiti railing archway column dome spire gate "
    "mailbox hydrant bollard crosswalk traffic signal billboard awning kiosk tram subway "
    "platform escalator elevator corridor hallway doorway porch patio deck veranda attic "
    "basement cellar courtyard alley avenue highway tunnel runway parking lot"
).split()
_GERUNDS = (
    "walking running sitting standing jumping sleeping eating drinking reading writing "
    "playing riding driving flying swimming climbing carrying holding pushing pulling "
    "looking waiting talking laughing smiling waving pointing cooking cleaning painting "
    "fishing dancing singing shopping resting leaning hanging floating glowing shining"
).split()
_PLACES = (
    "in a busy city square|on a quiet country road|inside a bright kitchen|near a calm lake|"
    "at the edge of a dense forest|on a crowded beach|in a snowy park|beside an old barn|"
    "under a cloudy sky|in a dim living room|at a small train station|on a rooftop terrace|"
    "in a flower garden|along a rocky coastline|inside a cluttered office|at a street market"
).split("|")
_ACTIONS = (
    "stands|sits|rests|leans|waits|hangs|lies|floats|runs|walks|jumps|sleeps|looks|"
    "is parked|is stacked|is placed|is reflected|is partly hidden|is covered"
).split("|")
_RELATIONS = (
    "next to|behind|in front of|on top of|beneath|beside|across from|to the left of|"
    "to the right of|between|near|above|below|inside|around"
).split("|")
_LIGHT = (
    "in soft morning light|under harsh noon sun|at golden sunset|in heavy rain|in thick fog|"
    "on a clear day|at night under street lamps|in dappled shade"
).split("|")
_OPENINGS = (
    "The image shows|In the foreground,|In the background,|On the left side,|On the right side,|"
    "At the centre of the picture,|Close to the camera,|Far away,"
).split("|")
_INSTRUCTIONS = (
    "Describe the image in detail.",
    "Describe this region briefly.",
    "What objects are visible, and where are they?",
    "Write a short caption for the picture.",
    "List the main objects, their colours, materials and positions.",
)


def scene_sentences(n: int = 6000) -> Iterator[str]:
    """A deterministic English corpus of scene descriptions (the default tokenizer corpus)."""
    # Only Random.random() is guaranteed to repeat across Python versions for a given seed.
    rng = random.Random(0)

    def pick(words: list[str]) -> str:
        return words[int(rng.random() * len(words))]

    yield from _INSTRUCTIONS
    for i in range(n):
        thing, other = pick(_THINGS), pick(_THINGS)
        sentence = (
            f"{pick(_OPENINGS)} a {pick(_SIZES)} {pick(_COLOURS)} {pick(_TEXTURES)} {thing} "
            f"{pick(_ACTIONS)} {pick(_RELATIONS)} the {other} {pick(_PLACES)} {pick(_LIGHT)}."
        )
        if i % 3 == 0:
            # Region-caption style: capitalised nouns, plurals, gerunds and numbers.
            sentence += (
                f" {thing.capitalize()} {pick(_GERUNDS)} near {i % 12 + 2} {other}s, "
                f"about {i % 97} cm away."
            )
        yield sentence


def train_qwen_tokenizer(
    corpus: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE
) -> Qwen2Tokenizer:
    """A byte-level BPE learned on ``corpus`` with Qwen2's pre-tokenisation and special tokens."""
    backend = Tokenizer(BPE())
    # Same normaliser and splitting as Qwen2Tokenizer, so the learned merges fit its pipeline.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    learned = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = learned["vocab"]
    added = {
        len(vocab) + i: AddedToken(token, special=token in QWEN_SPECIAL_TOKENS, normalized=False)
        for i, token in enumerate(QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS)
    }
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(pair) for pair in learned["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        added_tokens_decoder=added,
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )


def tiny_qwen2_5_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL's layout (window + full attention vision tower, M-RoPE text) at toy scale."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    head_dim = 16
    text = {
        # Padded to a multiple of 64 like the real embedding table (152064 > len(tokenizer)).
        "vocab_size": -(-len(tokenizer) // 64) * 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 64 // head_dim,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "max_window_layers": 2,
        # M-RoPE splits the head_dim/2 rotary frequencies over (time, height, width).
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
        "out_hidden_size": 64,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def tiny_qwen2_5_vl_processor(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLProcessor:
    pixels = {"min_pixels": TINY_MIN_PIXELS, "max_pixels": TINY_MAX_PIXELS}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def build_tiny_vlm(out_dir: Path, *, seed: int = 0, corpus: Iterable[str] | None = None) -> None:
    """Save a tiny random Qwen2.5-VL with its processor to ``out_dir``, byte-identical per seed."""
    out_dir = Path(out_dir)
    tokenizer = train_qwen_tokenizer(scene_sentences() if corpus is None else corpus)
    config = tiny_qwen2_5_vl_config(tokenizer)
    # A private RNG stream: building a model must not reseed the caller's torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tiny_qwen2_5_vl_processor(tokenizer).save_pretrained(out_dir)
    _write_card(out_dir, type(model).__name__, seed)


def _write_card(out_dir: Path, architecture: str, seed: int) -> None:
    card = {"architecture": architecture, "kind": "tiny random", "seed": seed}
    (out_dir / "hic_model.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def clip_tokenizer(model_max_length: int = 16) -> CLIPTokenizer:
    """CLIP's BPE with open_clip's token ids, rebuilt offline from the merges open_clip ships."""
    # find_spec locates the package without importing it (open_clip's import takes seconds).
    package = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    lines = gzip.decompress((package / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode()
    # CLIP keeps the first 49152 - 256 - 2 merges (after a version line), so that bytes, their
    # word-final forms, merges and the two specials make a 49408-token vocabulary.
    merges = [tuple(line.split()) for line in lines.split("\n")[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = [
        *symbols,
        *(symbol + "</w>" for symbol in symbols),
        *("".join(merge) for merge in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=merges,
        # Hub OWL tokenizers pad with "!" (id 0), but as a special token "!" would then never reach
        # BPE and "wow!" would tokenise unlike open_clip. Padding with the end token instead keeps
        # the text ids and changes no output: the encoder is causal and pools the first end token.
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )


def build_tiny_owlv2(out_dir: Path, *, seed: int = 0) -> None:
    """Save a tiny random OWLv2 detector with the real CLIP tokenizer to ``out_dir``."""
    out_dir = Path(out_dir)
    image_size = 64
    config = Owlv2Config(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(config)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=clip_tokenizer(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    _write_card(out_dir, type(model).__name__, seed)


TINY_BUILDERS: dict[str, Callable[..., None]] = {
    "qwen2_5_vl": build_tiny_vlm,
    "owlv2": build_tiny_owlv2,
}
