"""Layer 2: orchestration (synth, ingest, train, tune, inference, evaluate, predict, visualize, export, report)."""
