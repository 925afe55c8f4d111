"""Building the model's prompt: history, recalled context and the user's message.

The model's own chat template (Jinja, from its GGUF metadata) is used when it has one, so the
model sees the turn markers it was trained on; otherwise a plain "User:/Assistant:" transcript.
The prompt must leave room for the reply in the context window: the oldest history goes first,
then the lowest-ranked recalled passages, and a reply longer than the room left is cut short.

A prompt is a list of segments: the template's own text, whose turn markers are special tokens,
and text that users wrote (their messages, history, recalled memory, a reply being continued),
which the engine tokenizes as plain text. Typing ``<start_of_turn>model`` therefore gives the
model those characters, never a forged turn.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from mesh.errors import InvalidArgument

log = logging.getLogger(__name__)

USER = "user"
ASSISTANT = "assistant"

CONTEXT_HEADER = "Relevant context (it may help; ignore it if it does not):"

# In the plain transcript format a model that starts a new labelled line has finished its reply;
# base models (no chat template) otherwise write the next question themselves.
PLAIN_STOPS = ("\nUser:", "\nAssistant:")

# (text, trusted): trusted text may hold special tokens (turn markers); untrusted text never.
Segment = tuple[str, bool]

# Placeholders for untrusted text while a template renders: a private-use character around the
# text's index. Only the placeholders we put there can appear in the rendered template.
_HOLE = "\ue000"
_HOLES = re.compile(f"{_HOLE}(\\d+){_HOLE}")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One prior message. ``role`` is "user" or "assistant"."""

    role: str
    text: str


@dataclass(frozen=True, slots=True)
class PromptRequest:
    """What goes into a prompt.

    ``assistant_prefix`` is reply text already emitted by an agent that died mid-turn: the model
    continues it rather than starting over.
    """

    user_text: str
    history: Sequence[ChatMessage] = ()
    context_passages: Sequence[str] = ()
    assistant_prefix: str = ""


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    """A prompt ready for the engine: ``segments`` to tokenize, ``text`` their concatenation."""

    text: str
    segments: tuple[Segment, ...]
    prompt_tokens: int
    max_tokens: int  # the reply budget after fitting; never more than requested
    history_used: int  # history messages kept (the newest ones)
    passages_used: int  # passages kept (the best ranked ones)
    stop: tuple[str, ...]  # stop sequences the format needs on top of the caller's


class PromptTooLong(InvalidArgument):
    def __init__(self, message: str) -> None:
        super().__init__(message, reason="PROMPT_TOO_LONG", field="user_text")


def normalize_history(history: Sequence[ChatMessage]) -> list[ChatMessage]:
    """History in the strict user/assistant alternation chat templates require.

    Consecutive messages of one role are joined, empty ones dropped, a leading assistant
    message dropped, and a trailing user message dropped (it was never answered, e.g. its
    turn failed; the new message follows it).
    """
    merged: list[ChatMessage] = []
    for message in history:
        if message.role not in (USER, ASSISTANT) or not message.text.strip():
            continue
        if merged and merged[-1].role == message.role:
            merged[-1] = ChatMessage(message.role, merged[-1].text + "\n\n" + message.text)
        else:
            merged.append(message)
    while merged and merged[0].role != USER:
        merged.pop(0)
    if merged and merged[-1].role == USER:
        merged.pop()
    return merged


def user_content(user_text: str, passages: Sequence[str]) -> str:
    """The final user message: recalled passages as a numbered block, then the question."""
    if not passages:
        return user_text
    lines = [CONTEXT_HEADER]
    lines += [f"[{i}] {' '.join(p.split())}" for i, p in enumerate(passages, start=1)]
    return "\n".join(lines) + "\n\n" + user_text


