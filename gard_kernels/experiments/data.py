"""Corpora shipped with Python, a deterministic topic split, and packing into token blocks.

A corpus is a list of (topic, text) documents. Topics are split three ways, train / validation
/ test, by a seeded hash of their names, so no topic is on two sides and the split does not
depend on the order in which documents were read. Every choice (learning rate, score, knobs) is
made on validation; test is reported. Train documents are concatenated (EOS between documents)
and cut into blocks of `max_len` tokens; validation and test blocks are cut per topic, so their
perplexity can be broken down by topic.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

CORPORA = ("pydoc-topics", "stdlib-source")

# A fixed list, so the stdlib-source corpus is the same set of modules on every machine running
# a given Python version; modules missing from a Python build are skipped (and logged).
STDLIB_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "difflib", "enum", "fractions", "functools", "gettext", "glob",
    "gzip", "heapq", "hmac", "inspect", "ipaddress", "json.decoder", "json.encoder",
    "mimetypes", "numbers", "operator", "optparse", "pprint", "queue", "random", "sched",
    "secrets", "shlex", "shutil", "statistics", "string", "tempfile", "textwrap", "threading",
    "tokenize", "traceback", "typing", "uuid", "warnings", "weakref", "zipfile",
)

# Paragraphs of a --text-file are grouped into chunks of at least this many characters; each
# chunk is one "topic" of the split.
TEXT_CHUNK_CHARS = 4000


class ByteTokenizer:
    """Tokenizer-free path for tests: token = UTF-8 byte modulo the vocabulary, EOS = vocab - 1.

    Args:
        vocab_size: size of the model's vocabulary (>= 2).
    """

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_id = vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return [b % (self.vocab_size - 1) for b in text.encode("utf-8")]


@dataclass
class LMData:
    """Packed language-modelling data.

    Attributes:
        corpus: corpus name ("pydoc-topics", "stdlib-source" or "text:<path>").
        train_topics, val_topics, test_topics: sorted topic names; pairwise disjoint.
        train_blocks: [N, max_len] int64 token blocks.
        val_blocks, test_blocks: (topic, [T_i] int64) pairs, T_i <= max_len, grouped by topic.
        max_len: block length.
        stats: token counts and the split seed, for metrics.json.
    """

    corpus: str
    train_topics: list[str]
    val_topics: list[str]
    train_blocks: torch.Tensor
    val_blocks: list[tuple[str, torch.Tensor]]
    max_len: int
    stats: dict = field(default_factory=dict)
    test_topics: list[str] = field(default_factory=list)
    test_blocks: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def eval_subset(self, max_blocks: Optional[int], split: str = "val") -> list[tuple[str, torch.Tensor]]:
        """At most `max_blocks` blocks of `split` ("val" or "test"), round-robin over topics
        (all when None).

        Round-robin keeps every topic represented when the subset is small; the choice is
        deterministic (the i-th block of each topic, in topic order, for i = 0, 1, ...).
        """
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        blocks = self.val_blocks if split == "val" else self.test_blocks
        if max_blocks is None or max_blocks >= len(blocks):
            return list(blocks)
        by_topic: dict[str, list[torch.Tensor]] = {}
        for topic, block in blocks:
            by_topic.setdefault(topic, []).append(block)
        chosen: list[tuple[str, torch.Tensor]] = []
        depth = 0
        while len(chosen) < max_blocks:
            for topic in sorted(by_topic):
                if depth < len(by_topic[topic]) and len(chosen) < max_blocks:
                    chosen.append((topic, by_topic[topic][depth]))
            depth += 1
        return chosen


def load_corpus(name: str, text_file: Optional[str] = None) -> list[tuple[str, str]]:
    """(topic, text) documents of a named corpus, or of a UTF-8 text file when given.

    Args:
        name: "pydoc-topics" (the help topics of pydoc_data.topics) or "stdlib-source" (source
            of the modules in STDLIB_MODULES, one module per topic). Ignored with text_file.
        text_file: path of a UTF-8 text; split into paragraphs (blank lines), grouped into
            chunks of >= TEXT_CHUNK_CHARS characters, one chunk per topic.
    """
    if text_file is not None:
        return _text_file_documents(Path(text_file))
    if name == "pydoc-topics":
        from pydoc_data.topics import topics

        return [(topic, topics[topic]) for topic in sorted(topics) if topics[topic].strip()]
    if name == "stdlib-source":
        docs = []
        for module in STDLIB_MODULES:
            spec = importlib.util.find_spec(module)
            origin = getattr(spec, "origin", None) if spec is not None else None
            if origin and origin.endswith(".py") and Path(origin).is_file():
                docs.append((module, Path(origin).read_text(encoding="utf-8")))
        if len(docs) < 2:
            raise ValueError("stdlib-source: fewer than 2 of the listed standard-library modules have .py source here")
        return docs
    raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA} or pass --text-file")


def _text_file_documents(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise ValueError(f"--text-file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--text-file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph)
        if size >= TEXT_CHUNK_CHARS:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    if len(chunks) < 3:
        # Too short for three chunks of TEXT_CHUNK_CHARS (train / validation / test): split the
        # paragraphs in thirds instead.
        if len(paragraphs) < 3:
            raise ValueError(f"--text-file {str(path)!r} needs at least three paragraphs (separated by blank lines)")
        third = len(paragraphs) // 3
        cuts = [0, third, 2 * third, len(paragraphs)]
        chunks = ["\n\n".join(paragraphs[a:b]) for a, b in zip(cuts, cuts[1:])]
    width = len(str(len(chunks)))
    return [(f"chunk-{i:0{width}d}", chunk) for i, chunk in enumerate(chunks)]


def split_topics(
    topics: Sequence[str], val_fraction: float = 0.2, seed: int = 0, test_fraction: float = 0.2
) -> tuple[list[str], list[str], list[str]]:
    """Deterministic train / validation / test split of topic names; pairwise disjoint.

    Topics are ordered by SHA-1 of f"{seed}:{topic}"; the first ceil(val_fraction * n) go to
    validation, the next ceil(test_fraction * n) to test, the rest to train. Train and
    validation are never empty; test is empty only with test_fraction = 0. Python's hash() is
    salted per process, so it is not used.

    Returns:
        (train_topics, val_topics, test_topics), each sorted.
    """
    names = sorted(set(topics))
    need = 2 if test_fraction == 0 else 3
    if len(names) < need:
        raise ValueError(f"a train / validation{' / test' if need == 3 else ''} split needs at least {need} topics, got {len(names)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1 - val_fraction), got {test_fraction}")
    ranked = sorted(names, key=lambda t: hashlib.sha1(f"{seed}:{t}".encode("utf-8")).hexdigest())
    n_val = min(len(names) - need + 1, max(1, math.ceil(val_fraction * len(names))))
    n_test = 0 if test_fraction == 0 else min(len(names) - n_val - 1, max(1, math.ceil(test_fraction * len(names))))
    return sorted(ranked[n_val + n_test:]), sorted(ranked[:n_val]), sorted(ranked[n_val : n_val + n_test])


def build_data(
    documents: Sequence[tuple[str, str]],
    encode: Callable[[str], list[int]],
    eos_token_id: int,
    max_len: int,
    corpus: str,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    progress: bool = False,
    test_fraction: float = 0.2,
) -> LMData:
    """Tokenise, split by topic (train / validation / test) and pack.

    Args:
        documents: (topic, text) pairs; topics must be unique.
        encode: text -> token ids (no special tokens).
        eos_token_id: appended after every document.
        max_len: block length (>= 2).
        corpus: name recorded in the result.
        val_fraction: fraction of topics in validation.
        split_seed: seed of the topic split (fixed across runs, unlike the training seed).
        progress: tqdm bar over documents.
        test_fraction: fraction of topics in test (0: no test split).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    names = [topic for topic, _ in documents]
    if len(set(names)) != len(names):
        raise ValueError("documents must have unique topic names")
    train_topics, val_topics, test_topics = split_topics(names, val_fraction, split_seed, test_fraction)
    held_out = {**{t: "val" for t in val_topics}, **{t: "test" for t in test_topics}}
    train_stream, blocks, tokens = _tokenise(documents, encode, eos_token_id, held_out, max_len, progress)
    n_train = len(train_stream) // max_len
    if n_train == 0:
        raise ValueError(
            f"the training topics hold {len(train_stream)} tokens, fewer than one block of max_len={max_len}; "
            "lower --max-len or give more text"
        )
    if not blocks["val"]:
        raise ValueError("the validation topics hold no block of >= 2 tokens; give more text")
    if test_topics and not blocks["test"]:
        raise ValueError("the test topics hold no block of >= 2 tokens; give more text")
    train_blocks = torch.tensor(train_stream[: n_train * max_len], dtype=torch.long).view(n_train, max_len)
    stats = {
        "topics": len(names),
        "train_topics": len(train_topics),
        "val_topics": len(val_topics),
        "test_topics": len(test_topics),
        "train_tokens": len(train_stream),
        "val_tokens": tokens["val"],
        "test_tokens": tokens["test"],
        "train_blocks": n_train,
        "val_blocks": len(blocks["val"]),
        "test_blocks": len(blocks["test"]),
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
    }
    return LMData(corpus, train_topics, val_topics, train_blocks, blocks["val"], max_len, stats, test_topics, blocks["test"])


