"""An offline CLIP tokenizer with a byte-level vocabulary.

Tiny and randomly initialised models need a tokenizer but no real vocabulary: this module builds a
:class:`transformers.CLIPTokenizer` entirely in code, without files or network access. The vocabulary holds the
two CLIP special tokens, the 256 byte-level characters of GPT-2's ``bytes_to_unicode`` mapping and their
end-of-word (``</w>``) forms, and no merges, so every word is tokenised byte by byte (514 ids in all).

transformers 5 ignores the older ``vocab_file=`` / ``merges_file=`` arguments (everything becomes unknown), so
the vocabulary and merges are passed in memory, together with an explicit ``model_max_length``.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BYTE_VOCAB_SIZE = 2 + 2 * 256


def bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible mapping from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the remaining bytes (control characters, space, …) map to the
    code points 256, 257, … in order, so no byte maps to whitespace or a control character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
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
