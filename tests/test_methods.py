"""The method framework (hic.methods): what every method shares, checked on the plain one."""

import random

import pytest
import torch
from PIL import Image

from hic.evaluate_clip import similarity
from hic.methods import method_for
from hic.methods.base import Context, Method, parameter_counts
from hic.train_clip import TrainSettings

TINY = {"arch": "HIC-Tiny-CLIP", "policy": "long"}


def test_an_unknown_method_or_option_is_named():
    with pytest.raises(ValueError, match="unknown method 'flare'.*flair"):
        TrainSettings(**TINY, method="flare")
    with pytest.raises(ValueError, match="method 'clip' has no option.*'tau'.*none"):
        method_for(TrainSettings(**TINY, options={"tau": 1}))


def test_frozen_parameters_are_not_optimised_and_norms_are_not_decayed():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(4, 4)
    model.ln_final = torch.nn.LayerNorm(4)
    model.logit_scale = torch.nn.Parameter(torch.ones([]))
    model.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    free, decayed = Method(TrainSettings(**TINY)).parameter_groups(model, 0.2)
    assert decayed["weight_decay"] == 0.2 and decayed["params"] == [model.proj.weight]
    assert free["weight_decay"] == 0.0 and len(free["params"]) == 4
    assert parameter_counts(model) == {"trainable": 16 + 4 + 8 + 1, "frozen": 20, "total": 49}


def test_the_plain_method_trains_on_its_examples_and_scores_by_dot_product():
    method = method_for(TrainSettings(**TINY))
    torch.manual_seed(0)
    model = method.build()
    image = Image.new("RGB", (80, 60), "red")
    items = [method.example(image, f"a red {w}", random.Random(0)) for w in ("cup", "kite")]
    batch = torch.utils.data.default_collate(items)
    loss, logs = method.loss(model(**batch), Context())
    assert loss.ndim == 0 and torch.isfinite(loss) and logs == {}
    loss.backward()
    assert model.visual.conv1.weight.grad is not None
    with torch.no_grad():
        texts = method.text_features(model, ["a red cup", "a red kite", "a blue cup"])
        images = method.image_features(model, batch["image"])
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3))
    scores = similarity(model, method, images, texts)
    assert scores.shape == (2, 3)
    assert scores == pytest.approx((images @ texts.T).numpy())


def test_a_method_scoring_the_wrong_shape_is_an_error():
    class Broken(Method):
        name = "broken"

        def similarity(self, model, images, texts):
            return images @ images.T

    method = Broken(TrainSettings(**TINY))
    with pytest.raises(ValueError, match="scored 2 images x 3 texts as \\(2, 2\\)"):
        similarity(torch.nn.Linear(1, 1), method, torch.ones(2, 4), torch.ones(3, 4))
