"""Gold-answer normalization, answer extraction from completions, and verification.

Gold answers arrive in three shapes (see ``../shared/data/README.md``): GSM8K worked solutions
ending in ``#### N``, MATH-style LaTeX (a ``\\boxed{}`` inside a solution, or a bare answer field),
and plain numbers (AMC23 stores ``27.0``). ``normalize_gold`` turns all of them into one short
string that math-verify can parse; ``verify`` compares a predicted answer with it.

Timeouts. math-verify bounds parsing and comparison with ``signal.alarm``, which only works on the
main thread. ``verify``/``normalize_gold`` pass ``timeout_s`` through on the main thread and pass
``None`` (no timeout) anywhere else, so they are safe to call from worker threads, but there a
pathological expression is only stopped by the cheap size screen below (huge integer powers and
factorials, over-long strings), not by a clock. To verify untrusted text in parallel with a hard
time limit, use worker *processes* (each runs its work on its own main thread), not threads.
"""

from __future__ import annotations

import math
import re
import threading
from decimal import Decimal, InvalidOperation
from typing import Iterable

from bard_data.config.think_tags import THINK, ThinkTags
from bard_data.text.reasoning import split_reasoning

__all__ = ["normalize_gold", "extract_answer", "verify", "answers_equal_batch"]

GOLD_FORMATS = ("auto", "gsm8k", "boxed", "latex", "number", "solution")
# A reference solution without a box is taken as the answer itself only when it is this short and
# on one line (s1K's `solution` is often just "128"); a longer one has no answer to find.
SHORT_SOLUTION_CHARS = 64

# Longer than any real final answer; longer strings are whole solutions or garbage, and parsing
# them off the main thread would have no time limit.
MAX_ANSWER_CHARS = 2000

# Screen for numbers whose exact evaluation would not finish (e.g. 9^{9^{9^9}}, (10^{10})!);
# 2^200000 still compares in milliseconds.
_MAX_EXACT_BITS = 200_000

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
# Thousands separators only in 3-digit groups, so that "-2,1" (a list of roots) stays a list.
_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")
_LOOSE_NUMBER_RE = re.compile(
    r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|-?\d+\s*/\s*\d+|-?\d+(?:\.\d+)?|-?\.\d+"
)
_ANSWER_PHRASE_RE = re.compile(r"answer[*\s]*(?:is\b|:|=)[*:\s]*(.+)", re.IGNORECASE)
_MC_RE = re.compile(
    r"^\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?\(?\s*([A-Ea-e])\s*\)?\s*\}?\s*\.?\s*$"
)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _mv_timeout(timeout_s: float | None) -> int | None:
    # signal.alarm takes whole seconds and raises off the main thread.
    if timeout_s is None or timeout_s <= 0 or not _on_main_thread():
        return None
    return max(1, math.ceil(timeout_s))


# ---------------------------------------------------------------------------------------------
# string helpers