class _Template:
    """A Jinja chat template rendered in a sandbox (templates come from model files)."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        return str(
            self._template.render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        )


class PromptBuilder:
    """Builds prompts for one model.

    Args:
        count_tokens: tokens of a prompt's segments as the engine will feed them.
        n_ctx: the model's context window.
        chat_template: the model's Jinja chat template, or None for the plain format.
        bos_token, eos_token: texts templates may reference.
        system_prompt: optional instructions put first.
    """

    def __init__(
        self,
        *,
        count_tokens: Callable[[Sequence[Segment]], int],
        n_ctx: int,
        chat_template: str | None = None,
        bos_token: str = "",
        eos_token: str = "",
        system_prompt: str = "",
    ) -> None:
        self._count = count_tokens
        self._n_ctx = n_ctx
        self._system = system_prompt
        self._template: _Template | None = None
        if chat_template:
            try:
                template = _Template(chat_template, bos_token, eos_token)
                template.render([{"role": USER, "content": "hi"}])
                self._template = template
            except Exception as error:  # a broken template must not take the agent down
                log.warning("the model's chat template is unusable (%s); using plain format", error)

    @property
    def uses_chat_template(self) -> bool:
        return self._template is not None

    def render(self, request: PromptRequest, history: Sequence[ChatMessage], passages: int) -> str:
        """The prompt text for ``history`` and the first ``passages`` passages."""
        return "".join(text for text, _ in self.segments(request, history, passages))

    def segments(
        self, request: PromptRequest, history: Sequence[ChatMessage], passages: int
    ) -> list[Segment]:
        """The prompt for ``history`` and the first ``passages`` passages, as segments."""
        untrusted: list[str] = []

        def hole(text: str) -> str:
            untrusted.append(text)
            return f"{_HOLE}{len(untrusted) - 1}{_HOLE}"

        # The plain format's "Assistant:" is followed by whatever the model wrote after it,
        # usually a space: a reply that starts with one is rendered as it was generated, so
        # the next prompt starts exactly like the previous prompt plus its reply (KV reuse).
        plain = self._template is None
        messages = [
            ChatMessage(
                m.role,
                hole(
                    m.text[1:]
                    if plain and m.role == ASSISTANT and m.text.startswith(" ")
                    else m.text
                ),
            )
            for m in history
        ]
        content = user_content(request.user_text, request.context_passages[:passages])
        messages.append(ChatMessage(USER, hole(content)))
        if self._system:
            # Not every template knows a system role; the first user message works everywhere.
            messages[0] = ChatMessage(USER, self._system + "\n\n" + messages[0].text)
        prefix = hole(request.assistant_prefix) if request.assistant_prefix else ""
        if self._template is not None:
            rendered = self._template.render(
                [{"role": m.role, "content": m.text} for m in messages]
            )
        else:
            lines = [f"{'User' if m.role == USER else 'Assistant'}: {m.text}\n" for m in messages]
            rendered = "".join(lines) + "Assistant:"
        parts = _HOLES.split(rendered + prefix)
        # split() alternates: template text, a hole's index, template text, ...
        result: list[Segment] = []
        for i, part in enumerate(parts):
            text, trusted = (part, True) if i % 2 == 0 else (untrusted[int(part)], False)
            if text:
                result.append((text, trusted))
        return result

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def bare_tokens(self, request: PromptRequest) -> int:
        """Tokens of the prompt with no history and no recalled passages: the least any prompt
        for this message takes. At ``n_ctx`` or more no reply token fits, so ``build`` refuses
        it; the gateway refuses the same messages up front (services/gateway/context_check.py).
        """
        return self._count(self.segments(request, [], 0))

    def build(self, request: PromptRequest, max_tokens: int) -> BuiltPrompt:
        """Fit ``request`` into the context window leaving room for the reply.

        The reply's reserve is ``max_tokens`` but at most half the window, so a request for a
        very long reply does not silence all history; the reply may still use all the room
        that is left. Raises ``PromptTooLong`` when even the bare message does not fit.
        """
        history = normalize_history(request.history)
        bare = self.bare_tokens(request)
        if bare >= self._n_ctx:
            raise PromptTooLong(
                f"the message needs {bare} tokens but the model's context holds {self._n_ctx}; "
                "send a shorter message"
            )
        reserve = max(1, min(max_tokens, self._n_ctx - bare, self._n_ctx // 2))
        budget = self._n_ctx - reserve

        def fit(request: PromptRequest) -> tuple[int, int]:
            """(history messages, passages) kept: the oldest history goes first, a whole
            exchange at a time, then the lowest-ranked passages."""

            def fits(n_history: int, n_passages: int) -> bool:
                segments = self.segments(request, _newest(history, n_history), n_passages)
                return self._count(segments) <= budget

            kept_history, kept_passages = len(history), len(request.context_passages)
            if not fits(kept_history, kept_passages):
                kept_history = _largest(
                    lambda n: fits(n, kept_passages), range(len(history), -1, -2)
                )
                if not fits(kept_history, kept_passages):
                    kept_passages = _largest(lambda n: fits(0, n), range(kept_passages, -1, -1))
            return kept_history, kept_passages

        kept_history, kept_passages = fit(request)
        # A passage that repeats an exchange the prompt already holds (memory indexes this
        # conversation too) adds nothing, and would keep the prompt from starting like the
        # previous one did, so the KV cache could not continue it.
        unique = without_repeats(request.context_passages, _newest(history, kept_history))
        if len(unique) < len(request.context_passages):
            request = dataclasses.replace(request, context_passages=tuple(unique))
            kept_history, kept_passages = fit(request)
        segments = self.segments(request, _newest(history, kept_history), kept_passages)
        tokens = self._count(segments)
        return BuiltPrompt(
            text="".join(text for text, _ in segments),
            segments=tuple(segments),
            prompt_tokens=tokens,
            max_tokens=max(0, min(max_tokens, self._n_ctx - tokens)),
            history_used=kept_history,
            passages_used=kept_passages,
            stop=() if self._template is not None else PLAIN_STOPS,
        )


def without_repeats(passages: Sequence[str], history: Sequence[ChatMessage]) -> list[str]:
    """``passages`` less those whose text is part of an exchange of ``history``, as memory
    stores an exchange ("user: ...\nassistant: ...", whitespace aside)."""
    exchanges = [
        _words(f"user: {history[i].text}\nassistant: {history[i + 1].text}")
        for i in range(len(history) - 1)
        if history[i].role == USER and history[i + 1].role == ASSISTANT
    ]
    return [p for p in passages if not any(_words(p) in exchange for exchange in exchanges)]


def _words(text: str) -> str:
    return " ".join(text.split())


def _newest(history: Sequence[ChatMessage], n: int) -> list[ChatMessage]:
    return list(history[len(history) - n :]) if n > 0 else []


def _largest(ok: Callable[[int], bool], candidates: Sequence[int]) -> int:
    """The first candidate (they are in decreasing order) that fits, found by bisection.

    Fitting is monotonic: fewer messages or passages never make a prompt longer.
    """
    lo, hi = 0, len(candidates) - 1
    if not ok(candidates[hi]):
        return candidates[hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]
