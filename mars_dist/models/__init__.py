"""Models: `factory` (timm and Hugging Face classifiers by name, pretrained weights, introspection), `placement`
(where parameters are created: whole, or partitioned by the launcher), `hf_partitioned` (Hugging Face models built
partitioned), `export` (what a run leaves for timm / transformers to load alone). Nothing here knows about processes."""
