"""The budget statement: how a budget is said in a prompt, and read back from one.

``format.budget_template`` (jinja2 with ``budget``) renders the line, placed by
``format.budget_placement``: appended to the system prompt (``system``), or before
(``user_prefix``) or after (``user_suffix``) the question, separated by a blank line. Rows
without a budget (the standard chains) get no line.

Reading it back uses a parser derived from the same template (the line rendered around a
sentinel budget, the sentinel replaced by a number pattern, anchored where the placement puts the
line), so any template that states the budget as a decimal integer round-trips; a template that
does not (``{{ budget // 1000 }}k``) is a recipe error at preflight (``check_round_trip``).
The SFT rows, the RL prompts, the GRPO reward (when a dataset has no ``budget`` column) and the
eval prompts all go through here.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

import polars as pl

from bard_data.config.stages import FormatConfig
from bard_data.config.think_tags import THINK, ThinkTags
from bard_data.errors import RecipeError
from bard_data.text.reasoning import format_think, think_layout
from bard_data.text.templates import ENV, render

__all__ = ["MESSAGES_DTYPE", "budget_line", "prompt_messages", "messages_column", "parse_budget", "check_round_trip"]

# A budget no real template is fed, so its decimal digits mark where the budget sits in the line.
_SENTINEL = 918273645


def budget_line(cfg: FormatConfig, budget: int) -> str:
    return render(cfg.budget_template, budget=int(budget))


@lru_cache(maxsize=64)
def _line_pattern(template: str) -> Optional[re.Pattern]:
    line = render(template, budget=_SENTINEL)
    parts = line.split(str(_SENTINEL))
    if len(parts) != 2:
        return None
    return re.compile(re.escape(parts[0]) + r"(\d+)" + re.escape(parts[1]))


def _anchored(cfg: FormatConfig) -> Optional[re.Pattern]:
    pat = _line_pattern(cfg.budget_template)
    if pat is None:
        return None
    if cfg.budget_placement == "user_prefix":
        return re.compile(r"\A" + pat.pattern + r"\n\n")
    if cfg.budget_placement == "user_suffix":
        return re.compile(r"\n\n" + pat.pattern + r"\Z")
    return re.compile(r"(?:\A|\n)" + pat.pattern + r"\Z")


def parse_budget(cfg: FormatConfig, messages) -> Optional[int]:
    """The budget stated in a prompt (a list of chat messages, or a plain string), or None when
    the prompt states none in ``cfg``'s wording and placement."""
    pat = _anchored(cfg)
    if pat is None:
        raise RecipeError(f"format.budget_template {cfg.budget_template!r} does not state the budget as a number")
    if isinstance(messages, str):
        texts = [messages]
    else:
        role = "system" if cfg.budget_placement == "system" else "user"
        texts = [str(m.get("content", "")) for m in messages or [] if isinstance(m, dict) and m.get("role") == role]
    for text in texts:
        m = pat.search(text)
        if m:
            return int(m.group(1))
    return None


def check_round_trip(cfg: FormatConfig, key: str = "format.budget_template") -> None:
    """A recipe error unless every budget reads back from the prompt it was written into."""
    if _line_pattern(cfg.budget_template) is None:
        raise RecipeError(f"{key}: the template must state the budget once as a whole number ({{{{ budget }}}}), "
                          f"so the reward and eval can read it back; it renders {budget_line(cfg, 512)!r}")
    for b in (1, 7, 64, 500, 4096, 100000):
        got = parse_budget(cfg, prompt_messages(cfg, "What is 6 x 7?", b))
        if got != b:
            raise RecipeError(f"{key}: a prompt stating budget {b} reads back as {got}; the budget line must not "
                              "depend on the budget except through the number itself")


def prompt_messages(cfg: FormatConfig, question: str, budget: Optional[int]) -> list[dict[str, str]]:
    user = render(cfg.question_template, question=question)
    system = cfg.system_prompt
    if budget is not None:
        line = budget_line(cfg, budget)
        if cfg.budget_placement == "system":
            system = f"{system}\n{line}" if system else line
        elif cfg.budget_placement == "user_prefix":
            user = f"{line}\n\n{user}"
        else:
            user = f"{user}\n\n{line}"
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


MESSAGES_DTYPE = pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8}))


def messages_column(cfg, questions, budgets, reasonings=None, responses=None, tags: ThinkTags = THINK) -> pl.Series:
    """The ``messages`` (or RL ``prompt``) column: ``prompt_messages`` per row, plus the assistant
    turn ``format_think(reasoning, response, tags)`` when reasonings are given (``tags``: the
    recipe's ``student.think_tags``).

    Templates that only substitute their variable (the defaults, and most in practice) are
    rendered as column-wise string concatenation, with the same result as jinja2 row by row
    (which costs ~10 us a row and a Python list of dicts per row at a million rows); any other
    template goes through ``prompt_messages`` row by row.
    """
    fast = _messages_fast(cfg, questions, budgets, reasonings, responses, tags)
    if fast is not None:
        return fast
    questions, budgets = _as_list(questions), _as_list(budgets)
    reasonings, responses = _as_list(reasonings), _as_list(responses)
    rows = []
    for i, (q, b) in enumerate(zip(questions, budgets)):
        msgs = prompt_messages(cfg, q, b)
        if reasonings is not None:
            msgs = msgs + [{"role": "assistant", "content": format_think(reasonings[i], responses[i], tags)}]
        rows.append(msgs)
    return pl.Series(rows, dtype=MESSAGES_DTYPE)


