"""Chat data: records -> conversations, rendering, and exactly which tokens the loss scores."""

from __future__ import annotations

import numpy as np
import pytest

from nexttoken.data.chat import (
    ChatTemplate,
    Conversation,
    Message,
    choose_format,
    detect_format,
    encode_conversations,
    read_conversations,
    resolve_chat_template,
    to_conversation,
)
from nexttoken.data.tokenizers import CHATML_TEMPLATE, IM_END, IM_START, Tokenizer, build_tokenizer
from nexttoken.errors import DataError

MULTI_TURN = [
    Message("system", "Be brief."),
    Message("user", "Hi"),
    Message("assistant", "Hello!"),
    Message("user", "2+2?"),
    Message("assistant", "4"),
]

# A template in the style of Llama 3 (content trimmed, its own markers), written with ChatML markers.
TRIMMING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def byte_chat():
    return resolve_chat_template(build_tokenizer("bytes"))


@pytest.fixture(scope="module")
def bpe():
    text = "Q: What is the capital of France? A: Paris. The capital of Italy is Rome. Paris, Paris!\n"
    return build_tokenizer("bpe", [text * 20], vocab_size=320)


def scored_text(template: ChatTemplate, example) -> str:
    return template.tokenizer.decode(example.tokens[example.scored].tolist())


# --------------------------------------------------------------------------- records


def test_format_detection_says_what_it_chose():
    assert detect_format({"messages": []})[0] == "chat"
    assert detect_format({"prompt": "a", "response": "b"})[0] == "instruction"
    assert detect_format({"instruction": "a", "input": "", "output": "b"})[0] == "instruction"
    assert detect_format({"text": "a"})[0] == "text"
    assert choose_format("auto", {"messages": []}, "r1") == (
        "chat",
        "format: chat (auto: the records have 'messages')",
    )
    assert choose_format("instruction", {"messages": []}, "r1") == ("instruction", "format: instruction")
    with pytest.raises(DataError, match=r"r1 has 'foo', none of the shapes"):
        detect_format({"foo": 1}, "r1")
    with pytest.raises(DataError, match="^format must be one of"):
        choose_format("jsonl", {}, "r1")


def test_instruction_records_become_user_and_assistant_turns():
    alpaca = {"instruction": "Add the numbers.", "input": "2 3", "output": "5", "system": "Be exact."}
    assert to_conversation(alpaca, "instruction", "x").messages == [
        Message("system", "Be exact."),
        Message("user", "Add the numbers.\n\n2 3"),
        Message("assistant", "5"),
    ]
    no_input = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert to_conversation(no_input, "instruction", "x").messages[0] == Message("user", "Say hi.")
    pair = {"prompt": "p", "response": "r"}
    assert to_conversation(pair, "instruction", "x").messages == [
        Message("user", "p"),
        Message("assistant", "r"),
    ]


def test_read_conversations_names_file_and_record_in_errors():
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    conversations, line = read_conversations([good, good], source="chats.jsonl")
    assert len(conversations) == 2 and line == "format: chat (auto: the records have 'messages')"
    assert conversations[1].where == "chats.jsonl, record 2"
    bad_role = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    with pytest.raises(DataError, match=r"chats.jsonl, record 3: message 1 has role 'bot'; roles are system"):
        read_conversations([good, good, bad_role], source="chats.jsonl")
    bad_content = {"messages": [{"role": "user", "content": ["a", "b"]}]}
    with pytest.raises(
        DataError, match=r"chats.jsonl, record 2: the content of message 0 is list, not a string"
    ):
        read_conversations([good, bad_content], source="chats.jsonl")
    with pytest.raises(DataError, match=r"record 2 has no 'messages' \(the format is chat\)"):
        read_conversations([good, {"prompt": "a", "response": "b"}], source="chats.jsonl")
    with pytest.raises(DataError, match="plain text records"):
        read_conversations([{"text": "a"}], source="docs.jsonl")
    with pytest.raises(DataError, match="has no records"):
        read_conversations([], source="empty.jsonl")


# --------------------------------------------------------------------------- the golden masks


def test_golden_mask_multi_turn_chatml(byte_chat):
    """Built by hand, byte by byte: exactly the assistants' contents and their <|im_end|> are scored."""
    tok = byte_chat.tokenizer
    start, end = tok._token_id(IM_START), tok._token_id(IM_END)
    tokens, scored = [], []

    def text(s, score=False):
        tokens.extend(s.encode())
        scored.extend([score] * len(s.encode()))

    def marker(token_id, score=False):
        tokens.append(token_id)
        scored.append(score)

    for role, content in (("system", "Be brief."), ("user", "Hi")):
        marker(start), text(f"{role}\n{content}"), marker(end), text("\n")
    marker(start), text("assistant\n"), text("Hello!", True), marker(end, True), text("\n")
    marker(start), text("user\n2+2?"), marker(end), text("\n")
    marker(start), text("assistant\n"), text("4", True), marker(end, True), text("\n")

    example = byte_chat.encode(Conversation(MULTI_TURN, "golden"))
    assert example.tokens.tolist() == tokens
    assert example.scored.tolist() == scored
    assert example.n_scored == len("Hello!") + len("4") + 2
    assert example.nbytes[example.scored].sum() == len("Hello!4")  # markers are 0 bytes
    assert example.nbytes.sum() == len(byte_chat.render(MULTI_TURN).encode()) - 5 * len(IM_START + IM_END)
    assert byte_chat.end_of_turn_id == end


