"""Offline tokenizers: a byte-level CLIP tokenizer and a character-level T5 tokenizer.

Tiny and randomly initialised models need a tokenizer but no real vocabulary: this module builds them entirely in
code, without files or network access.

* CLIP (:func:`byte_level_clip_tokenizer`): the two CLIP special tokens, the 256 byte-level characters of GPT-2's
  ``bytes_to_unicode`` mapping and their end-of-word (``</w>``) forms, and no merges, so every word is tokenised
  byte by byte (514 ids in all). transformers 5 ignores the older ``vocab_file=`` / ``merges_file=`` arguments
  (everything becomes unknown), so the vocabulary and merges are passed in memory, together with an explicit
  ``model_max_length``.
* T5 (:func:`char_level_t5_tokenizer`, FLUX's second text encoder): a SentencePiece-style unigram vocabulary of
  the printable characters, each alone and with the word-start marker ``▁``, passed in memory as
  ``(piece, score)`` pairs with ``extra_ids=0`` (:data:`T5_VOCAB_SIZE` ids; other characters become ``<unk>``).
"""

from __future__ import annotations

from transformers import CLIPTokenizer, T5TokenizerFast

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BYTE_VOCAB_SIZE = 2 + 2 * 256

#: T5 special tokens in id order: the unigram model of transformers' T5 tokenizer expects ``<unk>`` at id 2
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
#: SentencePiece's word-start marker
WORD_START = "\u2581"


def printable_characters() -> list[str]:
    """The 188 printable characters of ``bytes_to_unicode`` (ASCII ``!``–``~`` and printable Latin-1), in order."""
    ranges = [(ord("!"), ord("~")), (ord("¡"), ord("¬")), (ord("®"), ord("ÿ"))]
    return [chr(c) for low, high in ranges for c in range(low, high + 1)]


def bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible mapping from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the remaining bytes (control characters, space, …) map to the
    code points 256, 257, … in order, so no byte maps to whitespace or a control character.
    """
    mapping: dict[int, str] = {ord(c): c for c in printable_characters()}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_level_vocab() -> dict[str, int]:
    """Return the 514-entry byte-level vocabulary: special tokens, byte characters, then their ``</w>`` forms."""
    chars = list(bytes_to_unicode().values())
    tokens = [BOS_TOKEN, EOS_TOKEN, *chars, *(c + "</w>" for c in chars)]
    return {token: i for i, token in enumerate(tokens)}


def byte_level_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP tokenizer with the byte-level vocabulary, fully offline.

    Args:
        model_max_length: Sequence length used for truncation and ``padding="max_length"`` (77 for every
            Stable Diffusion text encoder).

    Returns:
        A :class:`transformers.CLIPTokenizer` whose ids are all below :data:`BYTE_VOCAB_SIZE` (514). The pad
        token is ``<|endoftext|>``, as in Stable Diffusion's tokenizers.
    """
    return CLIPTokenizer(
        vocab=byte_level_vocab(),
        merges=[],
        model_max_length=model_max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )


def char_level_t5_vocab() -> list[tuple[str, float]]:
    """The unigram vocabulary of :func:`char_level_t5_tokenizer` as ``(piece, log-probability score)`` pairs.

    Order: ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), ``▁`` (3), then ``▁c`` and ``c`` for every printable
    character ``c``. A word-start piece scores like one plain character, so ``"cat"`` becomes ``▁c a t``.
    """
    chars = printable_characters()
    pieces = [(token, 0.0) for token in T5_SPECIAL_TOKENS] + [(WORD_START, -2.0)]
    pieces += [(WORD_START + c, -1.0) for c in chars] + [(c, -1.0) for c in chars]
    return pieces


#: number of ids of :func:`char_level_t5_tokenizer` (3 special tokens, ``▁``, 2 × 188 characters)
T5_VOCAB_SIZE = len(T5_SPECIAL_TOKENS) + 1 + 2 * len(printable_characters())


def char_level_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """Build a T5 tokenizer with the character-level unigram vocabulary, fully offline.

    Args:
        model_max_length: Longest sequence the model is meant to see. FLUX pads its T5 prompt to
            ``max_sequence_length`` (512 for FLUX.1); hiresdiff passes ``min(512, model_max_length)``, so a tiny
            model can use short text sequences.

    Returns:
        A :class:`transformers.T5TokenizerFast` with ids below :data:`T5_VOCAB_SIZE`, ``<pad>`` = 0, ``</s>`` = 1
        (appended to every sequence) and ``<unk>`` = 2, and no sentinel (``<extra_id_*>``) tokens.
    """
    pad, eos, unk = T5_SPECIAL_TOKENS
    return T5TokenizerFast(
        vocab=char_level_t5_vocab(),
        extra_ids=0,
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        model_max_length=model_max_length,
    )
