"""Data for ``examples/lora_sft.py``: tokenizers, real and synthetic corpora, and deterministic per-step batches.

Every source becomes a list of :class:`Example` (token ids plus a loss mask: 1 where the token is a target). The
batch of a training step is a pure function of ``(seed, step)``, so a job resumed from a checkpoint sees exactly
the batches it would have seen, and each host of a multi-host job builds only the rows its devices hold.

Sources (``--data``):

- ``synthetic``: arithmetic sequences ``(start + i·stride) mod V``, stride 1–3; the stride is visible from two
  tokens, so a model that attends can predict everything after them. No files, any vocabulary.
- ``chatterbot`` or ``chatterbot:trivia,ai,...``: the question→answer pairs of the ``chatterbot-corpus`` package
  (``pip install --no-deps chatterbot-corpus==1.3.3``; 2,306 English pairs in 21 topic files), formatted with the
  tokenizer's chat template; the loss covers the answer and its end-of-turn token only.
- ``*.jsonl``: one object a line, ``{"prompt": ..., "completion": ...}`` (loss on the completion) or
  ``{"text": ...}`` (loss on everything).
- ``*.txt``: plain text cut into windows of the sequence length (loss on everything).

Several adapters in one run (``--adapters NAME=DATA,...``) name one source each; :func:`data_source` turns an
entry's DATA into a source (a bare chatterbot topic such as ``ai`` is ``chatterbot:ai``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class TextTokenizer(Protocol):
    """What the examples need of a tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        ...

    def chat_prompt(self, question: str) -> str:
        """The prompt that asks ``question`` and opens the answer."""
        ...

    def end_of_turn(self) -> list[int]:
        """Ids that close an answer."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0–255, then ``<eos>`` (256) and ``<pad>`` (257): for models trained from scratch."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes below 256 decoded as UTF-8 (invalid sequences replaced); special tokens dropped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def chat_prompt(self, question: str) -> str:
        """``"Q: {question}\\nA: "``."""
        return f"Q: {question}\nA: "

    def end_of_turn(self) -> list[int]:
        """``[eos]``."""
        return [self.eos_id]


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with a ChatML template (``<|im_start|>role\\n...<|im_end|>``, SmolLM2's).

    Args:
        tokenizer: the ``tokenizers.Tokenizer``.
        eos_id: the end-of-turn id (``<|im_end|>`` for SmolLM2).
        pad_id: the id used for padding (masked out of the loss).
        system: the system message of the template, or None for none.
    """

    def __init__(self, tokenizer: Any, eos_id: int, pad_id: int, system: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.system = system

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``<|im_start|>``) become their ids."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens removed."""
        return str(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True))

    def chat_prompt(self, question: str) -> str:
        """The ChatML prompt of one user turn, ending where the assistant's answer starts."""
        system = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system else ""
        return f"{system}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"

    def end_of_turn(self) -> list[int]:
        """``<|im_end|>``."""
        return [self.eos_id]


@dataclasses.dataclass(frozen=True)
class Example:
    """One training row: ``ids`` (int32) and ``mask`` (1 where ``ids[i]`` is a prediction target)."""

    ids: np.ndarray
    mask: np.ndarray
    prompt: str = ""
    answer: str = ""


def pair_example(tok: TextTokenizer, question: str, answer: str) -> Example:
    """The chat-formatted row of one question→answer pair; the loss covers the answer and end of turn."""
    prompt = tok.encode(tok.chat_prompt(question))
    target = tok.encode(answer) + tok.end_of_turn()
    ids = np.asarray(prompt + target, np.int32)
    mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(target), np.int32)])
    return Example(ids, mask, question, answer)


def text_example(tok: TextTokenizer, text: str) -> Example:
    """A row whose every token is a target."""
    ids = np.asarray(tok.encode(text), np.int32)
    return Example(ids, np.ones(len(ids), np.int32))


CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3 && pip install pyyaml"


