"""The two training tables: ``sft`` (filtered, balanced, mixed with standard chains, in TRL's
conversational format) and ``rl`` (GRPO prompts with a budget, the gold answer and difficulty)."""

from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import polars as pl
from pydantic import Field

from bard_data.llm.config import Strict
from bard_data.prompts import render
from bard_data.reasoning import format_think
from bard_data.stages.base import BackgroundWriter, ShardResult, Stage, concat_excluded, excluded_rows

DEFAULT_BUDGET_TEMPLATE = "Thinking budget: {{ budget }} tokens."
DEFAULT_QUESTION_TEMPLATE = "{{ question }}\n\nPlease reason step by step, and put your final answer within \\boxed{}."


class RLConfig(Strict):
    difficulty_min: float = Field(0.0, ge=0, le=1, description="keep prompts with teacher pass rate >= this")
    difficulty_max: float = Field(1.0, ge=0, le=1, description="... and <= this (the paper drops trivial ones)")
    keep_unknown_difficulty: bool = Field(True, description="problems with no teacher samples (no pass rate)")


class FormatConfig(Strict):
    budget_template: str = Field(DEFAULT_BUDGET_TEMPLATE, description="jinja2 with `budget`: how the budget is stated")
    budget_placement: Literal["system", "user_prefix", "user_suffix"] = "system"
    question_template: str = Field(DEFAULT_QUESTION_TEMPLATE, description="jinja2 with `question`")
    system_prompt: Optional[str] = Field(None, description="a system prompt for every row (the budget line is appended)")
    require_within_tolerance: bool = Field(True, description="drop compressions that missed the budget tolerance (over_budget)")
    rl: RLConfig = Field(default_factory=RLConfig)


def prompt_messages(cfg: FormatConfig, question: str, budget: Optional[int]) -> list[dict[str, str]]:
    user = render(cfg.question_template, question=question)
    system = cfg.system_prompt
    if budget is not None:
        line = render(cfg.budget_template, budget=int(budget))
        if cfg.budget_placement == "system":
            system = f"{system}\n{line}" if system else line
        elif cfg.budget_placement == "user_prefix":
            user = f"{line}\n\n{user}"
        else:
            user = f"{user}\n\n{line}"
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


MESSAGES_DTYPE = pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8}))


def _messages_column(cfg, questions, budgets, reasonings=None, responses=None) -> pl.Series:
    """The ``messages`` (or RL ``prompt``) column: ``prompt_messages`` per row, plus the assistant
    turn ``format_think(reasoning, response)`` when reasonings are given.

    Templates that only substitute their variable (the defaults, and most in practice) are
    rendered as column-wise string concatenation, with the same result as jinja2 row by row
    (which costs ~10 us a row and a Python list of dicts per row at a million rows); any other
    template goes through ``prompt_messages`` row by row.
    """
    fast = _messages_fast(cfg, questions, budgets, reasonings, responses)
    if fast is not None:
        return fast
    questions, budgets = _as_list(questions), _as_list(budgets)
    reasonings, responses = _as_list(reasonings), _as_list(responses)
    rows = []
    for i, (q, b) in enumerate(zip(questions, budgets)):
        msgs = prompt_messages(cfg, q, b)
        if reasonings is not None:
            msgs = msgs + [{"role": "assistant", "content": format_think(reasonings[i], responses[i])}]
        rows.append(msgs)
    return pl.Series(rows, dtype=MESSAGES_DTYPE)


def _as_list(v):
    return v.to_list() if isinstance(v, pl.Series) else v


def _template_parts(template: str, var: str) -> Optional[list]:
    """The template as a list of literal strings and ``None`` (= the variable ``var``) when it is
    nothing but text and bare ``{{ var }}`` outputs; else None (render it with jinja2)."""
    import jinja2.nodes as n

    from bard_data.prompts import _ENV

    try:
        body = _ENV.parse(template).body
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


def _messages_fast(cfg, questions, budgets, reasonings, responses) -> Optional[pl.Series]:
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
        think = pl.concat_str([pl.lit("<think>\n"), pl.col("r").fill_null("None"), pl.lit("\n</think>\n\n"),
                               pl.col("s").fill_null("None")])
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


