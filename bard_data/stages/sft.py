"""The ``sft`` table: filtered compressions balanced toward the target budget distribution, mixed
with standard (no-budget) chains, in TRL's conversational format (``messages``)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import polars as pl

from bard_data.budget.balance import balance, balance_report_empty, balance_table, compute_edges, mix_standard
from bard_data.budget.statement import messages_column
from bard_data.config.stages import FormatConfig
from bard_data.pipeline.stage import ShardResult, Stage, concat_excluded

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
    name = "sft"
    reads = ("gold_chains", "compressions", "filtered_compressions")
    sections = ("balance", "format.budget_template", "format.budget_placement", "format.question_template",
                "format.system_prompt", "student.think_tags", "seed")

    def run(self, ctx) -> Iterator[ShardResult]:
        """Balancing and the standard mix run on the rows without their text (a row index stands
        for it); the text is gathered a slice of rows at a time while their messages are built,
        each slice a part of the table. Excluded rows carry no text: it stays in gold_chains and
        compressions, joinable on sample_id and compression_id."""
        r = ctx.recipe
        fmt: FormatConfig = r.format
        store = ctx.store
        gold, gtext = _split_text(store.read("gold_chains"), ["question", "reasoning", "response"], "_gi")
        comps = store.read("filtered_compressions") if store.exists("filtered_compressions") else pl.DataFrame()
        rows_in = comps.height + gold.height
        excluded = []
        budget_plan = pl.DataFrame()
        report = balance_report_empty()
        ctext: dict[str, pl.Series] = {}
        kept = comps
        if store.exists("compressions"):
            # Bin edges come from every scheduled budget, before filtering: the target covers
            # the whole range the recipe asked for, and bins where the filters left little
            # show up as thin instead of vanishing from the histogram.
            scheduled = store.read("compressions", columns=["budget"])["budget"]
            if scheduled.len():
                bal_cfg = r.balance.model_copy(update={"edges": compute_edges(scheduled, r.balance)})
                kept, dropped, report = balance(comps, bal_cfg, r.seed)
                excluded.append(dropped)
            if comps.height:
                texts = store.read("compressions", columns=["compression_id", "compressed_reasoning"])
                ctext = {"compressed_reasoning": texts["compressed_reasoning"]}
                cidx = texts.select("compression_id").with_row_index("_ci")
                # The gold chain's question and response (by row index) and source.
                budget_plan = (kept.join(cidx, on="compression_id", how="left", maintain_order="left")
                               .join(gold.select("sample_id", "_gi", "source"), on="sample_id", how="left",
                                     maintain_order="left"))
                budget_plan = budget_plan.select(
                    "budget", "budget_bin", pl.lit("budget").alias("kind"), "problem_id", "source", "sample_id",
                    "compression_id", "group_id", "copy_index", "_ci", "_gi")
        n_budget = budget_plan.height
        std, std_dropped = mix_standard(n_budget, gold, r.balance.standard_ratio, r.seed) if n_budget else (gold, None)
        excluded.append(std_dropped.drop("_gi") if std_dropped is not None else None)
        std_plan = std.select(
            pl.lit(None, pl.Int64).alias("budget"), pl.lit(None, pl.Utf8).alias("budget_bin"),
            pl.lit("standard").alias("kind"), "problem_id", "source", "sample_id",
            pl.lit(None, pl.Utf8).alias("compression_id"), pl.lit(None, pl.Utf8).alias("group_id"),
            pl.lit(0).alias("copy_index"), pl.lit(None, pl.UInt32).alias("_ci"), "_gi")
        # Upsampled copies share a compression_id; copy_index tells them apart.
        added = int(budget_plan["copy_index"].gt(0).sum()) if n_budget else 0
        first = ShardResult(kept=pl.DataFrame(), excluded=concat_excluded(*excluded), rows_in=rows_in, added=added,
                            reports={"balance": balance_table(report)})
        frames = [f for f in (budget_plan, std_plan) if f.height]
        del comps, gold, std, std_dropped, excluded
        if not frames:
            first.kept = pl.DataFrame(schema={c: pl.Utf8 for c in SFT_COLUMNS}).with_columns(pl.col("budget").cast(pl.Int64))
            yield first
            return
        plan = pl.concat(frames, how="vertical_relaxed")
        del frames, budget_plan, std_plan
        # Part 0 carries the stage's input count, additions, excluded rows and the report; the
        # others only their output rows (the funnel adds parts up).
        for i, (a, b) in enumerate(_slice_bounds(plan, gtext, ctext, SFT_SHARD_BYTES)):
            rows = self._slice(fmt, plan.slice(a, b - a), gtext, ctext, r.student.think_tags)
            if i == 0:
                first.kept = rows
                yield first
            else:
                yield ShardResult(kept=rows, rows_in=0)

    @staticmethod
    def _slice(fmt, plan: pl.DataFrame, gtext: dict, ctext: dict, tags) -> pl.DataFrame:
        """The sft rows of one slice of the plan, messages built from the gathered text (assistant
        turns in the recipe's think-tag convention, whatever convention the trace came in)."""
        out = []
        for kind, part in ((k, plan.filter(pl.col("kind") == k)) for k in ("budget", "standard")):
            if not part.height:
                continue
            gi = part["_gi"]
            q, resp = gtext["question"].gather(gi), gtext["response"].gather(gi)
            if kind == "budget":
                reasoning = ctext["compressed_reasoning"].gather(part["_ci"])
                msgs = messages_column(fmt, q, part["budget"], reasoning, resp, tags)
            else:
                msgs = messages_column(fmt, q, pl.Series([None] * part.height, dtype=pl.Int64),
                                        gtext["reasoning"].gather(gi), resp, tags)
            out.append(part.with_columns(msgs.alias("messages")).select(SFT_COLUMNS))
        if len(out) == 2:  # a slice where the budget rows end: keep the plan's order
            sft = pl.concat(out, how="vertical_relaxed")
        else:
            sft = out[0]
        return sft.with_columns(pl.col("budget").cast(pl.Int64))