def _as_list(v):
    return v.to_list() if isinstance(v, pl.Series) else v


def _template_parts(template: str, var: str) -> Optional[list]:
    """The template as a list of literal strings and ``None`` (= the variable ``var``) when it is
    nothing but text and bare ``{{ var }}`` outputs; else None (render it with jinja2)."""
    import jinja2.nodes as n

    try:
        body = ENV.parse(template).body
    except Exception:
        return None
    parts: list = []
    for node in body:
        if not isinstance(node, n.Output):
            return None
        for x in node.nodes:
            if isinstance(x, n.TemplateData):
                parts.append(x.data)
            elif isinstance(x, n.Name) and x.name == var and x.ctx == "load":
                parts.append(None)
            else:
                return None
    return parts


def _fill(parts: list, value: pl.Expr) -> pl.Expr:
    return pl.concat_str([value if p is None else pl.lit(p, pl.Utf8) for p in parts] or [pl.lit("", pl.Utf8)])


def _messages_fast(cfg, questions, budgets, reasonings, responses, tags: ThinkTags = THINK) -> Optional[pl.Series]:
    q_parts = _template_parts(cfg.question_template, "question")
    b_parts = _template_parts(cfg.budget_template, "budget")
    if q_parts is None or b_parts is None:
        return None
    cols = {
        "q": pl.Series(questions, dtype=pl.Utf8),
        # render(budget=int(b)): the decimal integer; rows without a budget get no budget line.
        "b": (budgets if isinstance(budgets, pl.Series) else pl.Series(budgets)).cast(pl.Int64),
    }
    if reasonings is not None:
        cols["r"] = pl.Series(reasonings, dtype=pl.Utf8)
        cols["s"] = pl.Series(responses, dtype=pl.Utf8)
    df = pl.DataFrame(cols)
    # Jinja2 and f-strings write None as "None".
    user = _fill(q_parts, pl.col("q").fill_null("None"))
    has_b = pl.col("b").is_not_null()
    line = _fill(b_parts, pl.col("b").cast(pl.Utf8))
    sp = cfg.system_prompt
    if cfg.budget_placement == "system":
        with_line = pl.concat_str([pl.lit(sp + "\n"), line]) if sp else line
        system = pl.when(has_b).then(with_line).otherwise(pl.lit(sp if sp else None, pl.Utf8))
    else:
        system = pl.lit(sp if sp else None, pl.Utf8)
        if cfg.budget_placement == "user_prefix":
            user = pl.when(has_b).then(pl.concat_str([line, pl.lit("\n\n"), user])).otherwise(user)
        else:
            user = pl.when(has_b).then(pl.concat_str([user, pl.lit("\n\n"), line])).otherwise(user)
    # Whether a row has a system message depends only on whether it has a budget (the template
    # parts are fixed): when all rows have a budget, or none has, every row has the same turns
    # and the list is built without null placeholders (no drop_nulls pass over the text).
    line_nonempty = any(p is None or p for p in b_parts)
    if cfg.budget_placement == "system":
        sys_with_b, sys_without_b = bool(sp) or line_nonempty, bool(sp)
    else:
        sys_with_b = sys_without_b = bool(sp)
    n_b = int(df["b"].is_not_null().sum())
    uniform = sys_with_b == sys_without_b or n_b in (0, df.height)
    think = None
    if reasonings is not None:
        before, between, after = think_layout(tags)
        think = pl.concat_str([pl.lit(before), pl.col("r").fill_null("None"), pl.lit(between),
                               pl.col("s").fill_null("None"), pl.lit(after)])
    if not uniform:
        msgs = [pl.when(system.is_not_null() & (system != "")).then(pl.struct(role=pl.lit("system"), content=system)),
                pl.struct(role=pl.lit("user"), content=user)]
        if think is not None:
            msgs.append(pl.struct(role=pl.lit("assistant"), content=think))
        out = df.with_columns(pl.concat_list(msgs).list.drop_nulls().alias("_m"))["_m"]
        return (out if out.dtype == MESSAGES_DTYPE else out.cast(MESSAGES_DTYPE)).alias("")
    has_sys = sys_with_b if n_b else sys_without_b
    turns = ([("system", system)] if has_sys else []) + [("user", user)] + ([("assistant", think)] if think is not None else [])
    roles = [r for r, _ in turns]
    # A list of the turns' texts per row, then each element paired with its role by position
    # (concat_list over struct columns is ~10x slower).
    # with_columns, not select: a template without the variable makes an all-literal expression,
    # which must still give one value per row.
    role = pl.int_range(pl.len()).replace_strict(list(range(len(roles))), roles, return_dtype=pl.Utf8)
    texts = df.with_columns(pl.concat_list([c.cast(pl.Utf8) for _, c in turns]).alias("_t"))["_t"]
    out = texts.to_frame().select(pl.col("_t").list.eval(pl.struct(role=role, content=pl.element())))["_t"]
    return (out if out.dtype == MESSAGES_DTYPE else out.cast(MESSAGES_DTYPE)).alias("")