def filter_compressions(comps: pl.DataFrame, judgments: Optional[pl.DataFrame], require_within: bool):
    """Keep compressions that preserved the answer, met the budget and passed the judge."""
    excluded = []
    bad = comps.filter(~pl.col("answer_preserved"))
    excluded.append(excluded_rows(bad, "answer_changed", pl.format("predicted {} gold {}", "predicted_answer", "gold_answer")))
    comps = comps.filter(pl.col("answer_preserved"))
    if require_within:
        bad = comps.filter(~pl.col("within_tolerance"))
        excluded.append(excluded_rows(bad, "over_budget", pl.format("deviation {}", pl.col("deviation").round(3))))
        comps = comps.filter(pl.col("within_tolerance"))
    if judgments is not None:
        j = judgments.select("compression_id", "verdict", "score", "parse_error")
        comps = comps.join(j, on="compression_id", how="left")
        reason = (
            pl.when(pl.col("verdict").is_null()).then(pl.lit("judge_error"))
            .when(pl.col("verdict") == "unparsable").then(pl.lit("judge_unparsable"))
            .when(pl.col("verdict") != "pass").then(pl.lit("judge_rejected"))
        )
        comps = comps.with_columns(reason.alias("_r"))
        excluded.append(excluded_rows(comps.filter(pl.col("_r").is_not_null()), pl.col("_r"),
                                      pl.format("verdict {} score {}", "verdict", "score")).drop("_r"))
        comps = comps.filter(pl.col("_r").is_null()).drop("_r", "verdict", "score", "parse_error")
    return comps, concat_excluded(*excluded)


SFT_COLUMNS = ["messages", "budget", "budget_bin", "kind", "problem_id", "source", "sample_id", "compression_id",
               "group_id", "copy_index"]
# Text per part of the sft table (bytes of question, reasoning and response): messages are built
# and written a slice of the rows at a time, so memory stays bounded at any scale.
SFT_SHARD_BYTES = 64 << 20


def _split_text(df: pl.DataFrame, text: list[str], idx: str) -> tuple[pl.DataFrame, dict[str, pl.Series]]:
    """``df`` without its text columns plus a row index ``idx`` (what filters, joins and sorts
    carry), and the text columns (gathered by ``idx`` for the rows that need them)."""
    text = [c for c in text if c in df.columns]
    return df.drop(text).with_row_index(idx), {c: df[c] for c in text}


def _put_text(df: Optional[pl.DataFrame], texts: dict[str, pl.Series], idx: str, order: list[str]) -> Optional[pl.DataFrame]:
    """Put the text columns back (by ``idx``) where they were in ``order``; columns ``df`` has
    beyond ``order`` follow. Rows without ``idx`` (null) get null text."""
    if df is None or idx not in df.columns:
        return df
    df = df.with_columns(*(texts[c].gather(df[idx]).alias(c) for c in texts)).drop(idx)
    first = [c for c in order if c in df.columns]
    return df.select(first + [c for c in df.columns if c not in first])