def test_train_on_last_response_and_all(byte_chat):
    conversation = Conversation(MULTI_TURN, "x")
    last = byte_chat.encode(conversation, "last_response")
    assert scored_text(byte_chat, last) == "4" + IM_END
    everything = byte_chat.encode(conversation, "all")
    assert everything.scored.all() and everything.n_scored == len(everything) - 1
    with pytest.raises(DataError, match="^train_on must be one of"):
        byte_chat.encode(conversation, "prompts")


def test_no_assistant_turn_is_an_error_under_responses(byte_chat):
    conversation = Conversation([Message("user", "Hi")], "chats.jsonl, record 4")
    with pytest.raises(DataError, match=r"chats.jsonl, record 4 has no assistant turn.*use train_on all"):
        byte_chat.encode(conversation)
    assert byte_chat.encode(conversation, "all").n_scored > 0


@pytest.mark.slow
def test_golden_mask_smollm2_own_template(smollm2_gguf):
    """SmolLM2's own template (a default system prompt when none is given) and tokenizer: the golden
    scored tokens, and the very token ids transformers' apply_chat_template gives."""
    from transformers import AutoTokenizer

    from nexttoken.data.tokenizers import from_transformers

    hf = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tokenizer = from_transformers(hf)
    template = resolve_chat_template(tokenizer)
    assert template.template == hf.chat_template
    messages = [
        Message("user", "What is 2+2?"),
        Message("assistant", " It is 4. "),
        Message("user", "And 3+3?"),
        Message("assistant", "6"),
    ]
    example = template.encode(Conversation(messages, "smol"))
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]
    assert (
        example.tokens.tolist()
        == hf.apply_chat_template(as_dicts, tokenize=True, return_dict=True)["input_ids"]
    )
    pieces = [hf.convert_ids_to_tokens(int(t)) for t in example.tokens]
    golden = ["ĠIt", "Ġis", "Ġ", "4", ".", "Ġ", "<|im_end|>", "6", "<|im_end|>"]
    assert [p for p, s in zip(pieces, example.scored) if s] == golden
    # The default system prompt, the user turns, the headers and the newlines are not scored.
    assert pieces[: pieces.index("Ċ")] == ["<|im_start|>", "system"]
    assert not example.scored[: pieces.index("ĠIt")].any()
    assert template.end_of_turn_id == hf.convert_tokens_to_ids("<|im_end|>")


# --------------------------------------------------------------------------- what the mask must survive


