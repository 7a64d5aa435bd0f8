"""Messages and docs say what the code does (each statement here was once wrong)."""
import re
import sys
from pathlib import Path

import pytest
import torch

import gard_kernels as gk

from .models import batches, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def test_suggest_lora_config_docstring_states_the_real_default_window():
    assert f"(GARDConfig.window, default {gk.GARDConfig.window})" in gk.suggest_lora_config.__doc__
    assert "default 8" not in gk.suggest_lora_config.__doc__


def test_integrations_doc_never_calls_the_packages_loader_without_its_source():
    text = (ROOT / "docs" / "integrations.md").read_text(encoding="utf-8")
    # The package's load_model needs a ModelSource; the examples' stand-in has its own name.
    assert not re.search(r"(?<![\w.])load_model\(\)", text)
    assert "load_model(resolve_model(path))" in text and "gard_kernels.experiments.models" in text
    from gard_kernels.experiments.models import load_model, resolve_model  # where the doc says

    assert callable(load_model) and callable(resolve_model)


def test_factored_optimizer_message_names_only_what_gard_offers():
    model = tiny_llama()
    # Dynamic mode: its resizes meet the optimizer's state (static mode's profile comes before it has any).
    gard = gk.GARD(model, gk.GARDConfig(budget=900, target_modules=["q_proj"], r_init=2, backend="torch", mode="dynamic"))
    with pytest.raises(TypeError) as error:
        gard.attach_optimizer(torch.optim.Adafactor(gard.lora_parameters(), lr=1e-2))
    assert "optimizer=None" not in str(error.value) and "torch.optim.AdamW" in str(error.value)


class _Terminal:
    """stderr that says it is a terminal and keeps what is written."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("progress, tty, drawn", [(True, True, True), (True, False, False), (False, True, False)])
def test_suggest_lora_config_shows_progress_only_when_asked_on_a_terminal(progress, tty, drawn, monkeypatch, capsys):
    pytest.importorskip("peft")
    terminal = _Terminal()
    if not tty:
        terminal.isatty = lambda: False
    monkeypatch.setattr(sys, "stderr", terminal)
    gk.suggest_lora_config(tiny_llama(), batches(4), budget=900, target_modules=["q_proj", "v_proj"],
                           progress=progress, backend="torch", window=2)
    assert ("suggest_lora_config: profiling" in terminal.text and "2/2" in terminal.text) == drawn
    assert capsys.readouterr().err == ""