def _tokenise(
    documents: Sequence[tuple[str, str]], encode: Callable[[str], list[int]], eos_token_id: int,
    held_out: dict[str, str], max_len: int, progress: bool,
) -> tuple[list[int], dict[str, list[tuple[str, torch.Tensor]]], dict[str, int]]:
    """(one token stream of the training topics, (topic, block) per held-out split, tokens per
    held-out split); `held_out` maps a topic to "val" or "test"."""
    from tqdm.auto import tqdm

    train_stream: list[int] = []
    blocks: dict[str, list[tuple[str, torch.Tensor]]] = {"val": [], "test": []}
    tokens = {"val": 0, "test": 0}
    for topic, text in tqdm(sorted(documents), desc="tokenising", unit="topic", disable=not progress):
        ids = list(encode(text)) + [eos_token_id]
        split = held_out.get(topic)
        if split is None:
            train_stream.extend(ids)
            continue
        tokens[split] += len(ids)
        # Full blocks, plus the tail when it is long enough to score (>= max_len / 4 tokens).
        for start in range(0, len(ids), max_len):
            piece = ids[start : start + max_len]
            if len(piece) == max_len or len(piece) >= max(2, max_len // 4) or start == 0:
                if len(piece) >= 2:
                    blocks[split].append((topic, torch.tensor(piece, dtype=torch.long)))
    return train_stream, blocks, tokens


def train_batches(data: LMData, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The [batch_size, max_len] batches of one run: a seeded permutation of the train blocks,
    renewed each epoch. Every method of the same seed sees the same batches in the same order."""
    generator = torch.Generator().manual_seed(seed)
    n = data.train_blocks.shape[0]
    batches = []
    order = torch.empty(0, dtype=torch.long)
    position = 0
    for _ in range(steps):
        picked = []
        while len(picked) < batch_size:
            if position >= order.numel():
                order = torch.randperm(n, generator=generator)
                position = 0
            take = min(batch_size - len(picked), order.numel() - position)
            picked.extend(order[position : position + take].tolist())
            position += take
        batches.append(data.train_blocks[picked])
    return batches
