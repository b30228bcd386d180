"""The ``sft`` table: filtered compressions balanced toward the target budget distribution, mixed
with standard (no-budget) chains, in TRL's conversational format (``messages``)."""

from __future__ import annotations

import shutil
from typing import Iterator

import polars as pl

from bard_data.budget.balance import balance, balance_report_empty, balance_table, compute_edges, mix_standard
from bard_data.budget.statement import messages_column
from bard_data.config.stages import FormatConfig
from bard_data.pipeline.gather import gather, slice_bounds
from bard_data.pipeline.stage import ShardResult, Stage, concat_excluded

SFT_COLUMNS = ["messages", "budget", "budget_bin", "kind", "problem_id", "source", "sample_id", "compression_id",
               "group_id", "copy_index"]
# Text per part of the sft table (bytes of question, reasoning and response): messages are built
# and written a slice of the rows at a time, so memory stays bounded at any scale. A part is built
# while the ones before it are written (two at most, pipeline.build), so several parts' worth of
# text is in memory at the peak (text, messages, the frames being written, their encoders').
SFT_SHARD_BYTES = 16 << 20
# Text per batch of messages built within a part: building copies its text a few times over.
MESSAGE_BYTES = 4 << 20

GOLD_TEXT = ("question", "reasoning", "response")
# Locators of each row's text (``pipeline.gather``): g, the gold chain (question and response);
# r, its reasoning (the compression's for budget rows, the gold chain's for standard rows).
LOCATORS = ["g_file", "g_row", "r_file", "r_row"]


def _text_sources(store) -> dict:
    gold, comps = store.parts("gold_chains"), store.parts("compressions")
    return {"g": {p: {"question": "question", "response": "response"} for p in gold},
            "r": {**{p: {"reasoning": "compressed_reasoning"} for p in comps},
                  **{p: {"reasoning": "reasoning"} for p in gold}}}


class SFTStage(Stage):
    name = "sft"
    reads = ("gold_chains", "compressions", "filtered_compressions")
    sections = ("balance", "format.budget_template", "format.budget_placement", "format.question_template",
                "format.system_prompt", "student.think_tags", "seed")

    def run(self, ctx) -> Iterator[ShardResult]:
        """Balancing and the standard mix run on the rows without their text (a locator, part
        file and row number, stands for it); the text is then gathered in the table's order on
        disk (``pipeline.gather``) and read back a slice of rows at a time while their messages
        are built, each slice a part of the table, so memory does not grow with text length.
        Excluded rows carry no text: it stays in gold_chains and compressions, joinable on
        sample_id and compression_id."""
        r = ctx.recipe
        fmt: FormatConfig = r.format
        store = ctx.store
        gold = store.read("gold_chains", [c for c in store.columns("gold_chains") if c not in GOLD_TEXT], locators="g")
        comps = store.read("filtered_compressions") if store.exists("filtered_compressions") else pl.DataFrame()
        rows_in = comps.height + gold.height
        excluded = []
        budget_plan = pl.DataFrame()
        report = balance_report_empty()
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
                cidx = store.read("compressions", ["compression_id"], locators="r")
                # The compression's text and the gold chain's (by locator) and source.
                budget_plan = (kept.join(cidx, on="compression_id", how="left", maintain_order="left")
                               .join(gold.select("sample_id", "g_file", "g_row", "source"), on="sample_id",
                                     how="left", maintain_order="left"))
                budget_plan = budget_plan.select(
                    "budget", "budget_bin", pl.lit("budget").alias("kind"), "problem_id", "source", "sample_id",
                    "compression_id", "group_id", "copy_index", *LOCATORS)
        n_budget = budget_plan.height
        std, std_dropped = mix_standard(n_budget, gold, r.balance.standard_ratio, r.seed) if n_budget else (gold, None)
        excluded.append(std_dropped.drop("g_file", "g_row") if std_dropped is not None else None)
        std_plan = std.select(
            pl.lit(None, pl.Int64).alias("budget"), pl.lit(None, pl.Utf8).alias("budget_bin"),
            pl.lit("standard").alias("kind"), "problem_id", "source", "sample_id",
            pl.lit(None, pl.Utf8).alias("compression_id"), pl.lit(None, pl.Utf8).alias("group_id"),
            pl.lit(0).alias("copy_index"), "g_file", "g_row", pl.col("g_file").alias("r_file"),
            pl.col("g_row").alias("r_row"))
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
        scratch = store.scratch_dir(self.name)
        try:
            text = gather(plan.select(LOCATORS), _text_sources(store), SFT_SHARD_BYTES, scratch)
            plan = plan.drop(LOCATORS)
            # Part 0 carries the stage's input count, additions, excluded rows and the report; the
            # others only their output rows (the funnel adds parts up).
            for i, ((a, b), texts) in enumerate(zip(text.bounds, text.slices())):
                batches = [self._slice(fmt, plan.slice(a + c, d - c), texts.slice(c, d - c), r.student.think_tags)
                           for c, d in slice_bounds(text.row_bytes[a:b], MESSAGE_BYTES)]
                del texts
                # One chunk, as one pass built it: Polars writes a row group per large chunk, so
                # the part's file is then byte for byte what the in-memory stage wrote.
                rows = pl.concat(batches, how="vertical_relaxed", rechunk=True)
                del batches
                if i == 0:
                    first.kept, rows = rows, None
                    out, first = first, None  # the runner owns a part once yielded: hold no reference
                else:
                    out, rows = ShardResult(kept=rows, rows_in=0), None
                yield out
                del out
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @staticmethod
    def _slice(fmt, plan: pl.DataFrame, texts: pl.DataFrame, tags) -> pl.DataFrame:
        """The sft rows of one slice of the plan, messages built from its gathered text (assistant
        turns in the recipe's think-tag convention, whatever convention the trace came in)."""
        out = []
        plan = pl.concat([plan, texts], how="horizontal")
        for kind, part in ((k, plan.filter(pl.col("kind") == k)) for k in ("budget", "standard")):
            if not part.height:
                continue
            budget = part["budget"] if kind == "budget" else pl.Series([None] * part.height, dtype=pl.Int64)
            msgs = messages_column(fmt, part["question"], budget, part["reasoning"], part["response"], tags)
            out.append(part.with_columns(msgs.alias("messages")).select(SFT_COLUMNS))
        if len(out) == 2:  # a slice where the budget rows end: keep the plan's order
            sft = pl.concat(out, how="vertical_relaxed")
        else:
            sft = out[0]
        return sft.with_columns(pl.col("budget").cast(pl.Int64))
