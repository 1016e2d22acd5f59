"""Data: `splits` (a data set by name -> seeded few-shot train/val/test splits), `dataset` (items with seeded
per-item augmentation), `loader` (the loaders the trainer and the commands use), `bundled` (data sets shipped in
packages), `prepare` (official releases -> image folders)."""
