"""The Show-o2 text tokenizer: Qwen2.5's tokenizer plus the four tokens the official code adds, and role ids.

Show-o2 (showlab/Show-o, show-o2/models/misc.py `get_text_tokenizer`) loads the Qwen2.5 tokenizer (151643 regular
tokens, then 22 special tokens at 151643..151664) and adds `[PAD]` (as the pad token), `<image>`, `<|vid_start|>`
and `<|vid_end|>` -> 151669 tokens. The model only depends on this *layout*: special token k sits at n_regular + k.
`build_tokenizer` makes a small offline tokenizer with the same layout for tests and tiny models.
"""

import os
from dataclasses import dataclass, fields

QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
SHOWO2_ADDED_TOKENS: tuple[str, ...] = ("[PAD]", "<image>", "<|vid_start|>", "<|vid_end|>")
_LAYOUT = QWEN_SPECIAL_TOKENS + SHOWO2_ADDED_TOKENS

# Role -> token string, in SpecialTokens field order.
ROLE_TOKENS: dict[str, str] = {
    "bos": "<|im_start|>", "eos": "<|im_end|>", "boi": "<|vision_start|>", "eoi": "<|vision_end|>",
    "img_pad": "<|image_pad|>", "vid_pad": "<|video_pad|>", "pad": "[PAD]", "img": "<image>",
    "bov": "<|vid_start|>", "eov": "<|vid_end|>",
}

# Files a tokenizer folder can be loaded from (fast tokenizer.json, or a slow tokenizer's vocabulary files).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens Show-o2 gives a role (see ROLE_TOKENS for the token behind each field)."""

    bos: int
    eos: int
    boi: int
    eoi: int
    img_pad: int
    vid_pad: int
    pad: int
    img: int
    bov: int
    eov: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        """Look every role's token up by its string in `tokenizer.get_vocab()` (added tokens included)."""
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in ROLE_TOKENS.values() if tok not in vocab]
        if missing:
            raise ValueError(
                f"Tokenizer ({type(tokenizer).__name__}, {len(vocab)} tokens) lacks the Show-o2 token(s) {missing}; "
                "expected the Qwen2.5 specials plus the Show-o2 additions (load it with load_tokenizer)."
            )
        return cls(**{role: vocab[tok] for role, tok in ROLE_TOKENS.items()})

    @classmethod
    def from_layout(cls, n_regular: int) -> "SpecialTokens":
        """Ids when the 22 Qwen specials and then the 4 Show-o2 additions follow n_regular regular tokens."""
        if n_regular < 0:
            raise ValueError(f"n_regular must be >= 0, got {n_regular}.")
        return cls(**{role: n_regular + _LAYOUT.index(tok) for role, tok in ROLE_TOKENS.items()})

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


QWEN2_5 = SpecialTokens.from_layout(151643)


def _add_showo2_tokens(tokenizer) -> None:
    """Add the Show-o2 tokens the way the official get_text_tokenizer does, skipping the ones already there.

    A folder saved after adding them already has them; re-adding would be a no-op in transformers today, but
    checking by string makes that explicit rather than relying on it.
    """
    vocab = tokenizer.get_vocab()
    if "[PAD]" not in vocab or tokenizer.pad_token != "[PAD]":
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # also (re)sets pad_token, as the official code does
    for tok in SHOWO2_ADDED_TOKENS[1:]:
        if tok not in vocab:
            tokenizer.add_tokens(tok)  # a plain (non-special) added token, as in the official code


def load_tokenizer(path: str):
    """Load the tokenizer in local folder `path` (never the network) and add the Show-o2 tokens if missing.

    Returns a transformers tokenizer; `SpecialTokens.from_tokenizer` gives its role ids. Raises ValueError if
    `path` is not a folder or holds no tokenizer.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"Tokenizer path {path!r} is not a local folder; expected a folder saved by save_pretrained "
                         "(e.g. a downloaded copy of Qwen/Qwen2.5-1.5B-Instruct).")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ValueError(f"Folder {path!r} holds no tokenizer: expected one of {list(_TOKENIZER_FILES)}, "
                         f"found {sorted(os.listdir(path))}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"Could not load a tokenizer from folder {path!r}: {e}") from e
    _add_showo2_tokens(tokenizer)
    return tokenizer


def build_tokenizer(words: list[str], path: str | None = None, glue_spaces: bool = False):
    """A small byte-level fast tokenizer with the Show-o2 special-token layout (for tests and tiny models).

    Regular ids: 0..255 are the 256 byte symbols of GPT-2/Qwen byte-level BPE, in Qwen's order (so "\\n" is 198,
    " " is 220, "." is 13 as in Qwen2.5); they are the fallback that lets any text tokenize, with no unknown token.
    Then come the given words, each one token (order kept, duplicates and single bytes dropped). Then the 22 Qwen
    specials at n_regular.., and the 4 Show-o2 additions; n_regular = len(tokenizer) - 26.

    Text is split into runs of letters/digits/underscore and single other characters (every space, newline and
    punctuation mark is its own token, unlike Qwen, which glues a leading space to a word). A run that is one of
    the words is that word's token; any other run is spelled out byte by byte. Hence every word must be such a
    run (ValueError otherwise), and decode(encode(text)) == text for any text.

    glue_spaces=True does as Qwen does: a run takes the one space before it, and each word is also a token with
    that space (" red" after "red"), so "a red circle" is 3 tokens instead of 5: shorter rows, faster training.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    run = r" ?[\p{L}\p{N}_]+" if glue_spaces else r"[\p{L}\p{N}_]+"
    split = pre_tokenizers.Split(Regex(run + r"|[^\p{L}\p{N}_]"), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    # Sorting the byte alphabet by code point gives exactly GPT-2's bytes_to_unicode order (Qwen's ids 0..255).
    vocab = {sym: i for i, sym in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for word in words:
        pieces = pre_tokenizer.pre_tokenize_str(word)
        if len(pieces) != 1 or word.startswith(" "):
            raise ValueError(f"Word {word!r} is not a single run of letters, digits or '_' (it splits into "
                             f"{[p for p, _ in pieces]}); expected words such as 'cat' or 'Qwen2'.")
        vocab.setdefault(pieces[0][0], len(vocab))  # stored byte-level encoded, as the model sees the piece
    if glue_spaces:  # after all the plain words, so their ids do not depend on glue_spaces
        for word in words:
            vocab.setdefault(pre_tokenizer.pre_tokenize_str(" " + word)[0][0], len(vocab))

    # No merges: ignore_merges makes a piece that is in the vocab one token, and anything else falls to bytes.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    # Special tokens are matched in the raw text before pre-tokenization, as in Qwen's tokenizer.json.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",  # Qwen2.5's own settings
        # Decode must keep " ." as is; transformers 5 skips this clean-up for BPE anyway, but warns unless False.
        clean_up_tokenization_spaces=False,
    )
    _add_showo2_tokens(tokenizer)  # the same code path as load_tokenizer, so both give identical tokenizers
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer
