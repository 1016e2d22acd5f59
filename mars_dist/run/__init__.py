"""One training run: `train` (its phases), `hook` (the projection on the optimizer step), `checkpoint` /
`resume_guard` / `elastic` (saving and resuming, also under another world size or backend), `learned_radii`,
`optim`, `tracking` (W&B + metrics.jsonl), `card` (the export's model card)."""
