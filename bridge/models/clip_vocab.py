"""The CLIP byte-pair vocabulary, written as tokenizer files for synthetic models.

Stable Diffusion's tokenizer is OpenAI's CLIP BPE: every byte gets a printable stand-in character,
a word is split into those characters with ``</w>`` marking its last one, and learned merges join
neighbours into longer tokens. The vocabulary is, in order: the 256 byte characters, the same 256
with ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``, 49408 in all.

The merges ship as ``bpe_simple_vocab_16e6.txt.gz`` inside the ``open_clip_torch`` wheel. When that
file is installed the full vocabulary is built from it; otherwise the vocabulary has no merges
(514 tokens). Both are real CLIP tokenization, read by ``transformers.CLIPTokenizer``; without
merges every word is spelled out byte by byte.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
# The merges CLIP keeps: its vocabulary size less the byte tokens (with and without "</w>")
# and the two special tokens.
CLIP_MERGE_COUNT = CLIP_VOCAB_SIZE - 2 * 256 - 2
OPEN_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def byte_characters() -> list[str]:
    """The printable character that stands for each byte value 0..255, in byte order.

    Bytes that are already visible Latin-1 characters stand for themselves; the others (control
    characters, space, a few gaps) are given code points from 256 upwards, in byte order, so no
    token ever contains whitespace or a control character.
    """
    visible = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    characters = []
    next_free = 256
    for byte in range(256):
        if byte in visible:
            characters.append(chr(byte))
        else:
            characters.append(chr(next_free))
            next_free += 1
    return characters


def find_open_clip_bpe() -> Path | None:
    """Path of open_clip's BPE merges file if the package is installed, else None.

    The package is located without importing it: importing open_clip pulls in torchvision.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.submodule_search_locations is None:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / OPEN_CLIP_BPE_FILE
        if candidate.is_file():
            return candidate
    return None


def read_merges(bpe_file: Path) -> list[tuple[str, str]]:
    """The first ``CLIP_MERGE_COUNT`` merges of a gzipped CLIP BPE file, after its header line."""
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").rstrip("\n").split("\n")
    merges = []
    for line in lines[1 : 1 + CLIP_MERGE_COUNT]:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"Line {line!r} of {bpe_file} is not a merge of two symbols; "
                f"pass an unmodified {OPEN_CLIP_BPE_FILE}."
            )
        merges.append((parts[0], parts[1]))
    return merges


def clip_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token-to-id table in CLIP's order: bytes, bytes with ``</w>``, merges, special tokens."""
    # CLIP lists the visible bytes first and the stand-ins after them; both groups keep byte
    # order, and every stand-in's code point is above every visible one, so sorting by code
    # point gives exactly that order.
    characters = sorted(byte_characters())
    tokens = characters + [character + "</w>" for character in characters]
    tokens += [first + second for first, second in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_clip_tokenizer(folder: Path, bpe_file: Path | None) -> dict[str, int]:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` for a CLIPTokenizer.

    ``bpe_file`` is open_clip's merges file (see :func:`find_open_clip_bpe`); None writes the
    vocabulary without merges. Returns the vocabulary, so callers can size the text encoder and
    read the special token ids.
    """
    merges = read_merges(bpe_file) if bpe_file is not None else []
    vocabulary = clip_vocabulary(merges)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocabulary, ensure_ascii=False), encoding="utf-8")
    merge_lines = [f"{first} {second}" for first, second in merges]
    (folder / "merges.txt").write_text(
        "\n".join(["#version: 0.2", *merge_lines]) + "\n", encoding="utf-8"
    )
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2), encoding="utf-8"
    )
    return vocabulary
