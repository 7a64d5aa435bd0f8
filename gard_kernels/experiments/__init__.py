"""The engine of the `gard` command line: data, models, methods, the training loop, grids,
statistics and figures. Import the submodules directly (they pull in transformers / peft /
matplotlib only when used)."""
