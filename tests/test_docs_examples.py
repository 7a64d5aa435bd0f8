"""Every fenced python example of README.md and docs/*.md runs, on tiny stand-in models.

Each block runs as a reader would paste it. Names a block reads but does not define are the
reader's own objects (`model`, `loader`, `ds`, ...): the test supplies tiny stand-ins for them
(STAND_INS), and a name it cannot supply fails the test, so an example that uses something it
never defined (a `step` out of nowhere) is caught. Markers, an HTML comment on the line before
a block:

    <!-- doc-test: continue -->        the block continues the one before it in the same file
                                       (same namespace), as the prose reads
    <!-- doc-test: skip (reason) -->   the block cannot run here (torchrun, GPUs, a real
                                       model); the reason says why and where it is covered

Every other python block runs; the skip list stays tiny (MAX_SKIPS).
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

import gard_kernels as gk

from .models import VOCAB, batches, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_LANGS = {"python", "py"}
MAX_SKIPS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    directive: str  # "run", "continue" or "skip"
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{_shown(self.path)}:{self.line}"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


_FENCE = re.compile(r"^(\s*)```(.*)$")
_MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
_DIRECTIVE = re.compile(r"^(continue)$|^skip \((.+)\)$")


def extract_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """Python blocks of one markdown file, with their markers.

    Returns:
        (blocks, problems): problems are fences without a language and malformed markers.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, problems = [], []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        lang = match.group(2).strip().lower()
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        where = f"{_shown(path)}:{i + 1}"
        if not lang:
            problems.append(f"{where}: fenced block without a language (write ```python, ```bash, ...)")
        if lang in PYTHON_LANGS:
            directive, reason = "run", ""
            before = i - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            marker = _MARKER.match(lines[before]) if before >= 0 else None
            if marker:
                parsed = _DIRECTIVE.match(marker.group(1))
                if parsed is None:
                    problems.append(f"{where}: unknown doc-test marker {marker.group(1)!r}")
                elif parsed.group(1):
                    directive = "continue"
                else:
                    directive, reason = "skip", parsed.group(2).strip()
            code = "\n".join(line[len(match.group(1)):] for line in lines[start:end])
            blocks.append(Block(path, start + 1, code, directive, reason))
        i = end + 1
    return blocks, problems


def free_names(code: str) -> list[str]:
    """Names the code reads before (or without) binding them, in order of first use."""
    bound = set(dir(builtins))
    free: list[str] = []

    class Visitor(ast.NodeVisitor):
        # Visit in execution order: values before the targets they are bound to.
        def visit_Name(self, node):
            if isinstance(node.ctx, ast.Load):
                if node.id not in bound and node.id not in free:
                    free.append(node.id)
            else:
                bound.add(node.id)

        def visit_Assign(self, node):
            self.visit(node.value)
            for target in node.targets:
                self.visit(target)

        def visit_AugAssign(self, node):
            self.visit(node.value)
            if isinstance(node.target, ast.Name):
                self.visit_Name(ast.Name(node.target.id, ast.Load()))
            self.visit(node.target)

        def visit_NamedExpr(self, node):
            self.visit(node.value)
            self.visit(node.target)

        def visit_For(self, node):
            self.visit(node.iter)
            self.visit(node.target)
            for statement in node.body + node.orelse:
                self.visit(statement)

        def visit_With(self, node):
            for item in node.items:
                self.visit(item.context_expr)
                if item.optional_vars is not None:
                    self.visit(item.optional_vars)
            for statement in node.body:
                self.visit(statement)

        def visit_Import(self, node):
            for alias in node.names:
                bound.add((alias.asname or alias.name).split(".")[0])

        def visit_ImportFrom(self, node):
            for alias in node.names:
                bound.add(alias.asname or alias.name)

        def visit_FunctionDef(self, node):
            bound.add(node.name)
            for arg in node.args.args + node.args.kwonlyargs:
                bound.add(arg.arg)
            for statement in node.body:
                self.visit(statement)

        def _comprehension(self, node, *results):
            for generator in node.generators:
                self.visit(generator.iter)
                self.visit(generator.target)
                for condition in generator.ifs:
                    self.visit(condition)
            for result in results:
                self.visit(result)

        def visit_ListComp(self, node):
            self._comprehension(node, node.elt)

        visit_SetComp = visit_GeneratorExp = visit_ListComp

        def visit_DictComp(self, node):
            self._comprehension(node, node.key, node.value)

    Visitor().visit(ast.parse(code))
    return free


