"""The CLIP vocabulary written for synthetic models is real CLIP tokenization."""

from __future__ import annotations

import gzip

import pytest
from transformers import CLIPTextModel, CLIPTokenizer

from bridge.models.clip_vocab import (
    BOS_TOKEN,
    CLIP_VOCAB_SIZE,
    EOS_TOKEN,
    byte_characters,
    find_open_clip_bpe,
    write_clip_tokenizer,
)


def test_every_byte_gets_a_distinct_printable_character():
    characters = byte_characters()
    assert len(set(characters)) == 256
    assert all(character.isprintable() and not character.isspace() for character in characters)
    assert characters[ord("a")] == "a"


def test_byte_tokens_keep_clips_ids(tmp_path):
    # "a" is token 320 and "photo" would be 1125 in Stable Diffusion's tokenizer; the byte
    # tokens come first in CLIP's vocabulary, so their ids are the same without merges.
    vocabulary = write_clip_tokenizer(tmp_path, None)
    assert vocabulary["a</w>"] == 320
    assert vocabulary["!"] == 0
    assert len(vocabulary) == 2 * 256 + 2
    assert (vocabulary[BOS_TOKEN], vocabulary[EOS_TOKEN]) == (512, 513)


def test_merges_from_a_bpe_file_join_symbols_into_one_token(tmp_path):
    bpe = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    bpe.write_bytes(gzip.compress(b"header line\nc a\nca t</w>\n"))
    vocabulary = write_clip_tokenizer(tmp_path / "tokenizer", bpe)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")

    ids = tokenizer("a cat").input_ids

    assert ids == [
        vocabulary[BOS_TOKEN],
        vocabulary["a</w>"],
        vocabulary["cat</w>"],
        vocabulary[EOS_TOKEN],
    ]
    assert vocabulary["cat</w>"] == 513
    assert len(tokenizer) == 2 * 256 + 2 + 2


def test_a_malformed_bpe_file_is_refused_by_name(tmp_path):
    bpe = tmp_path / "broken.txt.gz"
    bpe.write_bytes(gzip.compress(b"header\nnot a merge\n"))
    with pytest.raises(ValueError, match="broken.txt.gz"):
        write_clip_tokenizer(tmp_path / "tokenizer", bpe)


@pytest.fixture(scope="module")
def tokenizer_and_encoder(tiny_folder):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_folder / "text_encoder")
    return tokenizer, text_encoder


def test_synthetic_tokenizer_gives_different_prompts_different_ids(tokenizer_and_encoder):
    tokenizer, _ = tokenizer_and_encoder
    fox = tokenizer("a red fox in the snow").input_ids
    city = tokenizer("a neon city at night").input_ids
    assert fox != city
    assert tokenizer.decode(fox, skip_special_tokens=True) == "a red fox in the snow"


def test_synthetic_tokenizer_pads_to_77_with_bos_and_eos(tokenizer_and_encoder):
    tokenizer, text_encoder = tokenizer_and_encoder
    config = text_encoder.config
    ids = tokenizer(
        "a fox", padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids

    assert tokenizer.model_max_length == 77
    assert len(ids) == 77
    assert ids[0] == config.bos_token_id == tokenizer.bos_token_id
    assert ids[-1] == config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id == config.pad_token_id
    assert max(tokenizer.get_vocab().values()) < config.vocab_size == CLIP_VOCAB_SIZE


def test_synthetic_tokenizer_truncates_long_prompts_to_77(tokenizer_and_encoder):
    tokenizer, _ = tokenizer_and_encoder
    ids = tokenizer("fox " * 200, max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[-1] == tokenizer.eos_token_id


def test_synthetic_tokenizer_uses_full_vocabulary_when_open_clip_is_installed(
    tokenizer_and_encoder,
):
    tokenizer, _ = tokenizer_and_encoder
    expected = CLIP_VOCAB_SIZE if find_open_clip_bpe() is not None else 2 * 256 + 2
    assert len(tokenizer) == expected
