"""The package's floors hold: each layer imports only what sits below it, lazy imports included.

    reference            the float64 oracle
    sketch/              the op and its backends: nothing of the package but the reference
    lora/                adapters and capture: nothing above it (the sketch, the reference)
    ring, spectra, allocate, budget, config, distributed, controller: the core, which never imports the
                         experiment wing (experiments/, cli) or integrations/
    integrations/, experiments/, cli, and the package's __init__ (public re-exports) sit on top.
"""
from pathlib import Path

import pytest

from .test_import_graph import _imports, _module_names

PACKAGE = "gard_kernels"
WING = ("gard_kernels.experiments", "gard_kernels.integrations", "gard_kernels.cli", "gard_kernels.__main__")
# Layer -> the only package modules it may import (a prefix covers a subpackage).
ALLOWED = {
    "gard_kernels.sketch": ("gard_kernels.reference", "gard_kernels.sketch"),
    "gard_kernels.lora": ("gard_kernels.reference", "gard_kernels.sketch", "gard_kernels.lora"),
}
# Layer -> what it must never import.
FORBIDDEN = {
    "gard_kernels.controller": WING,
}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _is_core(module: str) -> bool:
    return module != PACKAGE and not any(_under(module, w) for w in WING)


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """'importer -> imported (rule)' for every import that breaks a floor."""
    found = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            for layer, allowed in ALLOWED.items():
                if _under(module, layer) and not any(_under(target, a) for a in allowed):
                    found.append(f"{module} -> {target} ({layer} may import only {', '.join(allowed)})")
            for layer, forbidden in FORBIDDEN.items():
                if _under(module, layer) and any(_under(target, f) for f in forbidden):
                    found.append(f"{module} -> {target} ({layer} never imports {', '.join(forbidden)})")
            if _is_core(module) and not _is_core(target) and target != PACKAGE:
                found.append(f"{module} -> {target} (the core never imports the experiment wing or integrations)")
            if _is_core(module) and target == PACKAGE:
                found.append(f"{module} -> {target} (the package's __init__ imports the core, not the reverse)")
    return found


def _graph() -> dict[str, set[str]]:
    names = _module_names()
    return {m: _imports(m, p, set(names)) for m, p in names.items()}


def test_every_floor_holds():
    graph = _graph()
    assert {"gard_kernels.sketch.gradient_sketch", "gard_kernels.lora.layer", "gard_kernels.controller"} <= set(graph)
    assert layering_violations(graph) == []


@pytest.mark.parametrize("importer, imported", [
    ("gard_kernels.sketch.torch_impl", "gard_kernels.lora.layer"),
    ("gard_kernels.sketch.gradient_sketch", "gard_kernels"),
    ("gard_kernels.lora.layer", "gard_kernels.config"),
    ("gard_kernels.lora.manager", "gard_kernels.controller"),
    ("gard_kernels.controller", "gard_kernels.integrations.hf_trainer"),
    ("gard_kernels.controller", "gard_kernels.experiments.presets"),
    ("gard_kernels.spectra", "gard_kernels.experiments.io"),
    ("gard_kernels.config", "gard_kernels.cli"),
])
def test_a_forbidden_edge_is_reported(importer, imported):
    graph = _graph()
    graph[importer] = graph[importer] | {imported}
    assert any(v.startswith(f"{importer} -> {imported} ") for v in layering_violations(graph))


def test_a_forbidden_lazy_import_in_source_is_seen(tmp_path: Path):
    """End to end: an import inside a function of a core file is parsed and refused."""
    source = tmp_path / "controller.py"
    source.write_text("def later():\n    from .experiments import runner\n    return runner\n")
    names = _module_names()
    graph = _graph()
    graph["gard_kernels.controller"] = _imports("gard_kernels.controller", source, set(names))
    assert graph["gard_kernels.controller"] == {"gard_kernels.experiments.runner"}
    assert layering_violations(graph) == [
        "gard_kernels.controller -> gard_kernels.experiments.runner "
        "(gard_kernels.controller never imports gard_kernels.experiments, gard_kernels.integrations, "
        "gard_kernels.cli, gard_kernels.__main__)",
        "gard_kernels.controller -> gard_kernels.experiments.runner (the core never imports the experiment wing or integrations)",
    ]
