"""Text conditioning: tokenizer + T5 encoder (transformers' classes, always fp32)."""
from __future__ import annotations

import torch

from .errors import InvalidParameter

# T5 was trained on inputs of up to 512 tokens (audiocraft truncates there); its relative position buckets
# make longer inputs run, slowly and with memory growing as Tt², but they are outside what it has learned.
MAX_TEXT_TOKENS = 512
# The default limit: the fast backend sizes its cross-attention buffers for this many tokens.
DEFAULT_TEXT_TOKENS = 256


def check_max_text_len(max_tokens) -> int:
    """The per-prompt token limit: an integer in [1, MAX_TEXT_TOKENS]."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TEXT_TOKENS:
        raise InvalidParameter(
            f"max_text_len must be an integer in [1, {MAX_TEXT_TOKENS}] (T5's training length); got {max_tokens!r}"
        )
    return max_tokens


class TextConditioner:
    """Turns prompts into T5 states: encode(prompts) -> states fp32 [B, Tt, Dt], mask bool [B, Tt].

    Every prompt is tokenized first and refused (InvalidParameter) when it has more than `max_tokens` tokens,
    before T5 runs: a long prompt would otherwise cost time and memory growing with its length squared.
    """

    def __init__(self, tokenizer, encoder: torch.nn.Module, device: torch.device, max_tokens: int = DEFAULT_TEXT_TOKENS):
        self.tokenizer = tokenizer
        self.encoder = encoder.to(device=device, dtype=torch.float32).eval()
        self.device = device
        self.max_tokens = check_max_text_len(max_tokens)

    def check_lengths(self, prompts: list[str], names: list[str] | None = None) -> list[int]:
        """Token count of each prompt (with T5's end token); InvalidParameter naming the first one over max_tokens
        by names[i] (default 'descriptions[i]', the index in the caller's list)."""
        # verbose=False: this check replaces transformers' "sequence is longer than" warning.
        lengths = [len(seq) for seq in self.tokenizer(list(prompts), verbose=False)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > self.max_tokens:
                name = names[i] if names is not None else f"descriptions[{i}]"
                raise InvalidParameter(
                    f"{name} is {n} tokens long; the limit is {self.max_tokens} (raise max_text_len "
                    f"in from_pretrained or --max-text-len, up to {MAX_TEXT_TOKENS}, or shorten the prompt)"
                )
        return lengths

    @torch.no_grad()
    def encode(self, prompts: list[str], names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts [B] -> states fp32 [B, Tt, Dt] (Tt = the longest prompt's tokens), mask bool [B, Tt].
        A prompt over the limit is refused by names[i] (see check_lengths) before T5 runs."""
        self.check_lengths(prompts, names)
        batch = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return states.float(), mask.bool()

    def encode_one(self, prompt: str, name: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt -> states fp32 [1, Tt, Dt], mask bool [1, Tt] (all True: no padding); refused as `name`."""
        return self.encode([prompt], [name])
