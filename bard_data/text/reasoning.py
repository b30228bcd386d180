"""Split a completion into its thinking part and its answer part, and format SFT targets.

Conventions (``split_reasoning``), chosen so that the reasoning/response columns of
``teacher_samples`` mean the same thing whatever the teacher emitted:

- ``<think>R</think>A``        -> (R, A, True)
- ``R</think>A`` (R1 style, the opening tag sat in the prompt) -> (R, A, True)
- ``<think>R`` (no close: truncated while thinking) -> (R, "", False). The response is empty
  because an answer-looking tail of unfinished thinking is not an answer.
- no tags at all              -> ("", text, False): a plain completion is all response.
- whitespace only / empty     -> ("", "", False)

Text before the opening tag counts as reasoning (everything before the close tag was produced
while thinking). The split is on the first close tag after the first open tag; tags repeated or
nested beyond that are removed from both parts rather than kept as noise in training rows.
"""

from __future__ import annotations

__all__ = ["split_reasoning", "split_trace", "format_think"]


def _strip_tags(s: str, open_tag: str, close_tag: str) -> str:
    return s.replace(open_tag, "").replace(close_tag, "").strip()


def split_reasoning(
    text: str | None, open_tag: str = "<think>", close_tag: str = "</think>"
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
            return "", text.strip(), False
        return _strip_tags(text, open_tag, close_tag), "", False

    head = text[:c]
    response = text[c + len(close_tag):]
    return _strip_tags(head, open_tag, close_tag), _strip_tags(response, open_tag, close_tag), True


def format_think(reasoning: str, response: str) -> str:
    """The one layout SFT rows use for an assistant turn with thinking."""
    return f"<think>\n{reasoning}\n</think>\n\n{response}"


def split_trace(text: str, untagged: str = "last_paragraph") -> tuple[str, str, bool]:
    """``split_reasoning`` plus a rule for text with no think tags at all.

    ``untagged``: "response" (no reasoning), "reasoning" (all of it is reasoning), or
    "last_paragraph" (the last paragraph is the response, the rest the reasoning: how worked
    solutions and non-reasoning models write).
    """
    reasoning, response, closed = split_reasoning(text)
    if closed or reasoning or untagged == "response" or "<think>" in text:
        return reasoning, response, closed
    body = text.strip()
    if untagged == "reasoning":
        return body, "", False
    head, sep, tail = body.rpartition("\n\n")
    if not sep:
        head, sep, tail = body.rpartition("\n")
    return (head.strip(), tail.strip(), False) if sep else ("", body, False)
