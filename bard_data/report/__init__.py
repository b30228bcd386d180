"""Reading built data: DuckDB views (``sql``), the shipped queries (``catalog``), the report and
plots (``stats``), the dataset card (``card``), export and push (``publish``), and what a published
dataset says about how it was built (``published``)."""