def test_bpe_merge_across_the_prompt_response_boundary_is_scored(bpe):
    """The prompt ends with "A: " and the reply starts "Paris": byte-level BPE reads " Paris" as one
    pre-token, so the boundary space and the reply's first letters share a token. Counting the
    prompt's own tokens (LitGPT's rule) would leave that token unscored; the mask from offsets scores it."""
    source = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}A: {{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    template = ChatTemplate(bpe, source, "test")
    messages = [Message("user", "What is the capital of France?"), Message("assistant", "Paris.")]
    example = template.encode(Conversation(messages, "x"))
    ids, offsets = bpe.encode_with_offsets(template.render(messages), parse_special=True)
    boundary = template.render(messages[:1], add_generation_prompt=True)  # "Q: ...\nA: "
    first = next(i for i, (a, b) in enumerate(offsets) if a < len(boundary) < b)  # the token across it
    assert bpe.decode([ids[first]]).startswith(" P")
    assert example.scored[first]
    assert scored_text(template, example) == " Paris." + IM_END
    # The rule that tokenizes the prompt alone gets this token wrong.
    prompt_length = len(bpe.encode_with_offsets(boundary, parse_special=True)[0])
    naive = np.zeros(len(ids), dtype=bool)
    naive[prompt_length:] = True
    assert prompt_length > first and not naive[first]


def test_template_with_generation_markers_agrees_with_transformers(bpe, tmp_path):
    """Our mask needs no {% generation %} markers; where a template has them, transformers'
    return_assistant_tokens_mask is an independent answer, and the two agree token for token."""
    from transformers import AutoTokenizer

    marked = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [
        *MULTI_TURN,
        Message("user", "The capital of France?"),
        Message("assistant", " Paris, Paris!"),
    ]
    ours = ChatTemplate(bpe, marked, "test").encode(Conversation(messages, "x"))
    bpe.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    theirs = hf.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        chat_template=marked,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert ours.tokens.tolist() == theirs["input_ids"]
    assert ours.scored.astype(int).tolist() == theirs["assistant_masks"]
    assert ours.scored.sum() > 10


def test_an_empty_reply_scores_only_its_end_of_turn(byte_chat):
    # The reply's place is after the generation prompt, not before the assistant's header.
    messages = [Message("user", "Say nothing."), Message("assistant", "")]
    example = byte_chat.encode(Conversation(messages, "x"))
    assert scored_text(byte_chat, example) == IM_END
    assert example.scored.tolist().index(True) == len(example) - 2  # <|im_end|>, then the final newline


def test_template_that_trims_content(byte_chat):
    template = ChatTemplate(byte_chat.tokenizer, TRIMMING_TEMPLATE, "test")
    messages = [Message("user", "  Hi  "), Message("assistant", "  Hello there \n")]
    example = template.encode(Conversation(messages, "x"))
    assert scored_text(template, example) == "Hello there" + IM_END


def test_special_token_text_inside_a_message_is_flagged(byte_chat):
    clean = byte_chat.encode(Conversation(MULTI_TURN, "x"))
    assert not clean.has_marker_text
    injected = [Message("user", f"say {IM_END} now"), Message("assistant", "ok")]
    assert byte_chat.encode(Conversation(injected, "x")).has_marker_text
    # In plain documents the same text is just text.
    assert byte_chat.tokenizer.encode(IM_END) == list(IM_END.encode())


# --------------------------------------------------------------------------- bad templates


def test_template_errors_show_the_templates_own_line(byte_chat):
    tok = byte_chat.tokenizer
    broken = "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"
    with pytest.raises(DataError, match=r"failed to render.*line 2: .*\[\{\{ m\['content'\] \}\]"):
        resolve_chat_template_from_source(tok, broken)
    raising = (
        "{% for m in messages %}{% if m['role'] == 'system' %}\n"
        "{{ raise_exception('System messages are not supported') }}{% endif %}"
        "<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    template = resolve_chat_template_from_source(tok, raising)
    with pytest.raises(
        DataError, match=r"for chats.jsonl, record 9: line 2: System messages are not supported"
    ):
        template.encode(Conversation(MULTI_TURN, "chats.jsonl, record 9"))


def resolve_chat_template_from_source(tokenizer: Tokenizer, source: str, tmp=None) -> ChatTemplate:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "template.jinja"
        path.write_text(source)
        return resolve_chat_template(tokenizer, path)


def test_a_tokenizer_without_template_needs_one(tmp_path, tiny_llama_dir):
    tokenizer = build_tokenizer(str(tiny_llama_dir))
    assert tokenizer.chat_template is None
    with pytest.raises(DataError, match="no chat template.*pass one with chat_template FILE"):
        resolve_chat_template(tokenizer)
    with pytest.raises(DataError, match="cannot read it"):
        resolve_chat_template(tokenizer, tmp_path / "missing.jinja")
    # A ChatML file works once the markers are special tokens of the tokenizer: here they are not.
    (tmp_path / "chatml.jinja").write_text(CHATML_TEMPLATE)
    with pytest.raises(DataError, match="no special end-of-turn token"):
        resolve_chat_template(tokenizer, tmp_path / "chatml.jinja")
    # ... with the tokenizer's own end-of-turn token (its EOS) it does.
    eos_template = CHATML_TEMPLATE.replace("'<|im_end|>'", "eos_token")
    (tmp_path / "eos.jinja").write_text(eos_template)
    template = resolve_chat_template(tokenizer, tmp_path / "eos.jinja")
    assert template.end_of_turn_id == tokenizer.eos_id


def test_templates_that_hide_the_content_are_refused(byte_chat):
    tok = byte_chat.tokenizer
    not_prefix_stable = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}<|im_start|>{{ m['content'] }}<|im_end|>"
        "{% endfor %}"
    )
    with pytest.raises(DataError, match="renders earlier turns differently"):
        ChatTemplate(tok, not_prefix_stable, "test").encode(Conversation(MULTI_TURN, "x"))
    rewriting = "{% for m in messages %}<|im_start|>{{ m['content'] | upper }}<|im_end|>{% endfor %}"
    with pytest.raises(DataError, match="changes the content of message 0"):
        ChatTemplate(tok, rewriting, "test").encode(Conversation(MULTI_TURN, "x"))


def test_encode_conversations_keeps_order(byte_chat):
    conversations = [Conversation([Message("user", "q"), Message("assistant", a)], a) for a in ("one", "two")]
    examples = encode_conversations(byte_chat, conversations)
    assert [scored_text(byte_chat, e) for e in examples] == ["one" + IM_END, "two" + IM_END]
