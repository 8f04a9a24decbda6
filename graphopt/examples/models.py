"""Built-in example models for the demo and the docs (no downloads, deterministic weights)."""

from __future__ import annotations

import torch
import torch.nn as nn


class ResidualBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, residual add, ReLU: the block remove-layers can drop."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ExampleNet(nn.Module):
    """A small ResNet-style image classifier (3x32x32 in, 10 classes out) with BatchNorm, dropout and an Identity."""

    def __init__(self, width: int = 32, blocks: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.pool, self.neck = nn.AdaptiveAvgPool2d(1), nn.Identity()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.pool(self.blocks(self.stem(x)))))


def example_model(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """ExampleNet in eval mode with non-trivial BatchNorm statistics, and an example batch of 2 images."""
    torch.manual_seed(seed)
    model = ExampleNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # fresh BNs are identities; give them statistics like a trained net
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval(), (torch.randn(2, 3, 32, 32),)


def tiny_llama(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A 2-layer Llama (hidden 64, 4 query / 2 key-value heads, vocabulary 256) in its default Hugging Face config,
    seeded random weights, and a batch of token ids with an attention mask. Needs ``transformers``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    return LlamaForCausalLM(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