def last_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed,
    also ``\\boxed {..}`` and ``\\boxed 5``); None if there is none or its braces never close."""
    found: str | None = None
    pos = 0
    while True:
        m = _BOXED_RE.search(text, pos)
        if m is None:
            return found
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return None
        if text[i] != "{":
            # "\boxed 5": TeX takes one token; take up to the next space or math delimiter.
            tok = re.match(r"[^\s$]+", text[i:])
            found = tok.group(0) if tok else None
            pos = i + (len(found) if found else 1)
            continue
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == "\\":
                j += 2  # "\{" and "\}" are literal braces, not grouping
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth != 0:
            return None  # an unclosed last box: its content is unknowable
        found = text[i + 1 : j]
        pos = j + 1


def _canonical_number(s: str, loose_commas: bool = False) -> str | None:
    """"1,000" / "$10.50" / "72.0" / "\\$18.90" -> "1000" / "10.5" / "72" / "18.9"; None if
    ``s`` is not a single plain number."""
    t = s.strip()
    for junk in ("\\$", "$", "\\!", "\\,", "\\ ", "{,}"):
        t = t.replace(junk, "")
    t = t.replace(" ", "").rstrip(".")
    if loose_commas:
        t = t.replace(",", "")
    if not t or not _NUMBER_RE.fullmatch(t) or not any(ch.isdigit() for ch in t):
        return None
    try:
        d = Decimal(t.replace(",", ""))
    except InvalidOperation:
        return None
    return _format_decimal(d)


def _format_decimal(d: Decimal) -> str:
    if d == d.to_integral_value():
        return str(int(d))
    out = format(d.normalize(), "f")
    return "0" if out in ("-0", "+0") else out


def _clean_latex(s: str) -> str:
    t = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(t) >= len(left) + len(right) and t.startswith(left) and t.endswith(right):
            t = t[len(left) : len(t) - len(right)].strip()
            break
    if t.endswith(".") and not t.endswith("\\."):
        t = t[:-1].rstrip()
    return t


def _finish(s: str | None) -> str | None:
    if s is None:
        return None
    t = _clean_latex(s)
    if not t:
        return None
    return _canonical_number(t) or t


def _mc_letter(s: str) -> str | None:
    m = _MC_RE.match(s)
    return m.group(1).upper() if m else None


def _strict_mc_letter(s: str) -> str | None:
    # A bare lowercase "e" is Euler's number (and "a" an article), not an option; "(e)" is one.
    letter = _mc_letter(s)
    if letter is None or s.strip().rstrip(".") in ("a", "b", "c", "d", "e"):
        return None
    return letter


# ---------------------------------------------------------------------------------------------
# math-verify glue


def _bits(e) -> float:
    """Upper bound on log2 |value| of a numeric sympy tree, found without evaluating it."""
    import sympy

    if isinstance(e, sympy.Integer):
        return float(max(abs(int(e)).bit_length(), 1))
    if isinstance(e, sympy.Rational):
        return float(max(abs(int(e.p)).bit_length(), int(e.q).bit_length()))
    if isinstance(e, sympy.Float):
        return math.log2(abs(float(e)) + 2)
    if isinstance(e, sympy.Pow):
        base_bits, exp_bits = _bits(e.base), _bits(e.exp)
        if not e.base.is_number:
            return base_bits + exp_bits  # stays symbolic; only a numeric exponent is computed
        if exp_bits > 64:
            return math.inf
        return base_bits * 2.0**exp_bits
    if isinstance(e, (sympy.factorial, sympy.factorial2)):
        arg_bits = _bits(e.args[0])
        if arg_bits > 64:
            return math.inf
        return 2.0**arg_bits * arg_bits
    if isinstance(e, sympy.Mul):
        return sum(_bits(a) for a in e.args)
    if e.args:
        return max(_bits(a) for a in e.args) + 1
    return 2.0


def _too_big(exprs: Iterable) -> bool:
    import sympy

    try:
        return any(isinstance(x, sympy.Basic) and _bits(x) > _MAX_EXACT_BITS for x in exprs)
    except (RecursionError, OverflowError, ValueError):
        return True


def _parse(s: str, timeout_s: float | None) -> list:
    """math-verify's parse of ``$s$``; [] when nothing parsed into a sympy object."""
    import math_verify

    if not s or len(s) > MAX_ANSWER_CHARS:
        return []
    parsed = math_verify.parse(f"${s}$", parsing_timeout=_mv_timeout(timeout_s))
    # With fallback_mode="first_match" a failed parse still returns the raw string; only a
    # sympy result means math-verify understood it.
    if not any(not isinstance(p, str) for p in parsed):
        return []
    return parsed


# ---------------------------------------------------------------------------------------------
# public API


def normalize_gold(raw: str | int | float | None, fmt: str = "auto", timeout_s: float = 5) -> str | None:
    """Normalize a gold answer to a short string math-verify parses; None when unusable.

    fmt: "gsm8k" (worked solution ending in ``#### N``), "boxed" (solution text, last
    ``\\boxed{}``/``\\fbox{}``), "latex" (a bare LaTeX answer), "number", "auto" (detected:
    ``####`` -> gsm8k, a box -> boxed, a plain number -> number, else latex), or "solution" (a
    reference solution: its last box; without one, the text itself only when it is a short single
    line, else None). Plain numbers are canonical: no thousands separators or ``$``, no trailing
    zeros ("27.0" -> "27").
    """
    if fmt not in GOLD_FORMATS:
        raise ValueError(f"fmt must be one of {GOLD_FORMATS}, got {fmt!r}")
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        if isinstance(raw, float) and not math.isfinite(raw):
            return None
        # repr() is the shortest string that round-trips, so 0.1 stays "0.1", not 0.1000000000000000055.
        return _format_decimal(Decimal(repr(raw) if isinstance(raw, float) else raw))
    if not isinstance(raw, str):
        return None
    s = raw.strip()
    if not s:
        return None

    if fmt == "solution":
        if _BOXED_RE.search(s):
            fmt = "boxed"
        elif "\n" not in s and len(s) <= SHORT_SOLUTION_CHARS:
            fmt = "auto"
        else:
            return None

    if fmt == "auto":
        if "####" in s:
            fmt = "gsm8k"
        elif _BOXED_RE.search(s):
            fmt = "boxed"
        elif _canonical_number(s) is not None:
            fmt = "number"
        else:
            fmt = "latex"

    if fmt == "gsm8k":
        matches = _GSM8K_RE.findall(s)
        if not matches:
            return None
        out = _canonical_number(matches[-1], loose_commas=True)
    elif fmt == "boxed":
        out = _finish(last_boxed(s))
    elif fmt == "number":
        out = _canonical_number(s)
    else:
        out = _finish(s)

    if out is None or len(out) > MAX_ANSWER_CHARS:
        return None
    if _strict_mc_letter(out) is not None:
        return out
    try:
        return out if _parse(out, timeout_s) else None
    except Exception:
        return None


