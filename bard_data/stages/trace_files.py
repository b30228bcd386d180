"""Reading a trace file: one loader for the traces stage (one row per trace) and for the problems
stage (``problems_from``: one problem per row, with its gold answer).

Every way a file can disagree with its mapping is a one-line ``DataError`` naming the recipe, the
trace source, the file, the column and the row (0-based, as ``source_row``), raised while the file
is read, before any LLM call: a missing column, a list or a struct where text was expected, a
conversation without an assistant turn, list-valued columns of different lengths in one row, a
correctness flag that is not one (``config.trace_presets.FLAG_WORDS``). A Polars error that still
escapes is turned into one line as well.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import polars as pl

from bard_data.config.sources import TraceColumns, TraceSource
from bard_data.config.think_tags import ThinkTags
from bard_data.config.trace_presets import ASSISTANT_ROLES, FLAG_WORDS, PRESETS, TURN_KEYS, USER_ROLES
from bard_data.errors import DataError
from bard_data.pipeline.io import as_text, meta_json, read_table, require_columns
from bard_data.text.reasoning import think_layout

TEXT_KEYS = ("generation", "reasoning", "response")
LISTABLE = (*TEXT_KEYS, "correct", "model")  # may hold one value per generation
SCALAR = ("question", "answer", "solution")
META_MAX_CHARS = 256  # longer text columns (other traces, solutions) stay out of a problem's meta


@dataclass
class TraceFile:
    src: TraceSource
    where: str  # "<recipe>: traces[<name>] <path>"
    cols: dict[str, Optional[str]]  # columns.<key> -> the file's column (alternatives resolved)
    df: pl.DataFrame  # the file, with ``source_row``

    def error(self, key: str, row: Optional[int], msg: str, item: Optional[int] = None) -> DataError:
        at = "" if row is None else f" row {row}" + ("" if item is None else f" item {item}")
        return DataError(f"{self.where}: column '{self.cols[key]}' (columns.{key}){at}: {msg}")


@contextmanager
def polars_errors(where: str) -> Iterator[None]:
    """Whatever Polars raises while a trace file is handled reaches the user as one line."""
    try:
        yield
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"{where}: {type(exc).__name__}: {first}") from None


def _resolve(df: pl.DataFrame, src: TraceSource, where: str) -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for key in TraceColumns.model_fields:
        spec = getattr(src.columns, key)
        cands = [] if spec is None else [spec] if isinstance(spec, str) else list(spec)
        names = [c for c in cands if c is not None]
        hit = next((c for c in names if c in df.columns), None)
        if hit is None and names and None not in cands:
            via = f", preset {src.preset}" if src.preset else ""
            raise DataError(f"{where}: column {' or '.join(repr(c) for c in names)} (columns.{key}{via}) not in the "
                            f"source; it has: {', '.join(df.columns[:12])}")
        out[key] = hit
    return out


def _kind(dt: pl.DataType) -> str:
    if isinstance(dt, pl.Struct):
        return f"a struct ({', '.join(f.name for f in dt.fields)})"
    if isinstance(dt, (pl.List, pl.Array)):
        return "a list"
    return "text"


def _first_value_row(df: pl.DataFrame, col: str) -> Optional[int]:
    rows = df[col].is_not_null().arg_true()
    return int(df["source_row"][int(rows[0])]) if len(rows) else None


def _check_types(tf: TraceFile) -> None:
    """Text where text belongs, lists only where a trace source may hold one value per generation."""
    for key, col in tf.cols.items():
        if col is None:
            continue
        dt = tf.df.schema[col]
        if key == "conversation":
            inner = dt.inner if isinstance(dt, pl.List) else None
            if not isinstance(inner, pl.Struct):
                raise tf.error(key, _first_value_row(tf.df, col),
                               f"expected a list of turns ({{role, content}} or {{from, value}}), got {_kind(dt)}"
                               + (" of " + _kind(inner) if inner is not None else ""))
            fields = {f.name: f.dtype for f in inner.fields}
            pair = next(((r, c) for r, c in TURN_KEYS if r in fields and c in fields), None)
            if pair is None:
                raise tf.error(key, _first_value_row(tf.df, col), f"turns have the fields {', '.join(fields)}; "
                               "expected {role, content} or {from, value}")
            if isinstance(fields[pair[1]], (pl.List, pl.Struct, pl.Array)):
                raise tf.error(key, _first_value_row(tf.df, col),
                               f"turn '{pair[1]}' is {_kind(fields[pair[1]])} where text was expected")
            continue
        if isinstance(dt, pl.Struct) or (key in SCALAR and isinstance(dt, (pl.List, pl.Array))):
            raise tf.error(key, _first_value_row(tf.df, col), f"{_kind(dt)} where text was expected")
        if isinstance(dt, (pl.List, pl.Array)) and isinstance(dt.inner, (pl.List, pl.Struct, pl.Array)):
            raise tf.error(key, _first_value_row(tf.df, col), f"a list of {_kind(dt.inner)} where a list of text "
                           "(one per generation) was expected")


def read_trace_file(recipe, src: TraceSource) -> TraceFile:
    """The file read and checked against its mapping (columns there, of the right kinds)."""
    path = recipe.resolve(src.path, force=src.format in ("jsonl", "parquet", "datasets"))
    where = f"{recipe.source_file}: traces[{src.name}] {path}"
    try:
        df = read_table(path, src.format, src.limit, src.hub_config, src.hub_split)
    except DataError as exc:  # it names the file (and line); say which trace source too
        raise DataError(f"{recipe.source_file}: traces[{src.name}] {exc}") from None
    if df.height == 0:
        raise DataError(f"{where}: the trace source has no rows")
    with polars_errors(where):
        cols = _resolve(df, src, where)
        require_columns(df, {k: v for k, v in cols.items() if v}, where)  # bytes that are not UTF-8
        tf = TraceFile(src, where, cols, df.with_row_index("source_row"))
        _check_types(tf)
    return tf


def _conversation_turns(tf: TraceFile) -> tuple[list[Optional[str]], list[Optional[str]]]:
    """(question, trace) per row: the last assistant turn and the last user turn before it."""
    col = tf.cols["conversation"]
    inner = tf.df.schema[col].inner
    names = {f.name for f in inner.fields}
    role_k, content_k = next((r, c) for r, c in TURN_KEYS if r in names and c in names)
    questions, traces = [], []
    for row, turns in zip(tf.df["source_row"].to_list(), tf.df[col].to_list()):
        roles = [str(t.get(role_k)) for t in turns or [] if t]
        a = max((i for i, r in enumerate(roles) if r in ASSISTANT_ROLES), default=None)
        if a is None:
            found = ", ".join(dict.fromkeys(roles)) or "none"
            raise tf.error("conversation", row, f"no assistant turn (roles: {found}; an assistant turn has "
                           f"{role_k} {' or '.join(ASSISTANT_ROLES)})")
        u = max((i for i, r in enumerate(roles[:a]) if r in USER_ROLES), default=None)
        turns = [t for t in turns if t]
        questions.append(turns[u].get(content_k) if u is not None else None)
        traces.append(turns[a].get(content_k))
    return questions, traces


def _question(tf: TraceFile) -> tuple[pl.Series, Optional[list]]:
    """The question per file row (without the instruction prefix its preset's set prepends), and
    the conversation's traces when there is a conversation."""
    traces = None
    if tf.cols["conversation"]:
        questions, traces = _conversation_turns(tf)
    if tf.cols["question"]:
        q = tf.df[tf.cols["question"]].cast(pl.Utf8)
    elif traces is None:
        raise DataError(f"{tf.where}: no question: map columns.question (or columns.conversation)")
    else:
        q = pl.Series("question", questions, dtype=pl.Utf8)
    for prefix in PRESETS[tf.src.preset].question_prefixes if tf.src.preset else ():
        q = q.str.strip_chars_start().str.strip_prefix(prefix)
    return q, traces


def _parse_flags(tf: TraceFile, df: pl.DataFrame, listed: bool) -> pl.Series:
    """The source's correctness flags as booleans (null: no flag); anything else is an error."""
    s = df["source_flag"]
    if s.dtype in (pl.Boolean, pl.Null):
        return s.cast(pl.Boolean)
    mapping = {}
    for v in s.drop_nulls().unique().to_list():
        key = str(int(v)) if isinstance(v, (int, float)) and float(v).is_integer() else str(v)
        flag = FLAG_WORDS.get(key.strip().lower())
        if flag is None:
            i = next(j for j, x in enumerate(s.to_list()) if x is not None and (x == v or (x != x and v != v)))
            raise tf.error("correct", int(df["source_row"][i]),
                           f"not a correctness flag: {v!r} (use true/false, yes/no, correct/incorrect or 1/0, any case)",
                           int(df["sample_index"][i]) if listed else None)
        mapping[v] = flag
    return s.replace_strict(mapping, default=None, return_dtype=pl.Boolean) if mapping else s.cast(pl.Boolean)


def _one_per_trace(tf: TraceFile, df: pl.DataFrame) -> tuple[pl.DataFrame, set]:
    """List-valued trace columns: joined (``lists: join``) or exploded in step, one row per trace
    with its ``sample_index``; lists of different lengths in one row are an error."""
    cols = tf.cols
    is_list = {k for k in LISTABLE if cols[k] and isinstance(df.schema[cols[k]], (pl.List, pl.Array))}
    if tf.src.lists == "join":
        bad = next((k for k in ("correct", "model") if k in is_list), None)
        if bad:
            raise tf.error(bad, _first_value_row(df, cols[bad]), "a list, but `lists: join` reads one trace per row")
        df = df.with_columns(pl.col(cols[k]).list.join("\n", ignore_nulls=True) for k in is_list)
        return df.with_columns(pl.lit(0, pl.Int64).alias("sample_index")), set()
    if not is_list:
        return df.with_columns(pl.lit(0, pl.Int64).alias("sample_index")), set()
    primary = next((k for k in (*TEXT_KEYS, "correct", "model") if k in is_list))
    if primary not in TEXT_KEYS:  # one trace per row, but flags or models listed: one item each
        text = next(k for k in TEXT_KEYS if cols[k])
        c = pl.col(cols[primary])
        bad = df.filter(c.is_not_null() & (c.list.len() != 1))
        if bad.height:
            r = bad.row(0, named=True)
            raise tf.error(primary, r["source_row"], f"{len(r[cols[primary]])} item(s) for the one trace in "
                           f"'{cols[text]}' (columns.{text})")
    ref = pl.col(cols[primary])
    for k in sorted(is_list - {primary}, key=LISTABLE.index):
        c = pl.col(cols[k])
        bad = df.filter(c.is_not_null() & ref.is_not_null() & (c.list.len() != ref.list.len()))
        if bad.height:
            r = bad.row(0, named=True)
            raise tf.error(k, r["source_row"], f"{len(r[cols[k]])} item(s) for the {len(r[cols[primary]])} in "
                           f"'{cols[primary]}' (columns.{primary}): list-valued columns must align item by item")
        inner = df.schema[cols[k]].inner
        df = df.with_columns(pl.when(ref.is_null()).then(None)
                             .when(c.is_null()).then(pl.lit(None, inner).repeat_by(ref.list.len())).otherwise(c)
                             .alias(cols[k]))
    names = list(dict.fromkeys(cols[k] for k in is_list))
    df = df.with_columns(pl.int_ranges(ref.list.len()).alias("sample_index")).explode([*names, "sample_index"])
    return df.with_columns(pl.col("sample_index").fill_null(0).cast(pl.Int64)), is_list


def load_traces(recipe, src: TraceSource, tags: ThinkTags) -> pl.DataFrame:
    """One row per trace: question, completion, sample_index, source_row, source_flag, model, origin.
    ``tags``: the convention reasoning/response columns are joined in (the one they are split with)."""
    tf = read_trace_file(recipe, src)
    cols = tf.cols
    given = [k for k in ("generation", "reasoning", "conversation") if cols[k]]
    if len(given) != 1:
        what = "none is mapped" if not given else f"{', '.join('columns.' + k for k in given)} are all mapped"
        raise DataError(f"{tf.where}: a trace source needs exactly one of columns.generation, columns.reasoning "
                        f"(with columns.response) or columns.conversation; {what}")
    with polars_errors(tf.where):
        question, conv = _question(tf)
        df = tf.df.with_columns(question.alias("_question"))
        if conv is not None:
            df = df.with_columns(pl.Series("_conv_trace", conv, dtype=pl.Utf8))
            cols = {**cols, "generation": "_conv_trace"}
            tf = TraceFile(src, tf.where, cols, df)
        df, listed = _one_per_trace(tf, df)
        if cols["generation"]:
            completion = pl.col(cols["generation"]).cast(pl.Utf8)
        else:
            before, between, after = think_layout(tags)
            r = pl.col(cols["reasoning"]).cast(pl.Utf8)
            resp = pl.col(cols["response"]).cast(pl.Utf8) if cols["response"] else pl.lit(None, pl.Utf8)
            completion = (pl.when(r.is_null() & resp.is_null()).then(None)
                          .otherwise(pl.concat_str([pl.lit(before), r.fill_null(""), pl.lit(between),
                                                    resp.fill_null(""), pl.lit(after)])))
        flag = pl.col(cols["correct"]) if cols["correct"] else pl.lit(None, pl.Boolean)
        df = df.with_columns(flag.alias("source_flag"))
        df = df.with_columns(_parse_flags(tf, df, "correct" in listed).alias("source_flag"))
        return df.select(
            pl.col("_question").alias("question"),
            completion.alias("completion"),
            pl.col("sample_index").cast(pl.Int64),
            pl.col("source_row").cast(pl.Int64),
            pl.col("source_flag"),
            (pl.col(cols["model"]).cast(pl.Utf8).fill_null(src.model) if cols["model"] else pl.lit(src.model)).alias("model"),
            pl.lit(f"imported:{src.name}").alias("origin"),
        )


def trace_problems(recipe, src: TraceSource) -> pl.DataFrame:
    """``problems_from``: the file's rows as problems, in the rows ``problems.load_source`` gives.
    The gold answer is ``columns.answer``; where that is missing or empty, the last ``\\boxed{}`` of
    ``columns.solution`` (a short one-line solution is the answer itself)."""
    tf = read_trace_file(recipe, src)
    cols = tf.cols
    if not (cols["answer"] or cols["solution"]):
        via = f" (preset {src.preset} names neither)" if src.preset else ""
        raise DataError(f"{tf.where}: problems_from needs the gold answers: map columns.answer or columns.solution{via}")
    with polars_errors(tf.where):
        question, _ = _question(tf)
        df = tf.df
        ans = as_text(df, cols["answer"]) if cols["answer"] else pl.lit(None, pl.Utf8)
        has_ans = ans.is_not_null() & (ans.str.strip_chars() != "")
        sol = pl.col(cols["solution"]).cast(pl.Utf8) if cols["solution"] else pl.lit(None, pl.Utf8)
        mapped = {c for c in cols.values() if c}
        extra = [c for c, dt in df.schema.items() if c not in mapped and c != "source_row"
                 and not isinstance(dt, (pl.List, pl.Struct, pl.Array)) and not _long_text(df, c)]
        return df.with_columns(question.alias("_question")).select(
            pl.lit(src.name).alias("source"),
            pl.col("source_row").cast(pl.Int64),
            pl.col("_question").alias("question"),
            pl.when(has_ans).then(ans).otherwise(sol).alias("raw_answer"),
            pl.lit("math").alias("domain"),
            pl.lit("train").alias("split"),
            pl.lit(None, pl.Utf8).alias("source_id"),
            meta_json(extra).alias("meta"),
            pl.when(has_ans).then(pl.lit("auto")).otherwise(pl.lit("solution")).alias("answer_format"),
        )


def _long_text(df: pl.DataFrame, col: str) -> bool:
    return df.schema[col] == pl.Utf8 and (df[col].str.len_chars().max() or 0) > META_MAX_CHARS
