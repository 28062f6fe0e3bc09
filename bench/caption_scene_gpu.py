"""Captioning on a GPU: images/s, output tokens/s and GPU utilisation of the real stage's
transformers backend at Qwen2.5-VL-3B (or 7B) size.

    python bench/caption_scene_gpu.py [--scale 3b|7b] [--images 256] [--batch-sizes 1 16 64]
    .venv/bin/python bench/caption_scene_gpu.py --scale tiny --images 8 --batch-sizes 1 4  # CPU

Needs only this repo's scripts/ and torch, transformers (5.16 or later), pyarrow, pillow,
pyyaml. No weights can be downloaded, so the model is a randomly initialised Qwen2.5-VL with
the dimensions of Qwen2.5-VL-3B-Instruct (its config.json: 36 text layers of width 2048, a
32-block vision tower of width 1280) or of Qwen2.5-VL-7B-Instruct (28 layers of width 3584),
saved with the tiny tokenizer and loaded through the stage's own transformers backend (bf16 on
CUDA). The whole shard is one chunk: ``batch_size`` alone decides the ``generate`` calls, their
requests sorted by length. A random model rarely emits an end token, so most captions run to
``max_new_tokens``: the figures are for near full-length generations. Prints, per batch size,
images/s, generated tokens/s (up to each row's end token), the share of stage time outside the
model and the mean GPU utilisation (nvidia-smi sampled every 200 ms), then the ratio of the
largest batch to batch size 1 last.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

from caption_scene import PROMPTS, demo_shard  # noqa: E402

from hic.caption_scene import CaptionSettings, caption_shard  # noqa: E402
from hic.models import ModelRef  # noqa: E402
from hic.tiny_models import (  # noqa: E402
    scene_sentences,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_processor,
    train_qwen_tokenizer,
)
from hic.vlm import make_backend  # noqa: E402

# Qwen2.5-VL-3B-Instruct's dimensions (Hugging Face config.json of that model).
TEXT_3B = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
}
VISION_3B = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "fullatt_block_indexes": [7, 15, 23, 31],
}
# Qwen2.5-VL-7B-Instruct's: the same vision tower, projecting to a wider, shallower text model.
TEXT_7B = {
    **TEXT_3B,
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_window_layers": 28,
}
VISION_7B = {**VISION_3B, "out_hidden_size": 3584}
SIZES = {"3b": (TEXT_3B, VISION_3B, True), "7b": (TEXT_7B, VISION_7B, False)}


def build_model(out_dir: Path, scale: str) -> None:
    """Save a random Qwen2.5-VL (tiny, 3B or 7B dimensions) with the tiny processor."""
    tokenizer = train_qwen_tokenizer(scene_sentences())
    config = tiny_qwen2_5_vl_config(tokenizer)
    if scale in SIZES:
        text_dims, vision_dims, tied = SIZES[scale]
        text = {k: v for k, v in config.text_config.to_dict().items() if k != "layer_types"}
        config = Qwen2_5_VLConfig(
            text_config={**text, **text_dims},  # layer_types: rebuilt for the layer count
            vision_config={**config.vision_config.to_dict(), **vision_dims},
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id,
            tie_word_embeddings=tied,
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: billions of parameters take minutes on CPU
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id, pad_token_id=config.text_config.pad_token_id
    )
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
    model.save_pretrained(out_dir)
    tiny_qwen2_5_vl_processor(tokenizer).save_pretrained(out_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


class GpuSampler:
    """Mean GPU utilisation (%) from nvidia-smi, sampled in the background; None without it."""

    def __init__(self, interval_ms: int = 200):
        self.samples: list[float] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    f"-lms={interval_ms}",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().split(",")[0].strip().isdigit():
                self.samples.append(float(line.split(",")[0]))

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait()
        self.reader.join(timeout=5)
        return sum(self.samples) / len(self.samples) if self.samples else None


class TokenCounter:
    """Wraps ``model.generate`` to count generated tokens, each row up to its end token."""

    def __init__(self, model):
        self.tokens, self.generate = 0, model.generate
        model.generate = self
        eos = model.generation_config.eos_token_id
        self.eos = torch.tensor([eos] if isinstance(eos, int) else list(eos))

    def __call__(self, **inputs):
        output = self.generate(**inputs)
        new = output[:, inputs["input_ids"].shape[1] :]
        is_end = torch.isin(new, self.eos.to(new.device)).int()
        # Tokens before the first end token, plus the end token itself where there is one.
        before = (is_end.cumsum(dim=1) == 0).sum(dim=1)
        self.tokens += int((before + is_end.any(dim=1).int()).sum())
        return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=["3b", "7b", "tiny"], default="3b")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--short-tokens", type=int, default=48)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / f"random-qwen2_5_vl-{args.scale}"
        build_model(model_dir, args.scale)
        tar, status = demo_shard(tmp, args.images, size=(448, 336))
        base = CaptionSettings(
            chunk_size=args.images,
            max_new_tokens={"short": args.short_tokens, "long": args.long_tokens},
            max_pixels=args.max_pixels,
        )
        backend = make_backend(
            "transformers", ModelRef(str(model_dir)), min_pixels=3136, max_pixels=args.max_pixels
        )
        print(f"device: {next(backend.model.parameters()).device}", flush=True)
        counter = TokenCounter(backend.model)
        rates = {}
        for batch_size in args.batch_sizes:
            settings = CaptionSettings(**{**base.__dict__, "batch_size": batch_size})
            backend.batch_size = batch_size
            counter.tokens = 0
            sampler = GpuSampler()
            summary = caption_shard(
                tar,
                status,
                tmp / f"scene_b{batch_size}.parquet",
                PROMPTS,
                settings,
                backend,
                {"id": model_dir.name},
            )
            utilisation = sampler.stop()
            rates[batch_size] = args.images / summary["seconds_total"]
            gpu = "n/a" if utilisation is None else f"{utilisation:.0f}%"
            print(
                f"batch size {batch_size:3d}: {rates[batch_size]:7.2f} images/s, "
                f"{counter.tokens / summary['seconds_total']:8.1f} output tokens/s "
                f"({counter.tokens} tokens), statuses {summary['status']}, "
                f"{summary['fraction_outside_model']:.1%} of stage time outside the model, "
                f"GPU utilisation {gpu}",
                flush=True,
            )
    largest, smallest = max(args.batch_sizes), min(args.batch_sizes)
    print(f"ratio batch {largest}/batch {smallest}: {rates[largest] / rates[smallest]:.2f}")


if __name__ == "__main__":
    main()
