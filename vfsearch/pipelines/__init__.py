"""Layer 2: orchestration: synth, ingest, train, tune, evaluate, predict, visualize, export,
report and demo, each a function the CLI calls."""
