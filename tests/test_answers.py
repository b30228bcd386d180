"""Answer normalization, extraction, verification and think-tag splitting, on the three answer
shapes of ../shared/data (GSM8K `#### N`, MATH LaTeX/boxed, AMC floats)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from bard_data.text.answers import answers_equal_batch, extract_answer, normalize_gold, verify
from bard_data.text.reasoning import format_think, split_reasoning

# ---------------------------------------------------------------------------------------------
# normalize_gold

GOLD_CASES = [
    # gsm8k worked solutions
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "auto", "72"),
    ("He pays 1,000 in total.\n#### 1,000", "gsm8k", "1000"),
    ("So 2,520,000 dollars\n#### 2,520,000", "auto", "2520000"),
    ("She earns $10.50 an hour\n#### $10.50", "auto", "10.5"),
    ("The loss is -5\n#### -5", "auto", "-5"),
    ("#### 0.25", "gsm8k", "0.25"),
    ("####42", "gsm8k", "42"),
    ("line\n#### 7\n", "auto", "7"),
    ("no final marker here: 12", "gsm8k", None),
    ("####   \n", "gsm8k", None),
    ("#### many", "gsm8k", None),
    # MATH solutions with boxes
    (r"Therefore $\boxed{\left( 3, \frac{\pi}{2} \right)}.$", "auto", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"so $x = \boxed{\frac{14}{3}}$.", "boxed", r"\frac{14}{3}"),
    (r"nested $\boxed{\frac{\sqrt{3}}{3}}$", "auto", r"\frac{\sqrt{3}}{3}"),
    (r"first \boxed{1} then \boxed{2}", "auto", "2"),
    (r"space form \boxed {5}", "auto", "5"),
    (r"fbox form \fbox{12}", "auto", "12"),
    (r"no braces \boxed 7 done", "boxed", "7"),
    (r"a set $\boxed{\{1\pm\sqrt{5},-2\}}$", "auto", r"\{1\pm\sqrt{5},-2\}"),
    (r"money \boxed{\$32,\!348}", "auto", "32348"),
    (r"unbalanced \boxed{\frac{1}{2}", "auto", None),
    (r"\boxed{}", "auto", None),
    ("no box at all", "boxed", None),
    # LaTeX answer fields
    (r"\frac{14}{3}", "auto", r"\frac{14}{3}"),
    (r"\left( 3, \frac{\pi}{2} \right)", "latex", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\text{(C)}", "auto", r"\text{(C)}"),
    (r"(-\infty, 2) \cup (3, \infty)", "auto", r"(-\infty, 2) \cup (3, \infty)"),
    (r"\left(\frac{3}{5},\frac{8}{3}\right]", "auto", r"\left(\frac{3}{5},\frac{8}{3}\right]"),
    (r"10,\!080", "auto", "10080"),
    (r"11,\! 111,\! 111,\! 100", "auto", "11111111100"),
    ("-2,1", "auto", "-2,1"),  # roots, not a thousands separator
    (".0000672", "auto", "0.0000672"),
    (r"\$18.90", "auto", "18.9"),
    ("  $\\sqrt{5}$  ", "auto", r"\sqrt{5}"),
    (r"\begin{pmatrix} -1 \\ 2 \end{pmatrix}", "latex", r"\begin{pmatrix} -1 \\ 2 \end{pmatrix}"),
    (r"\frac{1}{", "latex", None),
    ("", "auto", None),
    ("   \n ", "auto", None),
    # numbers (AMC23 stores floats)
    (27.0, "auto", "27"),
    (0.5, "auto", "0.5"),
    (-1.0, "number", "-1"),
    (1625, "auto", "1625"),
    (0.1, "auto", "0.1"),
    ("72.00", "number", "72"),
    ("abc", "number", None),
    (float("nan"), "auto", None),
    (None, "auto", None),
]


@pytest.mark.parametrize("raw,fmt,expected", GOLD_CASES)
def test_normalize_gold(raw, fmt, expected):
    assert normalize_gold(raw, fmt) == expected


def test_normalize_gold_rejects_unknown_format():
    with pytest.raises(ValueError):
        normalize_gold("1", fmt="csv")


# ---------------------------------------------------------------------------------------------
# extract_answer

EXTRACT_CASES = [
    (r"<think>try 3, then 4</think>So the result is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"We get \boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{1} wait, actually \boxed{2}", "2"),
    ("48/2 = 24 clips\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("The answer is 42.", "42"),
    ("So the final answer is $\\frac{3}{4}$.", r"\frac{3}{4}"),
    ("**Final Answer**: 17", "17"),
    ("Answer: (C)", "C"),
    ("The answer is (B) because it fits.", "B"),
    ("The answer is 3.5. Done.", "3.5"),
    ("She has 3 apples and then 12,500 more", "12500"),
    ("x = -7", "-7"),
    ("the ratio is 3/4", "3/4"),
    ("no digits here", None),
    ("", None),
    (None, None),
    ("<think>the answer is 9 but I ran out of", None),  # unclosed thinking has no answer
    ("<think>lots of 5s</think>", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------------------------------
# verify

VERIFY_CASES = [
    ("0.5", r"\frac{1}{2}", True),
    ("72", "72.0", True),
    ("72.0", 72, True),
    ("71", "72", False),
    (None, "3", False),
    ("", "3", False),
    ("3", None, False),
    ("3", r"\frac{1}{", False),  # unparsable gold
    ("3", "   ", False),
    ("1000", "He paid it.\n#### 1,000", True),  # raw gsm8k gold
    ("27", 27.0, True),
    (r"\boxed{27}", 27.0, True),
    (r"\frac{14}{3}", r"\frac{14}{3}", True),
    ("14/3", r"\frac{14}{3}", True),
    (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"(3, \pi)", r"\left( 3, \frac{\pi}{2} \right)", False),
    (r"(-\infty,2)\cup(3,\infty)", r"(-\infty, 2) \cup (3, \infty)", True),
    (r"\sqrt{3}/3", r"\frac{\sqrt{3}}{3}", True),
    ("x = 5", "5", True),
    ("C", r"\text{(C)}", True),
    ("(c)", "(C)", True),
    (r"\textbf{(C)}", "C", True),
    ("D", r"\text{(C)}", False),
    ("3", r"\text{(C)}", False),
    ("10080", r"10,\!080", True),
    ("-2, 1", "-2,1", True),
    ("9^{9^{9^{9}}}", "3", False),  # a number too big to evaluate is rejected, not computed
    ("2^{2^{3}}", "256", True),
]


@pytest.mark.parametrize("pred,gold,expected", VERIFY_CASES)
def test_verify(pred, gold, expected):
    assert verify(pred, gold) is expected


def test_answers_equal_batch():
    assert answers_equal_batch(["1", "2", None], ["1", "3", "4"]) == [True, False, False]
    with pytest.raises(ValueError):
        answers_equal_batch(["1"], ["1", "2"])


def test_verify_in_worker_threads():
    # signal.alarm would raise off the main thread; verify must drop the timeout there instead.
    pairs = [("0.5", r"\frac{1}{2}", True), ("71", "72", False), (r"\sqrt{5}", r"\sqrt{5}", True)] * 3
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda c: verify(c[0], c[1]), pairs))
    assert results == [expected for _, _, expected in pairs]
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(normalize_gold, r"\frac{14}{3}").result() == r"\frac{14}{3}"
        # No alarm off the main thread: the size screen is what keeps these from hanging.
        assert pool.submit(verify, "9^{9^{9^{9}}}", "3").result(timeout=20) is False
        assert pool.submit(verify, "(10^{10})!", "3").result(timeout=20) is False


# ---------------------------------------------------------------------------------------------
# split_reasoning / format_think

SPLIT_CASES = [
    ("<think>R</think>A", ("R", "A", True)),
    ("<think>\n  step 1\n</think>\n\nThe answer is 5.", ("step 1", "The answer is 5.", True)),
    ("R1 style reasoning</think>Answer", ("R1 style reasoning", "Answer", True)),
    ("<think>unfinished thought", ("unfinished thought", "", False)),
    ("plain completion, no tags", ("", "plain completion, no tags", False)),
    ("   \n\t", ("", "", False)),
    ("", ("", "", False)),
    ("<think>a<think>b</think>c</think>d", ("ab", "cd", True)),  # first close; strays removed
    ("<think>x</think>y<think>z</think>w", ("x", "yzw", True)),
    ("R</think>A<think>stray", ("R", "Astray", True)),
    ("pre <think>R</think>A", ("pre R", "A", True)),
    ("<think></think>just answer", ("", "just answer", True)),
]


@pytest.mark.parametrize("text,expected", SPLIT_CASES)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_split_reasoning_custom_tags():
    assert split_reasoning("<r>why</r>what", open_tag="<r>", close_tag="</r>") == ("why", "what", True)


def test_format_think_exact_and_round_trip():
    text = format_think("step 1\nstep 2", "The answer is 4.")
    assert text == "<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 4."
    assert split_reasoning(text) == ("step 1\nstep 2", "The answer is 4.", True)
    assert extract_answer(text) == "4"


# ---------------------------------------------------------------------------------------------
# the real data


def _jsonl(path, limit=None):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def test_real_gsm8k_golds(shared_data):
    rows = _jsonl(shared_data / "gsm8k" / "train.jsonl", limit=50)
    golds = [normalize_gold(r["answer"]) for r in rows]
    assert all(g is not None for g in golds)
    assert golds[:2] == ["72", "10"]
    for r, g in zip(rows, golds):
        assert verify(g, r["answer"])
        assert extract_answer(r["answer"]) == g


def test_real_amc23_golds(shared_data):
    rows = _jsonl(shared_data / "amc23" / "test.jsonl")
    assert len(rows) == 40
    golds = [normalize_gold(r["answer"]) for r in rows]
    assert all(g is not None and "." not in g for g in golds)  # all AMC23 answers are integers
    assert golds[0] == "27"


def test_real_math500_boxed_agrees_with_answer(shared_data):
    rows = _jsonl(shared_data / "math500" / "test.jsonl")
    assert len(rows) == 500
    unnormalizable = [r["answer"] for r in rows if normalize_gold(r["answer"]) is None]
    assert unnormalizable == []
    failures = []
    for r in rows:
        boxed = normalize_gold(r["solution"], fmt="boxed")
        if not verify(boxed, r["answer"]):
            failures.append((r["unique_id"], boxed, r["answer"]))
    print(f"math500 boxed-vs-answer failures: {len(failures)}/500 {failures[:10]}")
    assert len(failures) <= 25, failures
