"""Specs for the built-in tokenizer: lossless round trip, special tokens, chat rendering and masks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.tokenizer import SPECIAL_TOKENS, Tokenizer

N_SPECIAL = len(SPECIAL_TOKENS)
BYTE0 = N_SPECIAL  # ids: specials, then the 256 bytes, then words


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Ann has 23 apples.",
        "How many apples does Ann have now?",
        "zyzzyva quixotically flummoxed",  # unknown words: byte fallback
        "naïve café — déjà vu, 日本語, emoji 🤖🎉",
        "  leading, trailing  \n\ttabs\r\nand   runs   ",
        "1,234.5 + -7 = x; (a*b)/c ** 2 #### 91",
        "\u0663\u0664 arabic-indic digits, \u00a0nbsp",
    ],
)
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_on_arbitrary_text(tok, text):
    if any(s in text for s in SPECIAL_TOKENS):
        return  # special strings become ids (and <|pad|> decodes to nothing): tested separately
    assert tok.decode(tok.encode(text)) == text


def test_unknown_word_falls_back_to_utf8_bytes(tok):
    text = "zyzzyva é"
    assert tok.encode(text) == [BYTE0 + b for b in text.encode()]


def test_known_words_are_single_tokens(tok):
    assert " apples" in tok.words
    assert tok.encode(" apples") == [tok.words.index(" apples") + BYTE0 + 256]


def test_digits_are_single_tokens(tok):
    # a digit after a space is one word; a digit after a digit is one byte: never multi-digit tokens
    ids = tok.encode(" 1234")
    assert len(ids) == 4
    assert [tok.decode([i]) for i in ids] == [" 1", "2", "3", "4"]
    assert ids[0] == tok.words.index(" 1") + BYTE0 + 256
    assert ids[1:] == [BYTE0 + ord(c) for c in "234"]


def test_untrained_tokenizer_is_specials_plus_bytes():
    bare = Tokenizer()
    assert bare.vocab_size == N_SPECIAL + 256
    assert bare.encode("Hi!") == [BYTE0 + ord(c) for c in "Hi!"]


def test_special_token_ids_are_fixed():
    names = ["pad", "bos", "user_start", "user_end", "assistant_start", "assistant_end",
             "tool_start", "tool_end", "output_start", "output_end"]  # fmt: skip
    bare = Tokenizer()
    assert [getattr(bare, f"{n}_id") for n in names] == list(range(N_SPECIAL))
    assert [f"<|{n}|>" for n in names] == list(SPECIAL_TOKENS)


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_token_string_encodes_to_its_id(tok, special):
    assert tok.encode(special) == [SPECIAL_TOKENS.index(special)]


def test_special_tokens_inside_text(tok):
    ids = tok.encode("x<|tool_start|>2+3<|tool_end|>")
    assert ids == [BYTE0 + ord("x"), tok.tool_start_id, *tok.encode("2+3"), tok.tool_end_id]
    assert tok.decode(ids) == "x<|tool_start|>2+3<|tool_end|>"


def test_decode_writes_specials_and_drops_pad(tok):
    ids = [tok.pad_id, tok.pad_id, tok.bos_id, *tok.encode(" apples"), tok.pad_id, tok.assistant_end_id]
    assert tok.decode(ids) == "<|bos|> apples<|assistant_end|>"


# --- chat rendering ------------------------------------------------------------------------------

CONV = {
    "messages": [
        {"role": "user", "content": "Ann has 2 pens and buys 3. How many?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Add them:"},
                {"type": "tool_call", "text": "2+3"},
                {"type": "tool_output", "text": "5"},
                {"type": "text", "text": " #### 5"},
            ],
        },
    ]
}


def test_render_conversation_with_tool_call_exact_ids_and_mask(tok):
    ids, mask = tok.render_conversation(CONV)
    question, text, expr, out, tail = (
        tok.encode(s) for s in ("Ann has 2 pens and buys 3. How many?", "Add them:", "2+3", "5", " #### 5")
    )
    segments = [  # (tokens, mask value)
        ([tok.bos_id], 0),
        ([tok.user_start_id, *question, tok.user_end_id], 0),
        ([tok.assistant_start_id], 0),
        (text, 1),
        ([tok.tool_start_id, *expr, tok.tool_end_id], 1),
        ([tok.output_start_id, *out, tok.output_end_id], 0),
        (tail, 1),
        ([tok.assistant_end_id], 1),
    ]
    assert ids == [t for seg, _ in segments for t in seg]
    assert mask == [m for seg, m in segments for _ in seg]
    assert len(ids) == len(mask)


def test_render_conversation_text_round_trip(tok):
    ids, _ = tok.render_conversation(CONV)
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Ann has 2 pens and buys 3. How many?<|user_end|><|assistant_start|>"
        "Add them:<|tool_start|>2+3<|tool_end|><|output_start|>5<|output_end|> #### 5<|assistant_end|>"
    )


def test_string_assistant_content_is_one_text_part(tok):
    as_str = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " 42"}]}
    as_parts = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": " 42"}]},
        ]
    }
    assert tok.render_conversation(as_str) == tok.render_conversation(as_parts)
    ids, mask = tok.render_conversation(as_str)
    n = len(tok.encode(" 42")) + 1  # text + <|assistant_end|>
    assert mask == [0] * (len(ids) - n) + [1] * n


def test_system_message_is_prepended_to_the_next_user_turn(tok):
    with_system = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What?"}]
    }
    merged = {"messages": [{"role": "user", "content": "Be brief.\nWhat?"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)


def test_multi_turn_masks_every_assistant_turn(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    ids, mask = tok.render_conversation(conv)
    b, c, d = (BYTE0 + ord(x) for x in "bcd")
    assert ids == [
        tok.bos_id, tok.user_start_id, BYTE0 + ord("a"), tok.user_end_id, tok.assistant_start_id, b,
        tok.assistant_end_id, tok.user_start_id, c, tok.user_end_id, tok.assistant_start_id, d,
        tok.assistant_end_id,
    ]  # fmt: skip
    assert mask == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1]


def test_render_for_completion_drops_final_assistant_turn(tok):
    prompt = tok.render_for_completion(CONV)
    user_only, _ = tok.render_conversation({"messages": CONV["messages"][:1]})
    assert prompt == user_only + [tok.assistant_start_id]
    assert prompt[-1] == tok.assistant_start_id
    assert tok.render_for_completion({"messages": CONV["messages"][:1]}) == prompt


def test_render_for_completion_is_a_prefix_of_the_full_render(tok):
    prompt = tok.render_for_completion(CONV)
    ids, mask = tok.render_conversation(CONV)
    assert ids[: len(prompt)] == prompt
    assert mask[: len(prompt)] == [0] * len(prompt)


def test_unknown_role_raises(tok):
    with pytest.raises(ValueError, match="tool"):
        tok.render_conversation({"messages": [{"role": "tool", "content": "5"}]})


def test_unknown_assistant_part_type_raises(tok):
    conv = {"messages": [{"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}
    with pytest.raises(ValueError, match="image"):
        tok.render_conversation(conv)


# --- training and persistence --------------------------------------------------------------------


def test_train_keeps_frequent_words_by_count_then_alphabet():
    texts = ["a the the the cat cat dog", "b dog"]  # " the" ×3, " cat" ×2, " dog" ×2; "a", "b": 1 byte
    digits = [f" {d}" for d in range(10)]  # always in, first
    assert Tokenizer.train(texts, min_count=2).words == digits + [" the", " cat", " dog"]
    assert Tokenizer.train(texts, min_count=3).words == digits + [" the"]
    assert Tokenizer.train(texts, min_count=1, max_words=12).words == digits + [" the", " cat"]


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.words == tok.words
    assert loaded.vocab_size == tok.vocab_size
    text = "Ann buys 4 packs of 17 pens. zyzzyva 🤖"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.render_conversation(CONV) == tok.render_conversation(CONV)