# What a reader brings to an example. Each builder takes the namespace (to reuse or supply what
# it depends on, through `need`) and returns the names it defines.
def _fresh_model():
    """A fresh copy of the same base model: tiny Llama, same weights every time."""
    return tiny_llama(seed=0)


def _samples(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (count, 12), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def _saved_model(ns: dict) -> dict:
    """The Hub name or path of the base model: the tiny Llama saved in the working directory."""
    path = Path("tiny-llama")
    if not path.is_dir():
        _fresh_model().save_pretrained(path)
    return {"model_id": str(path)}


def _training_run(ns: dict) -> dict:
    """A GARD run three optimizer steps in, profiled first as usage.md's first example does (the
    stand-in cfg has the static defaults: its one allocation is the profile's)."""
    model, cfg = need(ns, "model"), need(ns, "cfg")
    gard = gk.GARD(model, cfg)
    opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-3)
    gard.attach_optimizer(opt)
    if cfg.mode == "static":
        gard.profile(batches(cfg.window, seed=2))
    for batch in batches(3, seed=3):
        model(**batch).loss.backward()
        opt.step(), gard.step(), opt.zero_grad()
    return {"gard": gard, "opt": opt}


def _loss(ns: dict) -> dict:
    """A loss of the model inside a GARD run (the run first: GARD wraps the model)."""
    need(ns, "gard")
    return {"loss": ns["model"](**batches(1, seed=4)[0]).loss}


STAND_INS: dict[str, Callable[[dict], dict]] = {
    "model": lambda ns: {"model": _fresh_model()},
    "load_model": lambda ns: {"load_model": _fresh_model},
    "model_id": _saved_model,
    "load_base_model": lambda ns: {"load_base_model": _fresh_model},
    # 24 steps: the examples' interval=20 reaches their first re-allocation.
    "loader": lambda ns: {"loader": batches(24)},
    "batches": lambda ns: {"batches": batches(8)},
    # 4 batches of the Trainer's default 8: the callback profiles the default config on `window` (4) of them.
    "ds": lambda ns: {"ds": _samples(32)},
    "x": lambda ns: {"x": torch.randn(3, 5, 576)},
    "dy": lambda ns: {"dy": torch.randn(3, 5, 192)},
    "cfg": lambda ns: {"cfg": gk.GARDConfig(budget=57_600, target_modules=["q_proj", "v_proj"], window=2, interval=2)},
    "gard": _training_run,
    "opt": _training_run,
    "scaler": lambda ns: {"scaler": torch.amp.GradScaler("cpu")},
    "loss": _loss,
}


def need(ns: dict, name: str):
    """ns[name], supplied by its stand-in when the reader's code has not defined it."""
    if name not in ns:
        if name not in STAND_INS:
            raise NameError(f"no stand-in for {name!r}")
        for key, value in STAND_INS[name](ns).items():
            ns.setdefault(key, value)
    return ns[name]


# Keyed by (file name, a string the block contains); every hook must match a block, so a hook
# whose example changed fails instead of going stale.
@dataclass(frozen=True)
class Hook:
    file: str
    contains: str
    substitute: tuple[str, str] = ("", "")  # (old, new) in the code, with why in `why`
    before: Optional[Callable[[dict], None]] = None
    after: Optional[Callable[[dict], None]] = None
    why: str = ""


def _copy_checkpoint_elsewhere(ns: dict) -> None:
    saved = sorted(Path("out").glob("checkpoint-*"))
    assert saved, "the Trainer example saved no checkpoint"
    shutil.copytree(saved[-1], Path("elsewhere/checkpoint-800"))


def _check_trainer(ns: dict) -> None:
    gard = ns["callback"].gard
    assert gard is not None and gard.step_count == ns["trainer"].state.global_step > 0
    assert any("lora_params" in record for record in ns["trainer"].state.log_history)
    assert Path("out/adapter/adapter_config.json").is_file()


def _check_resume(ns: dict) -> None:
    assert ns["callback"].gard.step_count == ns["trainer"].state.global_step


def _check_loop(ns: dict) -> None:
    gard = ns["gard"]
    assert gard.step_count == 24 and any("reallocation" in record for record in gard.history)


def _check_sketch(ns: dict) -> None:
    # The comments: a [16, 16] float32 sketch, and out= adds into it.
    S, fresh = ns["S"], ns["sk"](ns["x"], ns["dy"])
    assert S.shape == (16, 16) and S.dtype == torch.float32
    torch.testing.assert_close(S, 2 * fresh)