def _slice_bounds(plan: pl.DataFrame, gtext: dict, ctext: dict, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of ``plan`` holding about ``max_bytes`` of text each (the question
    and response of the gold chain, and the compressed or the gold reasoning)."""
    def text_len(texts: dict, col: str, idx: str) -> np.ndarray:
        if col not in texts:
            return np.zeros(plan.height, dtype=np.int64)
        n = texts[col].str.len_bytes().fill_null(0).cast(pl.Int64)
        return n.gather(plan[idx]).fill_null(0).to_numpy()

    budget = (plan["kind"] == "budget").to_numpy()
    size = (text_len(gtext, "question", "_gi") + text_len(gtext, "response", "_gi")
            + np.where(budget, text_len(ctext, "compressed_reasoning", "_ci"), text_len(gtext, "reasoning", "_gi")))
    cut = np.cumsum(size) // max(max_bytes, 1)
    starts = [0] + (np.flatnonzero(np.diff(cut)) + 1).tolist()
    return list(zip(starts, starts[1:] + [plan.height]))


class SFTStage(Stage):
    table = "sft"
    requires = ("gold_chains",)

    def run(self, ctx) -> None:
        """Filters, balancing and the standard mix run on the rows without their text (a row
        index stands for it); the text is gathered back for the excluded rows, and for the kept
        rows a slice at a time while their messages are built, each slice written as a part."""
        from bard_data.balance import balance, compute_edges, mix_standard

        r = ctx.recipe
        fmt: FormatConfig = r.format
        store = ctx.store
        gold_full = store.read("gold_chains")
        gold_order = gold_full.columns
        gold, gtext = _split_text(gold_full, ["question", "reasoning", "response"], "_gi")
        del gold_full
        have_comps = r.compression is not None and store.exists("compressions")
        comps_full = store.read("compressions") if have_comps else pl.DataFrame()
        comp_order = comps_full.columns
        comps, ctext = _split_text(comps_full, ["compressed_reasoning"], "_ci") if comps_full.height else (comps_full, {})
        del comps_full
        rows_in = comps.height + gold.height
        judgments = store.read("judgments") if r.judge is not None and store.exists("judgments") else None
        excluded = []
        budget_plan = pl.DataFrame()
        report: dict = {}
        if comps.height:
            # Bin edges come from every scheduled budget, before filtering: the target covers
            # the whole range the recipe asked for, and bins where the filters left little
            # show up as thin instead of vanishing from the histogram.
            bal_cfg = r.balance.model_copy(update={"edges": compute_edges(comps["budget"], r.balance)})
            comps, ex = filter_compressions(comps, judgments, fmt.require_within_tolerance)
            judgments = None
            excluded.append(_put_text(ex, ctext, "_ci", comp_order))
            kept, dropped, report = balance(comps, bal_cfg, r.seed)
            excluded.append(_put_text(dropped, ctext, "_ci", comp_order))
            # The gold chain's question and response (by row index) and source.
            budget_plan = kept.join(gold.select("sample_id", "_gi", "source"), on="sample_id", how="left",
                                    maintain_order="left")
            if "copy_index" not in budget_plan.columns:
                budget_plan = budget_plan.with_columns(pl.lit(0).alias("copy_index"))
            budget_plan = budget_plan.select(
                "budget", "budget_bin", pl.lit("budget").alias("kind"), "problem_id", "source", "sample_id",
                "compression_id", "group_id", "copy_index", "_ci", "_gi")
        n_budget = budget_plan.height
        std, std_dropped = mix_standard(n_budget, gold, r.balance.standard_ratio, r.seed) if n_budget else (gold, None)
        excluded.append(_put_text(std_dropped, gtext, "_gi", gold_order))
        std_plan = std.select(
            pl.lit(None, pl.Int64).alias("budget"), pl.lit(None, pl.Utf8).alias("budget_bin"),
            pl.lit("standard").alias("kind"), "problem_id", "source", "sample_id",
            pl.lit(None, pl.Utf8).alias("compression_id"), pl.lit(None, pl.Utf8).alias("group_id"),
            pl.lit(0).alias("copy_index"), pl.lit(None, pl.UInt32).alias("_ci"), "_gi")
        # Upsampled copies share a compression_id; copy_index tells them apart.
        frames = [f for f in (budget_plan, std_plan) if f.height]
        added = int(budget_plan["copy_index"].gt(0).sum()) if n_budget else 0
        excluded = concat_excluded(*excluded)
        del comps, gold, std, std_dropped
        if not frames:
            sft = pl.DataFrame(schema={c: pl.Utf8 for c in SFT_COLUMNS}).with_columns(pl.col("budget").cast(pl.Int64))
            self._write(store, [sft], 1, excluded, rows_in, added, report)
            return
        plan = pl.concat(frames, how="vertical_relaxed")
        del frames, budget_plan, std_plan
        bounds = _slice_bounds(plan, gtext, ctext, SFT_SHARD_BYTES)
        slices = (self._slice(fmt, plan.slice(a, b - a), gtext, ctext) for a, b in bounds)
        self._write(store, slices, len(bounds), excluded, rows_in, added, report)

    @staticmethod
    def _slice(fmt, plan: pl.DataFrame, gtext: dict, ctext: dict) -> pl.DataFrame:
        """The sft rows of one slice of the plan, messages built from the gathered text."""
        out = []
        for kind, part in ((k, plan.filter(pl.col("kind") == k)) for k in ("budget", "standard")):
            if not part.height:
                continue
            gi = part["_gi"]
            q, resp = gtext["question"].gather(gi), gtext["response"].gather(gi)
            if kind == "budget":
                reasoning = ctext["compressed_reasoning"].gather(part["_ci"])
                msgs = _messages_column(fmt, q, part["budget"], reasoning, resp)
            else:
                msgs = _messages_column(fmt, q, pl.Series([None] * part.height, dtype=pl.Int64),
                                        gtext["reasoning"].gather(gi), resp)
            out.append(part.with_columns(msgs.alias("messages")).select(SFT_COLUMNS))
        if len(out) == 2:  # a slice where the budget rows end: keep the plan's order
            sft = pl.concat(out, how="vertical_relaxed")
        else:
            sft = out[0]
        return sft.with_columns(pl.col("budget").cast(pl.Int64))

    def _write(self, store, slices, n: int, excluded: Optional[pl.DataFrame], rows_in: int, added: int,
               report: dict) -> None:
        """The ``n`` slices as parts 0..n-1 (part 0 with the excluded rows), then the done marker."""
        from bard_data.store import atomic_write_json

        table = self.table
        for i in store.shard_indices(table):
            if i >= n:
                store.remove_shard(table, i)
        total = 0
        with BackgroundWriter() as writer:  # the next slice is built while this one is written
            for i, sft in enumerate(slices):
                total += sft.height
                # Shard 0 carries the stage's input count, additions and excluded rows; the
                # rest only their output rows (the funnel adds shards up).
                if i == 0:
                    funnel = ShardResult(kept=sft, excluded=excluded, rows_in=rows_in, added=added).funnel(table, 0, rows_in)
                    writer.submit(store.write_shard, table, 0, sft, excluded, funnel)
                else:
                    writer.submit(store.write_shard, table, i, sft, None,
                                  ShardResult(kept=sft, rows_in=0).funnel(table, i, 0))
        if n > 1:
            atomic_write_json(store.table_dir(table) / "_layout.json", {"shards": n, "rows": total, "unit": "rows",
                                                                         "shard_bytes": SFT_SHARD_BYTES})
        else:
            (store.table_dir(table) / "_layout.json").unlink(missing_ok=True)
        store.mark_done(table, {"balance": report})


def sample_rl_budgets(problem_ids: list[str], edges: list[int], weights: list[float], seed: int) -> list[int]:
    """A budget per prompt: a bin drawn from the target weights, then log-uniform inside it."""
    if len(edges) < 2:
        return [int(edges[0]) if edges else 512] * len(problem_ids)
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=float)
    w = w / w.sum()
    bins = rng.choice(len(w), size=len(problem_ids), p=w)
    u = rng.random(len(problem_ids))
    lo = np.log(np.asarray(edges[:-1], dtype=float))[bins]
    hi = np.log(np.asarray(edges[1:], dtype=float))[bins]
    return [max(1, int(math.exp(a + (b - a) * x))) for a, b, x in zip(lo, hi, u)]


class RLStage(Stage):
    table = "rl"
    requires = ("problems", "sft")

    def run(self, ctx) -> None:
        from bard_data.stages.gold import all_samples, pass_rates

        r = ctx.recipe
        fmt: FormatConfig = r.format
        problems = ctx.store.read("problems").sort("problem_id")
        samples = all_samples(ctx.store, columns=["problem_id", "is_correct"])  # not the text
        rates = pass_rates(samples).select("problem_id", pl.col("pass_rate").alias("difficulty"))
        df = problems.join(rates, on="problem_id", how="left")
        d = pl.col("difficulty")
        reason = (
            pl.when(d.is_null()).then(pl.lit(None if fmt.rl.keep_unknown_difficulty else "no_teacher_samples"))
            .when(d < fmt.rl.difficulty_min).then(pl.lit("too_hard"))
            .when(d > fmt.rl.difficulty_max).then(pl.lit("too_easy"))
        )
        df = df.with_columns(reason.alias("_r"))
        dropped = excluded_rows(df.filter(pl.col("_r").is_not_null()), pl.col("_r"), pl.format("pass rate {}", d)).drop("_r")
        df = df.filter(pl.col("_r").is_null()).drop("_r")
        report = ctx.store.done_info("sft").get("balance") or {}
        edges = report.get("edges") or [r.compression.budgets.floor if r.compression else 64, 4096]
        target = report.get("target") or {}
        # The report went through JSON with sorted keys: order the weights by the bin labels.
        labels = report.get("labels") or list(target)
        weights = [float(target.get(lab, 0.0)) for lab in labels]
        if len(weights) != len(edges) - 1:
            weights = [1.0] * (len(edges) - 1)
        budgets = sample_rl_budgets(df["problem_id"].to_list(), edges, weights, r.seed)
        rl = df.with_columns(pl.Series("budget", budgets, dtype=pl.Int64)).with_columns(
            _messages_column(fmt, df["question"], budgets).alias("prompt"),
            pl.col("answer").alias("solution"),
        ).select("prompt", "budget", "solution", "difficulty", "source", "problem_id", "split")
        res = ShardResult(kept=rl, excluded=dropped, rows_in=problems.height)
        ctx.store.write_table(self.table, res.kept, res.excluded, res.funnel(self.table, 0, problems.height))
