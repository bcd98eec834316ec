"""Tests for showo2.tokenizer: special-token layout (golden tiny-a ids, real Qwen2.5 ids), building, saving and
loading (adding the Show-o2 tokens once), special tokens and newlines inside text, decode round trips."""

import json
import os

import pytest

from flashu_batch.showo2.tokenizer import (
    QWEN2_5, QWEN_SPECIAL_TOKENS, ROLE_TOKENS, SHOWO2_ADDED_TOKENS, SpecialTokens, build_tokenizer, load_tokenizer,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.environ.get("FLASHU_GOLDEN") or os.path.join(REPO, "tests", "golden", "tiny-a")  # tests/conftest.py
CASES = os.path.join(GOLDEN, "cases.json")

WORDS = ["You", "are", "helpful", "assistant", "system", "user", "photo", "red", "fox", "sitting", "in", "the",
         "snow", "Describe", "this", "image", "héllo"]
N_BYTES = 256  # build_tokenizer's byte-level fallback symbols, ids 0..255


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(WORDS)


def test_layout_and_length(tok):
    n_regular = N_BYTES + len(WORDS)
    assert len(tok) == n_regular + 26
    assert SpecialTokens.from_tokenizer(tok) == SpecialTokens.from_layout(n_regular)
    for k, t in enumerate(QWEN_SPECIAL_TOKENS + SHOWO2_ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(t) == n_regular + k, t
    # Words follow the bytes in the given order; a duplicate or a single byte adds no token.
    assert tok.convert_tokens_to_ids("You") == N_BYTES and tok.convert_tokens_to_ids("photo") == N_BYTES + 6
    assert len(build_tokenizer(WORDS + ["photo", "a", "."])) == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "[PAD]"
    assert tok.eos_token_id == SpecialTokens.from_tokenizer(tok).eos


def test_matches_golden_tiny_a_layout():
    with open(CASES) as f:
        golden = json.load(f)["tokenizer"]
    n_regular = golden["n_regular"]
    tok = build_tokenizer([f"w{i}" for i in range(n_regular - N_BYTES)])
    assert len(tok) == golden["llm_vocab_size"]
    for token, expected in golden["special_token_ids"].items():
        assert tok.convert_tokens_to_ids(token) == expected, token
    special = SpecialTokens.from_tokenizer(tok)
    assert special == SpecialTokens.from_layout(n_regular)
    assert {f"{role}_id": i for role, i in special.as_dict().items() if role != "pad"} == golden["showo_token_ids"]
    assert special.pad == golden["pad_id"]


def test_qwen2_5_real_ids():
    assert QWEN2_5 == SpecialTokens(bos=151644, eos=151645, boi=151652, eoi=151653, img_pad=151655, vid_pad=151656,
                                    pad=151665, img=151666, bov=151667, eov=151668)
    assert len(QWEN_SPECIAL_TOKENS) == 22 and QWEN_SPECIAL_TOKENS[0] == "<|endoftext|>"
    assert QWEN_SPECIAL_TOKENS[-1] == "<|file_sep|>"


def test_from_tokenizer_names_missing_token():
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordLevel({"[UNK]": 0, "cat": 1}, unk_token="[UNK]"))
    bare.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        SpecialTokens.from_tokenizer(bare)
    with pytest.raises(ValueError, match="n_regular"):
        SpecialTokens.from_layout(-1)


def test_save_and_load_round_trip(tok, tmp_path):
    build_tokenizer(WORDS, path=str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.get_vocab() == tok.get_vocab()
    assert SpecialTokens.from_tokenizer(loaded) == SpecialTokens.from_tokenizer(tok)
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "[PAD]"
    text = "<|im_start|>user\nDescribe this photo, please.<|im_end|>\n"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text


def _save_qwen_like_without_showo2(folder, n_regular):
    """A tokenizer folder as Qwen2.5 ships it: regular tokens, then only the 22 specials (no Show-o2 tokens)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"t{i}": i for i in range(1, n_regular)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert len(wrapped) == n_regular + 22
    wrapped.save_pretrained(folder)


def test_load_adds_showo2_tokens_once(tmp_path):
    n_regular = 50
    base, resaved = tmp_path / "base", tmp_path / "resaved"
    _save_qwen_like_without_showo2(str(base), n_regular)
    loaded = load_tokenizer(str(base))
    assert len(loaded) == n_regular + 26
    assert SpecialTokens.from_tokenizer(loaded) == SpecialTokens.from_layout(n_regular)
    assert loaded.pad_token == "[PAD]" and loaded.pad_token_id == n_regular + 22
    assert loaded.encode("t3 <image> t4") == [3, n_regular + 23, 4]

    # Loading twice, or loading a folder saved after adding, adds nothing more.
    assert load_tokenizer(str(base)).get_vocab() == loaded.get_vocab()
    loaded.save_pretrained(str(resaved))
    again = load_tokenizer(str(resaved))
    assert len(again) == n_regular + 26 and again.get_vocab() == loaded.get_vocab()
    assert again.pad_token == "[PAD]"


def test_load_rejects_folders_without_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="not a local folder"):
        load_tokenizer(str(tmp_path / "missing"))


def test_special_tokens_inside_text(tok):
    special = SpecialTokens.from_tokenizer(tok)
    ids = tok.encode("system\nYou are a helpful assistant.<|im_end|>")
    assert ids[-1] == special.eos and ids.count(special.eos) == 1
    ids = tok.encode("x<|vision_start|><|image_pad|><|image_pad|><|vision_end|><image><|vid_start|>")
    assert ids[1:] == [special.boi, special.img_pad, special.img_pad, special.eoi, special.img, special.bov]


def test_newlines_are_tokens(tok):
    newline = tok.encode("\n")
    assert newline == [198]  # "\n" is its own token, with Qwen's byte-level id
    ids = tok.encode("user\n\nphoto\n")
    assert ids == [tok.convert_tokens_to_ids("user"), 198, 198, tok.convert_tokens_to_ids("photo"), 198]


def test_decode_round_trip(tok):
    text = "You are a helpful assistant.\nDescribe this image:  the red fox, sitting in the snow!\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Known words are single tokens; spaces and punctuation are single byte tokens (" " is 220 as in Qwen).
    assert tok.convert_ids_to_tokens(ids[:4]) == ["You", "Ġ", "are", "Ġ"] and ids[1] == 220
    # Unknown words and non-ASCII text fall back to bytes and still round-trip; héllo is a known word.
    for other in ["zebra crossing", "héllo naïve 猫 🦊", "tabs\tand\r\nCRLF", "spaced out , as is . it 's ! ?"]:
        ids = tok.encode(other)
        assert tok.decode(ids) == other
    assert len(tok.encode("héllo")) == 1 and len(tok.encode("zebra")) == 5


def test_decode_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nDescribe this photo.<|im_end|><|vision_start|><|image_pad|>[PAD][PAD]")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nDescribe this photo."


def test_build_rejects_words_that_cannot_be_one_token():
    for bad in ["two words", "snow.", "", "line\n"]:
        with pytest.raises(ValueError, match="not a single run"):
            build_tokenizer(["cat", bad])


def test_role_tokens_cover_every_field():
    assert list(ROLE_TOKENS) == list(QWEN2_5.as_dict())


def test_glue_spaces_gives_words_their_leading_space_as_qwen_does(tmp_path):
    glued = build_tokenizer(WORDS, path=str(tmp_path), glue_spaces=True)
    plain = build_tokenizer(WORDS)
    # Every word is also one token with a leading space; the plain words keep their ids; the layout holds.
    n_regular = len(glued) - 26
    assert SpecialTokens.from_tokenizer(glued) == SpecialTokens.from_layout(n_regular)
    assert {w: glued.convert_tokens_to_ids(w) for w in WORDS} == {w: plain.convert_tokens_to_ids(w) for w in WORDS}
    ids = glued.encode("Describe this red fox", add_special_tokens=False)
    assert [glued.decode([i]) for i in ids] == ["Describe", " this", " red", " fox"]
    assert len(plain.encode("Describe this red fox", add_special_tokens=False)) == 7
    # Runs that are not words still fall back to bytes (the space stays its own byte), and text round-trips.
    text = "<|im_start|>user\nDescribe  this zebra, héllo.<|im_end|>\n red"
    for tok in (glued, load_tokenizer(str(tmp_path))):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert [tok.decode([i]) for i in ids][4:8] == [" ", " this", " ", "z"]
    with pytest.raises(ValueError, match="not a single run"):
        build_tokenizer(["cat", " dog"], glue_spaces=True)
