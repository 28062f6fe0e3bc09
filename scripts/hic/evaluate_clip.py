"""Evaluation of a trained run: long-text retrieval and zero-shot classification.

Each run is scored through its own method's inference path (``hic.methods``): images and
texts are embedded once, and the method scores every image against every text (a dot product
of normalised embeddings for CLIP-like methods; FLAIR pools each image's tokens with each
text). Retrieval: Recall@1/5/10 in both directions. Classification: one text feature per class
from the method's templates, top-1/top-5 accuracy. Each result records its protocol.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hic.benchmarks import ClassificationSet, RetrievalSet, recall_at_k, topk_accuracy
from hic.methods import method_for
from hic.methods.base import Method
from hic.train_clip import TrainSettings


def load_run(model_path: Path, device: str = "cpu") -> tuple[torch.nn.Module, Method, dict]:
    """(model, method, settings) of a train_clip run's model.pt."""
    saved = torch.load(model_path, map_location=device, weights_only=False)
    settings = saved["settings"]
    method = method_for(TrainSettings(**settings))
    model = method.build(device, pretrained=False)
    method.load_saved(model, saved["model"])
    return model.eval(), method, settings


@torch.inference_mode()
def embed_images(model, method: Method, paths: list[Path], batch_size: int = 64) -> torch.Tensor:
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(paths), batch_size):
        images = [
            method.eval_transform(Image.open(p).convert("RGB"))
            for p in paths[start : start + batch_size]
        ]
        features = method.image_features(model, torch.stack(images).to(device))
        chunks.append(features.float().cpu())  # a method's per-token features fill a GPU
    return torch.cat(chunks)


@torch.inference_mode()
def embed_texts(model, method: Method, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    chunks = [
        method.text_features(model, texts[start : start + batch_size]).float().cpu()
        for start in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks)


@torch.inference_mode()
def similarity(model, method: Method, images: torch.Tensor, texts: torch.Tensor) -> np.ndarray:
    scores = method.similarity(model, images, texts).float().cpu().numpy()
    if scores.shape != (len(images), len(texts)) or not np.isfinite(scores).all():
        raise ValueError(
            f"method {method.name!r} scored {len(images)} images x {len(texts)} texts as "
            f"{scores.shape}{'' if np.isfinite(scores).all() else ' with non-finite values'}"
        )
    return scores


def evaluate_retrieval(model, method: Method, data: RetrievalSet, ks=(1, 5, 10)) -> dict:
    scores = similarity(
        model,
        method,
        embed_images(model, method, data.images),
        embed_texts(model, method, data.captions),
    )
    return {
        "task": "retrieval",
        "n": len(data.images),
        "image_to_text": recall_at_k(scores, ks),
        "text_to_image": recall_at_k(scores.T, ks),
        "protocol": {
            **method.protocol(),
            "ties": "pessimistic rank",
            "pairs": "one caption per image; row i matches column i",
        },
    }


def evaluate_classification(model, method: Method, data: ClassificationSet) -> dict:
    with torch.inference_mode():
        classes = method.class_features(model, data.classnames).float()
    logits = similarity(model, method, embed_images(model, method, data.images), classes)
    accuracy = topk_accuracy(logits, np.asarray(data.labels), ks=(1, 5))
    return {
        "task": "classification",
        "n": len(data.images),
        "classes": len(data.classnames),
        "top1": accuracy["top1"],
        "top5": accuracy["top5"],
        "protocol": {
            **method.protocol(),
            "classifier": "per class, the normalised mean of its templates' text features",
            "ties": "pessimistic rank",
        },
    }
