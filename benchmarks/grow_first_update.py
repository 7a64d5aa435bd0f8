"""Update size of grown LoRA directions under AdamW late in training, with and without GARD's
fresh-Adam rule (docs/usage.md, "What happens at a resize").

    python benchmarks/grow_first_update.py

Prints, for the 10 steps after a grow at step 5,000 with a steady loss, the largest update of a
new B column over lr: zero-padded moments (the rule switched off) against the fresh-Adam
emulation (on); a fresh Adam's is at most ~1.
"""
import torch
from torch import nn

from gard_kernels.lora.layer import LoRALayer
from gard_kernels.lora.optim_state import NEW_KEY

LR = 1e-3


def grown_update_over_lr(fresh_rule: bool, steps: int = 10) -> list[float]:
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(64, 48), 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=LR, weight_decay=0.0)
    x, w = torch.randn(32, 64), torch.randn(48, 64) * 0.1

    def step():
        opt.zero_grad()
        (layer(x) * (x @ w.T)).sum().backward()
        opt.step()

    for _ in range(3):
        step()
    for state in opt.state.values():
        state["step"] = torch.tensor(5000.0)  # late in training
    layer.resize(4, optimizer=opt)
    if not fresh_rule:
        for state in opt.state.values():
            state.pop(NEW_KEY, None)
    ratios = []
    for _ in range(steps):
        before = layer.lora_B.detach().clone()
        step()
        ratios.append(((layer.lora_B.detach() - before)[:, 2:].abs().max() / LR).item())
    return ratios


if __name__ == "__main__":
    print("zero-padded moments:", " ".join(f"{r:.2f}" for r in grown_update_over_lr(False)))
    print("fresh-Adam rule:    ", " ".join(f"{r:.2f}" for r in grown_update_over_lr(True)))