def chatterbot_dir() -> str:
    """The English YAML directory of the installed ``chatterbot-corpus`` (found without importing it)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the chatterbot-corpus package is not installed; install it with: {CHATTERBOT_INSTALL}"
        )
    return os.path.join(spec.submodule_search_locations[0], "data", "english")


def chatterbot_pairs(topics: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The question→answer pairs of the English chatterbot corpus (turns 0→1, 2→3, ... of each conversation).

    Args:
        topics: file stems such as ``("trivia", "ai")``; empty for all 21.

    Raises:
        FileNotFoundError: the package is not installed (names the install command).
        ValueError: an unknown topic (lists the known ones).
    """
    try:
        import yaml
    except ImportError as err:
        raise ImportError(f"{err}: reading chatterbot-corpus needs PyYAML: {CHATTERBOT_INSTALL}") from None
    directory = chatterbot_dir()
    known = sorted(f[:-4] for f in os.listdir(directory) if f.endswith(".yml"))
    unknown = sorted(set(topics) - set(known))
    if unknown:
        raise ValueError(f"unknown chatterbot topic(s) {unknown}; known: {', '.join(known)}")
    pairs = []
    for topic in topics or known:
        with open(os.path.join(directory, f"{topic}.yml"), encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        for turns in doc.get("conversations", []):
            if not isinstance(turns, list):  # one malformed entry in trivia.yml is a bare string
                continue
            texts = [str(t).strip() for t in turns]
            # Turns alternate user, bot, user, bot...: pair each user turn with the reply that follows it.
            pairs.extend((q, a) for q, a in zip(texts[0::2], texts[1::2], strict=False) if q and a)
    return pairs


def chatterbot_topics() -> list[str]:
    """The topic names of the installed English chatterbot corpus (its file stems: ``ai``, ``food``, ...).

    Raises:
        FileNotFoundError: the package is not installed (names the install command).
    """
    return sorted(f[:-4] for f in os.listdir(chatterbot_dir()) if f.endswith(".yml"))


DATA_FORMS = (
    "a chatterbot topic (e.g. ai; ai+food for several), chatterbot[:topic+...], synthetic, or an existing .jsonl "
    "or .txt file"
)


def data_source(spec: str) -> str:
    """The ``--data`` value that one ``NAME=DATA`` entry of ``--adapters`` names: ``synthetic``, a file, or
    ``chatterbot[:topic,...]``. A bare topic is the chatterbot corpus's category of that name (``ai`` →
    ``chatterbot:ai``); topics are joined with ``+`` (``ai+food``, ``chatterbot:ai+food``), since ``,`` separates
    the entries of ``--adapters``.

    Raises:
        ValueError: a file that does not exist, or a name that is none of the forms (listing the installed
            chatterbot topics, or how to install them).
    """
    if spec == "synthetic":
        return spec
    if spec.endswith((".jsonl", ".txt")):
        if not os.path.isfile(spec):
            raise ValueError(f"{spec!r} is not a file; expected an existing .jsonl or .txt file")
        return spec
    if spec == "chatterbot":
        return spec
    topics = (spec.partition(":")[2] if spec.startswith("chatterbot:") else spec).split("+")
    try:
        known = chatterbot_topics()
    except FileNotFoundError as err:
        raise ValueError(
            f"{spec!r} is not synthetic or a .jsonl/.txt file, and chatterbot topics need: {err}"
        ) from None
    unknown = [t for t in topics if t not in known]
    if unknown:
        raise ValueError(
            f"{spec!r} names no data: {', '.join(map(repr, unknown))} is not a chatterbot topic; expected "
            f"{DATA_FORMS}. Known topics: {', '.join(known)}"
        )
    return "chatterbot:" + ",".join(topics)


def synthetic_examples(n: int, seq_len: int, vocab: int, seed: int) -> list[Example]:
    """``n`` arithmetic sequences mod ``vocab`` of ``seq_len + 1`` tokens; the first two tokens are not targets."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab, n)
    stride = rng.integers(1, min(vocab, 4), n)
    ids = (start[:, None] + stride[:, None] * np.arange(seq_len + 1)[None]) % vocab
    mask = np.ones(seq_len + 1, np.int32)
    mask[:2] = 0
    return [Example(row.astype(np.int32), mask.copy()) for row in ids]


JSONL_SHAPES = '{"prompt": "...", "completion": "..."} (loss on the completion) or {"text": "..."} (loss on all)'


def file_examples(path: str, tok: TextTokenizer, seq_len: int) -> list[Example]:
    """Rows of a ``.jsonl`` (prompt/completion or text objects) or ``.txt`` (windows of ``seq_len + 1``) file.

    Raises:
        ValueError: a line that is not UTF-8, not JSON, not an object of one of the two shapes, or with a value
            that is not a string (the message names ``path:line``, the problem and the accepted shapes); a file
            that is neither ``.jsonl`` nor ``.txt``.
    """
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            return [jsonl_example(tok, path, number, raw) for number, raw in enumerate(f, 1) if raw.strip()]
    if path.endswith(".txt"):
        with open(path, "rb") as f:
            ids = np.asarray(tok.encode(decoded(path, None, f.read())), np.int32)
        window = seq_len + 1
        return [
            Example(ids[i : i + window], np.ones(window, np.int32)) for i in range(0, len(ids) - window + 1, window)
        ]
    raise ValueError(f"--data {path!r}: expected 'synthetic', 'chatterbot[:topics]', a .jsonl or a .txt file")


def decoded(path: str, number: int | None, raw: bytes) -> str:
    """``raw`` as UTF-8 text (a byte-order mark dropped); a ValueError naming ``path`` (and line) otherwise."""
    try:
        return raw.decode("utf-8-sig" if number in (None, 1) else "utf-8")
    except UnicodeDecodeError as err:
        where = f"{path}:{number}" if number is not None else path
        raise ValueError(
            f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save the file as UTF-8"
        ) from None


def jsonl_example(tok: TextTokenizer, path: str, number: int, raw: bytes) -> Example:
    """The row of line ``number`` (1-based) of a ``.jsonl`` file; a ValueError naming ``path:number`` otherwise."""
    where = f"{path}:{number}"
    try:
        row = json.loads(decoded(path, number, raw))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where}: not valid JSON ({err.msg} at column {err.colno}); expected one JSON object a line: "
            f"{JSONL_SHAPES}"
        ) from None
    if not isinstance(row, dict):
        raise ValueError(
            f"{where}: expected a JSON object with the keys 'prompt' and 'completion', or 'text'; got a JSON "
            f"{json_type(row)}. Each line holds one of: {JSONL_SHAPES}"
        )
    pair = [k for k in ("prompt", "completion") if k in row]
    if pair and "text" in row:
        raise ValueError(
            f"{where}: holds both {' and '.join(map(repr, pair))} and 'text'; expected one of: {JSONL_SHAPES}"
        )
    if pair != ["prompt", "completion"] and "text" not in row:
        raise ValueError(
            f"{where}: expected an object with 'prompt' and 'completion', or 'text'; got keys {sorted(row)}. Each "
            f"line holds one of: {JSONL_SHAPES}"
        )
    for key in pair or ["text"]:
        if not isinstance(row[key], str):
            raise ValueError(
                f"{where}: {key!r} is a JSON {json_type(row[key])} ({clipped(row[key])}); expected a string. Quote "
                "it, or drop the line"
            )
    if pair:
        return pair_example(tok, row["prompt"], row["completion"])
    return text_example(tok, row["text"])


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: ``"null"``, ``"number"``, ``"array"``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else "array" if isinstance(value, list) else "object"


def clipped(value: Any, width: int = 40) -> str:
    """``value`` as JSON, cut to ``width`` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def split(examples: Sequence[Example], eval_every: int = 10) -> tuple[list[Example], list[Example]]:
    """A fixed split: every ``eval_every``-th row is held out for evaluation."""
    train = [e for i, e in enumerate(examples) if i % eval_every != eval_every - 1]
    held = [e for i, e in enumerate(examples) if i % eval_every == eval_every - 1]
    return train, held


def pack_rows(rows: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """``inputs``/``targets``/``mask`` arrays ``[len(rows), seq_len]`` (right-padded, truncated; shifted by one)."""
    n = len(rows)
    inputs = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i, row in enumerate(rows):
        ids, m = row.ids[: seq_len + 1], row.mask[: seq_len + 1]
        k = len(ids) - 1
        if k <= 0:
            continue
        inputs[i, :k] = ids[:-1]
        targets[i, :k] = ids[1:]
        mask[i, :k] = m[1:]
    return {"inputs": inputs, "targets": targets, "mask": mask}


def step_rows(n: int, step: int, batch: int, seed: int, rows: slice | None = None) -> np.ndarray:
    """Indices into a dataset of ``n`` rows for the global batch of ``step`` (rows ``rows`` of it only).

    Epoch ``e`` visits the rows in the order of a permutation seeded by ``(seed, e)``, so the batch of a step
    depends on nothing but its arguments.
    """
    positions = np.arange(step * batch, (step + 1) * batch)[rows if rows is not None else slice(None)]
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(positions // n):
        order = np.random.default_rng([seed, int(epoch)]).permutation(n)
        here = positions // n == epoch
        out[here] = order[positions[here] % n]
    return out
