"""Prompt building: formats, recalled context, history trimming, takeover prefix."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from mesh.llm.tiny_model import CHAT_TEMPLATE
from services.agent.prompt import (
    CONTEXT_HEADER,
    PLAIN_STOPS,
    ChatMessage,
    PromptBuilder,
    PromptRequest,
    PromptTooLong,
    Segment,
    normalize_history,
)


def chars(segments: Sequence[Segment]) -> int:
    """A stand-in tokenizer: one token per character."""
    return sum(len(text) for text, _ in segments)


def exchange(i: int, size: int = 10) -> list[ChatMessage]:
    return [
        ChatMessage("user", f"q{i}".ljust(size, "q")),
        ChatMessage("assistant", f"a{i}".ljust(size, "a")),
    ]


def test_plain_format_with_history_context_and_question() -> None:
    builder = PromptBuilder(count_tokens=chars, n_ctx=10_000)
    built = builder.build(
        PromptRequest(
            user_text="What is the mesh?",
            history=[ChatMessage("user", "hi"), ChatMessage("assistant", "hello")],
            context_passages=["The mesh is a gRPC service mesh.", "Agents run llama.cpp."],
        ),
        max_tokens=100,
    )
    assert not builder.uses_chat_template
    assert built.text == (
        "User: hi\n"
        "Assistant: hello\n"
        f"User: {CONTEXT_HEADER}\n"
        "[1] The mesh is a gRPC service mesh.\n"
        "[2] Agents run llama.cpp.\n\n"
        "What is the mesh?\n"
        "Assistant:"
    )
    assert built.prompt_tokens == len(built.text)
    assert built.max_tokens == 100
    assert built.history_used == 2
    assert built.passages_used == 2
    assert built.stop == PLAIN_STOPS


def test_chat_template_is_used_when_the_model_has_one() -> None:
    builder = PromptBuilder(
        count_tokens=chars, n_ctx=10_000, chat_template=CHAT_TEMPLATE, bos_token="<s>"
    )
    built = builder.build(
        PromptRequest(
            user_text="and now?",
            history=[ChatMessage("user", "hi"), ChatMessage("assistant", "hello")],
        ),
        max_tokens=10,
    )
    assert builder.uses_chat_template
    assert built.text == (
        "<s><|user|>hi<|end|><|assistant|>hello<|end|><|user|>and now?<|end|><|assistant|>"
    )
    assert built.stop == ()


def test_broken_template_falls_back_to_plain_format() -> None:
    builder = PromptBuilder(count_tokens=chars, n_ctx=1000, chat_template="{% for x in %}")
    assert not builder.uses_chat_template
    built = builder.build(PromptRequest(user_text="hi"), max_tokens=10)
    assert built.text == "User: hi\nAssistant:"


def test_template_that_raises_falls_back_to_plain_format() -> None:
    template = "{{ raise_exception('no user role here') }}"
    builder = PromptBuilder(count_tokens=chars, n_ctx=1000, chat_template=template)
    assert not builder.uses_chat_template


def test_takeover_appends_the_text_already_emitted() -> None:
    builder = PromptBuilder(count_tokens=chars, n_ctx=1000, chat_template=CHAT_TEMPLATE)
    built = builder.build(
        PromptRequest(user_text="go on", assistant_prefix="Once upon a"), max_tokens=10
    )
    assert built.text.endswith("<|assistant|>Once upon a")
    plain = PromptBuilder(count_tokens=chars, n_ctx=1000).build(
        PromptRequest(user_text="go on", assistant_prefix=" Once upon a"), max_tokens=10
    )
    assert plain.text.endswith("Assistant: Once upon a")


def test_oldest_history_is_dropped_first_in_whole_exchanges() -> None:
    history = [m for i in range(6) for m in exchange(i)]
    request = PromptRequest(user_text="now", history=history)
    full = PromptBuilder(count_tokens=chars, n_ctx=100_000).build(request, max_tokens=10)
    # Room for the bare prompt plus about two and a half exchanges.
    bare = len("User: now\nAssistant:")
    per_exchange = len("User: ") + 10 + 1 + len("Assistant: ") + 10 + 1
    n_ctx = bare + int(2.5 * per_exchange) + 10
    built = PromptBuilder(count_tokens=chars, n_ctx=n_ctx).build(request, max_tokens=10)
    assert built.history_used == 4
    assert built.prompt_tokens <= n_ctx - 10
    assert "q4" in built.text and "a5" in built.text
    assert "q3" not in built.text and "a3" not in built.text
    assert built.text.startswith("User: q4")
    assert full.history_used == 12


def test_passages_are_dropped_after_history_lowest_ranked_first() -> None:
    request = PromptRequest(
        user_text="question",
        history=exchange(0),
        context_passages=["best " * 5, "second " * 5, "third " * 5],
    )
    with_first = PromptBuilder(count_tokens=chars, n_ctx=100_000).render(request, [], 1)
    n_ctx = len(with_first) + 20
    built = PromptBuilder(count_tokens=chars, n_ctx=n_ctx).build(request, max_tokens=20)
    assert built.history_used == 0
    assert built.passages_used == 1
    assert "best" in built.text and "second" not in built.text


def test_reply_budget_shrinks_when_the_room_is_short() -> None:
    request = PromptRequest(user_text="x" * 50)
    built = PromptBuilder(count_tokens=chars, n_ctx=100).build(request, max_tokens=4096)
    assert built.prompt_tokens == len("User: ") + 50 + len("\nAssistant:")
    assert built.max_tokens == 100 - built.prompt_tokens


def test_a_long_reply_request_leaves_half_the_window_for_history() -> None:
    history = [m for i in range(20) for m in exchange(i)]
    built = PromptBuilder(count_tokens=chars, n_ctx=1000).build(
        PromptRequest(user_text="q", history=history), max_tokens=4096
    )
    assert built.history_used > 0
    assert built.prompt_tokens <= 500
    assert built.max_tokens == 1000 - built.prompt_tokens


def test_message_that_cannot_fit_is_rejected() -> None:
    builder = PromptBuilder(count_tokens=chars, n_ctx=50)
    with pytest.raises(PromptTooLong) as caught:
        builder.build(PromptRequest(user_text="y" * 100), max_tokens=10)
    assert caught.value.reason == "PROMPT_TOO_LONG"
    assert "50" in caught.value.message


def test_system_prompt_goes_into_the_first_user_message() -> None:
    builder = PromptBuilder(
        count_tokens=chars, n_ctx=1000, chat_template=CHAT_TEMPLATE, system_prompt="Be brief."
    )
    built = builder.build(PromptRequest(user_text="hi", history=exchange(0, size=2)), max_tokens=10)
    assert built.text.startswith("<|user|>Be brief.\n\nq0<|end|>")
    assert built.text.endswith("<|user|>hi<|end|><|assistant|>")


def test_normalize_history_makes_roles_alternate() -> None:
    history = [
        ChatMessage("assistant", "orphan greeting"),
        ChatMessage("user", "a"),
        ChatMessage("user", "b"),
        ChatMessage("assistant", ""),
        ChatMessage("assistant", "c"),
        ChatMessage("system", "ignored"),
        ChatMessage("user", "unanswered"),
    ]
    assert normalize_history(history) == [
        ChatMessage("user", "a\n\nb"),
        ChatMessage("assistant", "c"),
    ]


def test_passages_are_single_line_and_numbered() -> None:
    builder = PromptBuilder(count_tokens=chars, n_ctx=1000)
    built = builder.build(
        PromptRequest(user_text="q", context_passages=["line one\nline two"]), max_tokens=5
    )
    assert "[1] line one line two\n" in built.text


def test_passages_that_repeat_the_history_are_left_out() -> None:
    history = [ChatMessage("user", "my cat is Tom"), ChatMessage("assistant", "Nice  cat.")]
    request = PromptRequest(
        user_text="what is my cat called?",
        history=history,
        context_passages=["user: my cat is Tom\nassistant: Nice cat.", "user: I live in Oslo"],
    )
    built = PromptBuilder(count_tokens=chars, n_ctx=10_000).build(request, max_tokens=10)
    assert built.passages_used == 1
    assert "[1] user: I live in Oslo" in built.text
    assert built.text.count("my cat is Tom") == 1
    # The same passage stays when its exchange no longer fits the window and was dropped.
    long_history = [ChatMessage("user", "my cat is Tom"), ChatMessage("assistant", "x" * 400)]
    passage = "user: my cat is Tom\nassistant: " + "x" * 400
    tight = PromptBuilder(count_tokens=chars, n_ctx=900).build(
        PromptRequest(user_text="cat?", history=long_history, context_passages=[passage]), 10
    )
    assert tight.history_used == 0 and tight.passages_used == 1


def test_plain_format_renders_a_reply_as_it_followed_the_prompt() -> None:
    """The next prompt begins with the previous prompt plus the reply exactly as generated, so
    the agent's KV cache continues it."""
    builder = PromptBuilder(count_tokens=chars, n_ctx=10_000)
    first = builder.build(PromptRequest(user_text="hi"), max_tokens=10)
    reply = " Hello there."  # the model writes its own space after "Assistant:"
    second = builder.build(
        PromptRequest(
            user_text="and?",
            history=[ChatMessage("user", "hi"), ChatMessage("assistant", reply)],
        ),
        max_tokens=10,
    )
    assert second.text.startswith(first.text + reply + "\n")