def extract_answer(text: str | None, tags: ThinkTags = THINK) -> str | None:
    """The final answer in a model's output, as a short string for ``verify``.

    With think tags (``tags``' convention, default ``<think>``), only the response after the close
    tag is searched (an unclosed think block has no answer). Order: last ``\\boxed{}``; last
    ``#### N``; last "answer is X" / "Answer: X"; the last number in the text. None when nothing is found.
    """
    if not text or not text.strip():
        return None
    if tags.close in text or tags.open in text:
        _, text, _ = split_reasoning(text, tags.open, tags.close, (tags.answer_open, tags.answer_close))
        if not text:
            return None

    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return _finish(boxed)

    hashes = _GSM8K_RE.findall(text)
    if hashes and hashes[-1].strip():
        tail = hashes[-1].strip()
        return _canonical_number(tail, loose_commas=True) or _finish(tail)

    phrases = _ANSWER_PHRASE_RE.findall(text)
    if phrases:
        # The answer ends at the end of its sentence ("...is 5. Then..."); decimals keep their point.
        x = re.split(r"\.(?:\s|$)", phrases[-1].strip(), maxsplit=1)[0].strip("* \t")
        math_span = re.search(r"\$+([^$]+)\$+|\\\((.+?)\\\)", x)
        if math_span:
            return _finish(math_span.group(1) or math_span.group(2))
        first = x.split()[0] if x.split() else ""
        # "(B) because ..." names an option; a bare "A triangle" does not.
        letter = _strict_mc_letter(x) or (_mc_letter(first) if first.startswith("(") else None)
        if letter is not None:
            return letter
        lead = _LOOSE_NUMBER_RE.match(x)
        if lead:
            return _finish(lead.group(0).replace(" ", ""))
        if x:
            return _finish(x)

    numbers = _LOOSE_NUMBER_RE.findall(text)
    if numbers:
        return _finish(numbers[-1].replace(" ", ""))
    return None


def verify(pred: str | int | float | None, gold: str | int | float | None, timeout_s: float = 5) -> bool:
    """True when ``pred`` (an extracted answer, e.g. from ``extract_answer``) equals ``gold``.

    ``gold`` goes through ``normalize_gold`` (so raw dataset fields work); a boxed ``pred`` is
    unboxed. Multiple choice (gold a letter A-E, "(C)", "\\text{(C)}") compares letters exactly,
    case-insensitively; everything else uses math-verify. Never raises: failures are False.
    The timeout only applies on the main thread (see the module docstring).
    """
    try:
        if pred is None or gold is None:
            return False
        gold_n = normalize_gold(gold, timeout_s=timeout_s)
        if gold_n is None:
            return False
        if isinstance(pred, (int, float)) and not isinstance(pred, bool):
            pred_n = normalize_gold(pred)
        elif isinstance(pred, str):
            pred_n = _finish(last_boxed(pred)) if _BOXED_RE.search(pred) else _finish(pred)
        else:
            return False
        if not pred_n:
            return False

        gold_letter = _strict_mc_letter(gold_n)
        if gold_letter is not None:
            return _mc_letter(pred_n) == gold_letter

        if gold_n == pred_n:
            return True
        import math_verify

        gold_p = _parse(gold_n, timeout_s)
        pred_p = _parse(pred_n, timeout_s)
        if not gold_p or not pred_p or _too_big(gold_p) or _too_big(pred_p):
            return False
        return bool(math_verify.verify(gold_p, pred_p, timeout_seconds=_mv_timeout(timeout_s)))
    except BaseException as e:  # math-verify's TimeoutException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return False


def answers_equal_batch(preds: Iterable, golds: Iterable, timeout_s: float = 5) -> list[bool]:
    """``verify`` over aligned lists."""
    preds, golds = list(preds), list(golds)
    if len(preds) != len(golds):
        raise ValueError(f"preds and golds differ in length: {len(preds)} != {len(golds)}")
    return [verify(p, g, timeout_s=timeout_s) for p, g in zip(preds, golds)]
