"""Text conditioning: tokenizer + T5 encoder (transformers' classes, always fp32)."""
from __future__ import annotations

import torch


class TextConditioner:
    """Turns prompts into T5 states. encode(prompts) -> states fp32 [B, Tt, Dt], mask bool [B, Tt]."""

    def __init__(self, tokenizer, encoder: torch.nn.Module, device: torch.device):
        self.tokenizer = tokenizer
        self.encoder = encoder.to(device=device, dtype=torch.float32).eval()
        self.device = device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(prompts, padding=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return states.float(), mask.bool()
