"""Benchmarks, each printing ratios against a reference run in the same process.

    python -m diffbackbone.bench             our extractor vs plain diffusers (`speed`; `--profile`: where time goes)
    python -m diffbackbone.bench.store_speed the feature store at dataset scale: memory, pipeline vs model-only rate
    python -m diffbackbone.bench.cost        FLOPs, parameters and the activation peak of a model at its native size
    python -m diffbackbone.bench.train_step  one clean-train optimizer step
    python -m diffbackbone.bench.coldstart   import to first feature, ours vs the reference loader, in fresh processes
"""
