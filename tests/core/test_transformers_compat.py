"""``create_causal_mask`` is called by the names its signature has, across the transformers the project
allows (checked by hand with 4.40.2, 4.57.6, 5.0.0 and 5.24.0: the encoder equals the model's forward)."""

from __future__ import annotations

import pytest
import torch

import sdrepl.core.conditioning as conditioning


def v5_0(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None):
    return ("5.0", input_embeds.shape, cache_position.tolist(), past_key_values)


def v5_24(config, inputs_embeds, attention_mask, cache, position_ids=None, or_mask_function=None):
    return ("5.24", inputs_embeds.shape, cache)


def v4_56(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None):
    return ("4.56", input_embeds.shape, cache_position.tolist(), past_key_values)


@pytest.mark.parametrize(("fake", "expected"), [
    (v5_0, ("5.0", (1, 3, 2), [0, 1, 2], None)),
    (v4_56, ("4.56", (1, 3, 2), [0, 1, 2], None)),
    (v5_24, ("5.24", (1, 3, 2), None)),
])
def test_the_mask_is_asked_for_in_each_versions_words(fake, expected, monkeypatch):
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "create_causal_mask", fake)
    conditioning._causal_mask_arguments.cache_clear()
    try:
        assert conditioning._causal_mask(object(), torch.zeros(1, 3, 2)) == expected
    finally:
        conditioning._causal_mask_arguments.cache_clear()


def test_the_installed_version_needs_no_deprecated_argument():
    import warnings

    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77)).eval()
    ids = torch.randint(0, 98, (1, 77))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated keyword would warn (transformers' deprecate_kwarg)
        ours = conditioning.encode_chunks(model, [conditioning.ChunkInput(ids[0])])
    with torch.no_grad():
        assert torch.equal(ours.detach(), model(input_ids=ids).last_hidden_state)
