"""The text conditioner: T5 states equal transformers' own, one prompt at a time or batched, and prompts over the
token limit are refused before T5 runs."""
from __future__ import annotations

import os
import time

import pytest
import torch
from transformers import AutoTokenizer, T5EncoderModel

from enginepy.conditioning import MAX_TEXT_TOKENS, TextConditioner
from enginepy.errors import InvalidParameter
from enginepy.loading import load_components, resolve_model_dir


@pytest.fixture(scope="module")
def parts(tiny_hf, engine_cache):
    directory = resolve_model_dir(tiny_hf, "float32", engine_cache)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
    t5 = T5EncoderModel.from_pretrained(os.path.join(directory, "text_encoder"), dtype=torch.float32).eval()
    return tokenizer, t5


def _transformers_states(parts, prompts):
    tokenizer, t5 = parts
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return t5(**batch).last_hidden_state, batch["attention_mask"].bool()


def test_encode_and_encode_one_equal_transformers(parts):
    conditioner = TextConditioner(*parts, torch.device("cpu"))
    prompts = ["jazz", "warm piano with soft bass and rain at night"]
    states, mask = conditioner.encode(prompts)
    ref_states, ref_mask = _transformers_states(parts, prompts)
    assert torch.equal(mask, ref_mask) and states.dtype == torch.float32
    torch.testing.assert_close(states, ref_states, rtol=0, atol=0)
    for i, prompt in enumerate(prompts):
        one, one_mask = conditioner.encode_one(prompt)
        n = int(ref_mask[i].sum())
        assert one.shape == (1, n, ref_states.shape[-1]) and one_mask.all() and one_mask.shape == (1, n)
        # Alone, without padding: the same states as its unpadded positions in the batch, to fp32 rounding.
        torch.testing.assert_close(one[0], ref_states[i, :n], rtol=1e-5, atol=1e-5)


def test_prompt_at_the_limit_is_encoded_and_one_token_more_is_refused(parts):
    conditioner = TextConditioner(*parts, torch.device("cpu"), max_tokens=20)
    states, _ = conditioner.encode_one(" ".join(["jazz"] * 19))  # 19 words + the end token
    assert states.shape[1] == 20
    with pytest.raises(InvalidParameter) as e:
        conditioner.encode(["ok", " ".join(["jazz"] * 20)])
    assert str(e.value) == ("descriptions[1] is 21 tokens long; the limit is 20 (raise max_text_len in from_pretrained "
                            "or --max-text-len, up to 512, or shorten the prompt)")


def test_a_huge_prompt_is_refused_quickly_without_running_t5(parts):
    tokenizer, t5 = parts
    conditioner = TextConditioner(tokenizer, t5, torch.device("cpu"))
    calls = []
    t5.register_forward_pre_hook(lambda module, args: calls.append(1))
    start = time.perf_counter()
    with pytest.raises(InvalidParameter, match=r"descriptions\[0\] is 20001 tokens long; the limit is 256"):
        conditioner.encode([" ".join(["lo-fi piano"] * 10000)])
    assert time.perf_counter() - start < 5.0 and calls == []


@pytest.mark.parametrize("value", [0, MAX_TEXT_TOKENS + 1, True, "256", 2.0])
def test_max_text_len_is_validated(parts, value):
    with pytest.raises(InvalidParameter, match=r"max_text_len must be an integer in \[1, 512\] \(T5's training length\)"):
        TextConditioner(*parts, torch.device("cpu"), max_tokens=value)


def test_load_components_passes_max_text_len_to_the_conditioner(tiny_hf, engine_cache):
    directory = resolve_model_dir(tiny_hf, "float32", engine_cache)
    _, _, conditioner, _ = load_components(directory, torch.float32, torch.device("cpu"), max_text_len=12)
    assert conditioner.max_tokens == 12
    with pytest.raises(InvalidParameter, match="^prompt is 13 tokens long; the limit is 12"):
        conditioner.encode_one(" ".join(["jazz"] * 12))
    with pytest.raises(InvalidParameter, match=r"^descriptions\[2\] is 13 tokens long"):
        conditioner.check_lengths(["a", "b", " ".join(["jazz"] * 12)])
    with pytest.raises(InvalidParameter, match="max_text_len must be an integer in"):
        load_components(directory, torch.float32, torch.device("cpu"), max_text_len=600)
