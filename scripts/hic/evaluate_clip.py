"""Evaluation of a trained run: long-text retrieval and zero-shot classification.

Retrieval: every image and caption is embedded once (captions truncated at the model's
context length by open_clip's tokenizer), cosine similarity, Recall@1/5/10 in both directions
(``hic.benchmarks.retrieval_metrics``). Classification: open_clip's zero-shot classifier from
class names and templates, top-1/top-5 accuracy. Each result records its protocol.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from open_clip import build_zero_shot_classifier
from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from hic.benchmarks import ClassificationSet, RetrievalSet, retrieval_metrics, topk_accuracy
from hic.clip_model import create_long_clip


def load_run(model_path: Path, device: str = "cpu"):
    """(model, eval transform, tokenizer, settings) of a train_clip run's model.pt."""
    saved = torch.load(model_path, map_location=device, weights_only=False)
    settings = saved["settings"]
    model, _, eval_tf, tokenizer = create_long_clip(
        settings["arch"],
        pretrained=None,
        keep=settings["keep_positions"],
        factor=settings["stretch"],
        device=device,
    )
    model.load_state_dict(saved["model"])
    return model.eval(), eval_tf, tokenizer, settings


@torch.inference_mode()
def embed_images(model, transform, paths: list[Path], batch_size: int = 64) -> np.ndarray:
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(paths), batch_size):
        images = [
            transform(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]
        ]
        chunks.append(model.encode_image(torch.stack(images).to(device), normalize=True).cpu())
    return torch.cat(chunks).float().numpy()


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size]).to(device)
        chunks.append(model.encode_text(tokens, normalize=True).cpu())
    return torch.cat(chunks).float().numpy()


def evaluate_retrieval(model, transform, tokenizer, data: RetrievalSet) -> dict:
    metrics = retrieval_metrics(
        embed_images(model, transform, data.images), embed_texts(model, tokenizer, data.captions)
    )
    return {
        "task": "retrieval",
        "n": len(data.images),
        **metrics,
        "protocol": {
            "similarity": "cosine of L2-normalised embeddings",
            "ties": "pessimistic rank",
            "text_context_length": model.context_length,
            "truncation": "open_clip tokenizer, at the context length",
            "pairs": "one caption per image; row i matches column i",
        },
    }


def evaluate_classification(model, transform, tokenizer, data: ClassificationSet) -> dict:
    device = next(model.parameters()).device
    with torch.inference_mode():
        classifier = build_zero_shot_classifier(
            model, tokenizer, data.classnames, SIMPLE_IMAGENET_TEMPLATES, device=device
        )
    logits = embed_images(model, transform, data.images) @ classifier.cpu().float().numpy()
    accuracy = topk_accuracy(logits, np.asarray(data.labels), ks=(1, 5))
    return {
        "task": "classification",
        "n": len(data.images),
        "classes": len(data.classnames),
        "top1": accuracy["top1"],
        "top5": accuracy["top5"],
        "protocol": {
            "classifier": "open_clip build_zero_shot_classifier",
            "templates": "open_clip SIMPLE_IMAGENET_TEMPLATES (7)",
            "ties": "pessimistic rank",
        },
    }
