"""Split a completion into its thinking part and its answer part, and format SFT targets.

Every split takes its markers from a ``ThinkTags`` convention (``bard_data.config.think_tags``;
default ``<think>``/``</think>``): the recipe's for sampled traces, compression outputs, SFT rows
and the reward, a trace source's own for imported traces. With open tag O and close tag C,
conventions (``split_reasoning``), chosen so that the reasoning/response columns of
``teacher_samples`` mean the same thing whatever the teacher emitted:

- ``O R C A``        -> (R, A, True)
- ``R C A`` (R1 style, the opening tag sat in the prompt) -> (R, A, True)
- ``O R`` (no close: truncated while thinking) -> (R, "", False). The response is empty
  because an answer-looking tail of unfinished thinking is not an answer.
- no tags at all              -> ("", text, False): a plain completion is all response.
- whitespace only / empty     -> ("", "", False)

Text before the opening tag counts as reasoning (everything before the close tag was produced
while thinking). The split is on the first close tag after the first open tag; tags repeated or
nested beyond that are removed from both parts rather than kept as noise in training rows, and so
are the convention's answer markers (``<|begin_of_solution|>``...).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from bard_data.config.think_tags import THINK, ThinkTags

__all__ = ["split_reasoning", "split_trace", "format_think", "think_layout", "reasoning_span", "pick_tags"]

Conventions = Union[ThinkTags, Sequence[ThinkTags], None]


def _strip_tags(s: str, open_tag: str, close_tag: str, extra: Sequence[Optional[str]] = ()) -> str:
    for t in (open_tag, close_tag, *extra):
        if t:
            s = s.replace(t, "")
    return s.strip()


def split_reasoning(
    text: str | None, open_tag: str = "<think>", close_tag: str = "</think>",
    answer_tags: Sequence[Optional[str]] = (),
) -> tuple[str, str, bool]:
    """Return ``(reasoning, response, closed)``; see the module docstring for the cases."""
    if text is None or not text.strip():
        return "", "", False

    o = text.find(open_tag)
    # The first close tag anywhere: after the open tag it is "the first close after the first
    # open"; before it, the completion is R1 style and the later open tag is a stray.
    c = text.find(close_tag)

    if c < 0:
        if o < 0:
            return "", _strip_tags(text, "", "", answer_tags), False
        return _strip_tags(text, open_tag, close_tag, answer_tags), "", False

    head = text[:c]
    response = text[c + len(close_tag):]
    return (_strip_tags(head, open_tag, close_tag, answer_tags), _strip_tags(response, open_tag, close_tag, answer_tags),
            True)


def pick_tags(text: str | None, tags: Conventions = None) -> ThinkTags:
    """The convention of ``tags`` (one, or several a source may use) that ``text`` is written in:
    the first whose close tag it contains, else the first whose open tag it contains, else the first."""
    if tags is None:
        return THINK
    if isinstance(tags, ThinkTags):
        return tags
    tags = list(tags) or [THINK]
    t = text or ""
    return (next((c for c in tags if c.close in t), None) or next((c for c in tags if c.open in t), None)
            or tags[0])


def think_layout(tags: ThinkTags = THINK) -> tuple[str, str, str]:
    """(before the reasoning, between reasoning and response, after the response) of an SFT
    assistant turn: ``format_think`` is ``before + reasoning + between + response + after``."""
    if tags.answer_open or tags.answer_close:
        return (f"{tags.open}\n\n", f"\n\n{tags.close}\n\n{tags.answer_open or ''}\n\n",
                f"\n\n{tags.answer_close or ''}".rstrip())
    return f"{tags.open}\n", f"\n{tags.close}\n\n", ""


def format_think(reasoning: str, response: str, tags: ThinkTags = THINK) -> str:
    """The one layout SFT rows use for an assistant turn with thinking (in ``tags``' convention)."""
    before, between, after = think_layout(tags)
    return f"{before}{reasoning}{between}{response}{after}"


def split_trace(text: str, untagged: str = "last_paragraph", tags: Conventions = None) -> tuple[str, str, bool]:
    """``split_reasoning`` in ``tags``' convention (see ``pick_tags``) plus a rule for text with
    no think tags at all.

    ``untagged``: "response" (no reasoning), "reasoning" (all of it is reasoning), or
    "last_paragraph" (the last paragraph is the response, the rest the reasoning: how worked
    solutions and non-reasoning models write).
    """
    t = pick_tags(text, tags)
    reasoning, response, closed = split_reasoning(text, t.open, t.close, (t.answer_open, t.answer_close))
    if closed or reasoning or untagged == "response" or t.open in (text or ""):
        return reasoning, response, closed
    body = response
    if untagged == "reasoning":
        return body, "", False
    head, sep, tail = body.rpartition("\n\n")
    if not sep:
        head, sep, tail = body.rpartition("\n")
    return (head.strip(), tail.strip(), False) if sep else ("", body, False)


def reasoning_span(text: str, tags: ThinkTags = THINK) -> tuple[str, bool]:
    """(reasoning, closed) for counting reasoning length (the reward, the eval): the text before
    the close tag, open tag removed; a missing close tag means the reasoning runs to the end, also
    when there are no tags at all (so dropping the tags cannot shorten the count)."""
    c = text.find(tags.close)
    head = text if c < 0 else text[:c]
    return head.replace(tags.open, "").replace(tags.close, "").strip(), c >= 0
