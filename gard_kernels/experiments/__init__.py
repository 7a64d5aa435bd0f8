"""The engine of the `gard` command line, one job per file. Import the submodules directly (they
pull in transformers / peft / matplotlib only when used).

    presets.py      the method registry (`gard`, the paper's two, the selection candidates,
                    the baselines; legacy names accepted but not listed)
    method.py       the interface every method implements (documented there)
    gard_method.py  GARD as a method; baselines/ one file per baseline (uniform, GoRA, EVA, AdaLoRA)
    settings.py     TrainSettings and GardSettings: what a comparison sets for all of its runs
    data.py         corpora, topic splits, packed blocks; models.py: loading models
    evaluation.py   the training loss and perplexity; runner.py: the training loop
    metrics.py      metrics.json of one run; io.py: JSON, fingerprints, run loaders
    workspace.py    what a grid's runs share; compare.py: grids, sweeps, whole comparisons
    stats.py        aggregates and tables; plots.py: figures; speed.py: precision modes
    module_names.py what an adapted module's name says (its transformer block)
"""
