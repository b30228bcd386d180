"""Running stages: the stage contract, the run context, the store, funnel records, the manifest,
the executors and the run loop. Knows stages only through the contract (``pipeline.stage``)."""