def _check_peft_outputs(ns: dict) -> None:
    ids = batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        want = ns["model"](input_ids=ids).logits
        got = ns["peft_model"](input_ids=ids).logits
        merged = ns["merged"](input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5)
    assert "lora" not in " ".join(name for name, _ in ns["merged"].named_modules()).lower()


def _check_qlora(ns: dict) -> None:
    gard = ns["model"].model.layers[0].self_attn.q_proj
    assert type(gard.base).__name__ == "Linear4bit" and gard.rank > 0
    assert ns["callback"].gard.step_count > 0 and Path("out-qlora/adapter/adapter_config.json").is_file()


def _check_own_checkpoint(ns: dict) -> None:
    assert ns["gard"].manager.ranks == ns["state"]["gard"]["ranks"]
    assert ns["gard"].step_count == ns["state"]["gard"]["step_count"] > 0


HOOKS = [
    Hook("README.md", "print(gard.ranks, gard.num_lora_params", after=_check_loop),
    Hook("usage.md", "several backward passes per step are fine", after=_check_loop),
    Hook("README.md", "gk.GradientSketch", after=_check_sketch),
    Hook("integrations.md", "trainer.train()", substitute=("save_steps=500", "save_steps=2"), after=_check_trainer,
         why="the tiny run takes 3 optimizer steps; save a checkpoint for the resume example"),
    Hook("integrations.md", "/elsewhere/checkpoint-800",
         substitute=('"/elsewhere/checkpoint-800"', '"elsewhere/checkpoint-800"'),
         before=_copy_checkpoint_elsewhere, after=_check_resume,
         why="the test's temporary directory, not the file system root"),
    Hook("integrations.md", "PeftModel.from_pretrained", after=_check_peft_outputs),
    Hook("integrations.md", "run.pt", after=_check_own_checkpoint),
    Hook("integrations.md", "out-qlora/adapter", after=_check_qlora,
         substitute=("model = prepare_model_for_kbit_training(model)",
                     "model = prepare_model_for_kbit_training(model); "
                     "[setattr(m, 'support_avx512bf16_for_cpu', False) for m in model.modules()]"),
         why="bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit weight at its first forward in eval mode "
             "without grad (gora_safe's check), which fails for the stand-in's layers narrower than a "
             "quantisation block (32 < 64); real models' layers are wider, and a GPU never repacks"),
]


def _hooks_for(block: Block) -> list[Hook]:
    return [hook for hook in HOOKS if hook.file == block.path.name and hook.contains in block.code]


def run_block(block: Block, ns: dict) -> None:
    """Execute one block in ns, supplying stand-ins for the names it reads without defining."""
    hooks = _hooks_for(block)
    code = block.code
    for hook in hooks:
        old, new = hook.substitute
        if old:
            assert old in code, f"{block.where}: hook substitution {old!r} no longer matches ({hook.why})"
            code = code.replace(old, new)
    for name in free_names(code):
        if name not in ns and name not in STAND_INS:
            pytest.fail(
                f"{block.where}: the example reads {name!r}, which neither it nor the blocks it continues "
                f"define, and which is not something a reader brings (stand-ins: {sorted(STAND_INS)})"
            )
        need(ns, name)
    for hook in hooks:
        if hook.before:
            hook.before(ns)
    # Blank lines in front keep the doc's line numbers in tracebacks.
    exec(compile("\n" * (block.line - 1) + code, str(block.path), "exec"), ns)
    for hook in hooks:
        if hook.after:
            hook.after(ns)


def _all_blocks() -> list[Block]:
    return [block for path in DOC_FILES for block in extract_blocks(path)[0]]


