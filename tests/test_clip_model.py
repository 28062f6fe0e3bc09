import torch

from hic.clip_model import create_long_clip, stretch_positional_embedding


def test_stretch_keeps_the_first_positions_and_interpolates_the_rest():
    pos = torch.randn(77, 6, generator=torch.Generator().manual_seed(0))
    long = stretch_positional_embedding(pos, keep=20, factor=4)
    assert long.shape == (248, 6)
    assert torch.equal(long[:20], pos[:20])
    assert torch.equal(long[20::4], pos[20:])  # every 4th row is an original position
    assert torch.allclose(long[22], (pos[20] + pos[21]) / 2, atol=1e-6)  # halfway between 20 and 21
    extrapolated = pos[76] + 3 / 4 * (pos[76] - pos[75])
    assert torch.allclose(long[247], extrapolated, atol=1e-6)  # float32 rounding near zero


def test_long_model_reads_248_tokens_and_differs_beyond_77():
    torch.manual_seed(0)
    model, _, eval_tf, tokenizer = create_long_clip(
        "HIC-Tiny-CLIP", pretrained=None, keep=20, factor=4
    )
    assert model.context_length == 248 and model.attn_mask.shape == (248, 248)
    words = " ".join(["ball"] * 100)  # 100 tokens: past CLIP's 77, within 248
    tokens = tokenizer([words, words + " and a red ball at the very end"])
    assert tokens.shape == (2, 248)
    with torch.no_grad():
        text = model.encode_text(tokens, normalize=True)
    assert text.shape == (2, 64) and torch.isfinite(text).all()
    # Tokens past position 77 reach the embedding (a 77-token model would cut them off).
    assert not torch.allclose(text[0], text[1])


def test_only_the_used_positions_are_encoded_with_the_same_result():
    torch.manual_seed(0)
    model, _, _, tokenizer = create_long_clip("HIC-Tiny-CLIP", pretrained=None, keep=20, factor=4)
    tokens = tokenizer(["a red ball", "a blue kite on snow under a night sky"])
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        fast = model.encode_text(tokens, normalize=True)
        full = type(model).encode_text(model, tokens, normalize=True)  # open_clip's own
    hook.remove()
    assert seen[0][1] == 11 and seen[1][1] == 248  # the longer text: 9 words, start and end
    assert torch.allclose(fast, full, atol=1e-5)
