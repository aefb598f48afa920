"""Running the stages: the Stage contract and the shards the executor runs (contract), and the run function of
each stage of pipeline's table (answering, probing, importer, resample, flagged)."""