# Raised inside transformers' Trainer and PEFT on a CPU-only machine, not by the examples.
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_examples_run(path, tmp_path, monkeypatch):
    """Every unmarked python block of the file runs, in order; `continue` blocks share a namespace."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocks, problems = extract_blocks(path)
    assert not problems, problems
    ns: Optional[dict] = None
    ran = 0
    for block in blocks:
        if block.directive == "skip":
            continue
        if block.directive == "continue":
            assert ns is not None, f"{block.where}: `continue` marker but no block runs before it"
        else:
            ns = {"__name__": "__doc_example__"}
        run_block(block, ns)
        ran += 1
    assert ran == sum(block.directive != "skip" for block in blocks)


def test_every_python_block_runs_or_says_why_not():
    """Few skips, each with a reason; the parser finds the examples (an empty find cannot pass)."""
    blocks = _all_blocks()
    skipped = [block for block in blocks if block.directive == "skip"]
    assert len(blocks) >= 10, [block.where for block in blocks]
    assert len(skipped) <= MAX_SKIPS, [f"{block.where}: {block.reason}" for block in skipped]
    assert all(len(block.reason) >= 20 for block in skipped), [block.reason for block in skipped]
    for hook in HOOKS:
        matched = [block for block in blocks if block.path.name == hook.file and hook.contains in block.code]
        assert len(matched) == 1, f"hook for {hook.file} / {hook.contains!r} matches {len(matched)} blocks"
        assert matched[0].directive != "skip"


def test_marker_parsing(tmp_path):
    """The extractor reads markers and languages as documented above (a broken parser fails here)."""
    text = "\n".join([
        "```python", "a = 1", "```",
        "<!-- doc-test: continue -->", "", "```python", "b = a", "```",
        "<!-- doc-test: skip (needs eight GPUs and torchrun) -->", "```python", "c", "```",
        "```", "plain", "```",
        "<!-- doc-test: maybe -->", "```py", "d", "```",
        "```bash", "make demo", "```",
    ])
    path = tmp_path / "probe.md"
    path.write_text(text, encoding="utf-8")
    blocks, problems = extract_blocks(path)
    assert [(b.line, b.code, b.directive) for b in blocks] == [
        (2, "a = 1", "run"), (7, "b = a", "continue"), (11, "c", "skip"), (18, "d", "run"),
    ]
    assert blocks[2].reason == "needs eight GPUs and torchrun"
    assert len(problems) == 2 and "without a language" in problems[0] and "maybe" in problems[1]


def test_free_names_follow_execution_order():
    code = "import torch as t\nx = t.zeros(n)\ny = [v for v in x if v > k]\nz = step\nstep = 1\nfor i in it: w = i\n"
    assert free_names(code) == ["n", "k", "step", "it"]


def _config_table_rows() -> dict[str, str]:
    """usage.md's configuration table: field name -> default cell."""
    text = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and line.lstrip().startswith("|"):
            for name in re.findall(r"`(\w+)`", cells[0]):
                rows[name] = cells[1]
    return rows


def test_usage_config_table_lists_every_field_with_its_default():
    rows = _config_table_rows()
    fields = {f.name: f for f in dataclasses.fields(gk.GARDConfig)}
    assert not set(fields) - set(rows), f"docs/usage.md's config table misses {sorted(set(fields) - set(rows))}"
    assert not set(rows) - set(fields), f"docs/usage.md's config table lists non-fields {sorted(set(rows) - set(fields))}"
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert rows[name] == "required", (name, rows[name])
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        literal = re.match(r"`([^`]+)`", rows[name])
        assert literal, f"default of {name} should start with a `python literal`, got {rows[name]!r}"
        assert ast.literal_eval(literal.group(1)) == default, (name, rows[name], default)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_all_ranks_at_zero_paragraph(mode):
    """docs/usage.md, "All ranks at 0": what it says happens, happens.

    Tiny Llama: q_proj costs 64, v_proj 48, two layers; Σ(d_in + d_out) = 224. Static mode
    profiles inside the loop here, with a layer score and B = 0 (the defaults, marginal gain and
    gora_safe, need profile()).
    """
    score = "update_nuclear" if mode == "static" else None
    config = dict(target_modules=["q_proj", "v_proj"], mode=mode, score=score, grow_init="zero", window=2, interval=4,
                  backend="torch")
    with pytest.raises(ValueError, match="at least 224"):
        gk.GARD(tiny_llama(), gk.GARDConfig(budget=150, r_min=1, **config))
    # 40 < 48, the cheapest layer's cost: no layer could ever hold rank 1.
    with pytest.raises(ValueError, match="no layer could ever train; raise the budget to at least 48"):
        gk.GARD(tiny_llama(), gk.GARDConfig(budget=40, **config))
    base = tiny_llama()
    steps = batches(8, seed=6)
    with torch.no_grad():
        base_losses = [base(**batch).loss.item() for batch in steps]
    for budget in (150,):
        model = tiny_llama()
        gard = gk.GARD(model, gk.GARDConfig(budget=budget, **config))
        opt = torch.optim.AdamW(gard.lora_parameters(), lr=1e-2)
        gard.attach_optimizer(opt)
        # The first re-allocation: the first multiple of interval from warmup on; static: window.
        first = 4 if mode == "dynamic" else 2
        for t, batch in enumerate(steps):
            zero = gard.num_lora_params == 0
            assert zero == (t < first)
            assert gard._capturing or not zero
            loss = model(**batch).loss
            if zero:  # trains nothing: the base model's loss
                assert loss.item() == pytest.approx(base_losses[t], abs=1e-6)
            loss.backward()
            opt.step(), gard.step(), opt.zero_grad()
        assert gard.num_lora_params > 0


def test_all_ranks_at_zero_paragraph_profile_allocates_before_the_first_step():
    """docs/usage.md, "All ranks at 0": with the static default, profile() gives the budget out
    before the first step, so no step is spent at rank 0."""
    gard = gk.GARD(tiny_llama(), gk.GARDConfig(budget=150, target_modules=["q_proj", "v_proj"], window=2, backend="torch"))
    assert gard.num_lora_params == 0 and gard.config.score == "marginal_gain"
    # grow_init="gora_safe" (the default) takes the optimizer's learning rate at the allocation.
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=1e-2))
    gard.profile(batches(2, seed=6))
    assert 0 < gard.num_lora_params <= 150 and gard.step_count == 0


def test_history_keys_are_documented():
    """Every key of a `gard.history` record appears in usage.md's "Reading `history`"."""
    text = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    section = text.split("## Reading `history`", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(\w+)`", section))
    config = dict(budget=57_600, target_modules=["q_proj", "v_proj"], window=2, interval=2, backend="torch")
    model = tiny_llama()
    gard = gk.GARD(model, gk.GARDConfig(**config, mode="dynamic"))
    gard.attach_optimizer(torch.optim.AdamW(gard.lora_parameters(), lr=1e-3))
    for batch in batches(2, seed=7):
        model(**batch).loss.backward()
        gard.optimizer.step(), gard.step(), gard.optimizer.zero_grad()
    static = gk.GARD(tiny_llama(), gk.GARDConfig(mode="static", **config))
    static.attach_optimizer(torch.optim.AdamW(static.lora_parameters(), lr=1e-3))
    static.profile(batches(2, seed=8))
    records = gard.history + static.history
    keys = {key for record in records for key in record}
    keys |= {key for record in records if "reallocation" in record for key in record["reallocation"]}
    assert any("reallocation" in record for record in gard.history)
    assert keys <= documented, f"history keys missing from docs/usage.md: {sorted(keys - documented)}"


SHELL_LANGS = {"bash", "sh", "shell", "console"}


def shell_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(where, argv) of each command in the file's shell blocks and 4-space indented code."""
    import shlex

    commands, lang, pending, start = [], None, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fence = _FENCE.match(line)
        if fence:
            lang = None if lang is not None else fence.group(2).strip().lower()
            continue
        in_shell = lang in SHELL_LANGS
        indented = lang is None and line.startswith("    ") and line.strip().split(" ", 1)[0] in {"make", "gard"}
        if not (in_shell or indented or pending):
            continue
        start = start if pending else number
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        argv = shlex.split(pending, comments=True)
        if argv:
            commands.append((f"{_shown(path)}:{start}", argv))
        pending = ""
    return commands


def test_documented_commands_exist():
    """Every `make` target and `gard` command line in the docs parses, with known method names
    (a shell loop's `$var` checked at each of the loop's words)."""
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    checked = 0
    for path in DOC_FILES:
        loops = {}  # shell loop variable -> the words it runs over (`for m in a b c; do`)
        for where, argv in shell_commands(path):
            if argv[0] == "for" and len(argv) > 3 and argv[2] == "in":
                words = []
                for word in argv[3:]:
                    if word.rstrip(";") and word != "do":
                        words.append(word.rstrip(";"))
                    if word.endswith(";") or word == "do":
                        break
                loops[argv[1]] = words
                continue
            loop = next((arg[1:] for arg in argv if arg.startswith("$") and arg[1:] in loops), None)
            for value in loops[loop] if loop else [None]:
                checked += _check_command(where, [value if arg == f"${loop}" else arg for arg in argv], targets)
    assert checked >= 6, checked


def _check_command(where: str, argv: list[str], targets: set[str]) -> int:
    """Check one documented `make` or `gard` command line; 1 if it was one, else 0."""
    from gard_kernels.cli import build_parser
    from gard_kernels.experiments.presets import is_method

    if argv[0] == "make":
        assert set(argv[1:]) <= targets, f"{where}: no Makefile target {argv[1:]}"
    elif argv[0] == "gard":
        args = build_parser().parse_args(argv[1:])
        methods = [getattr(args, "method", None), *(getattr(args, "methods", None) or [])]
        unknown = {m for m in methods if m and not is_method(m)}
        assert not unknown, f"{where}: unknown methods {sorted(unknown)}"
    else:
        return 0
    return 1
