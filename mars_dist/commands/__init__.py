"""What `mars-dist` does besides training: `evaluate`, `predict`, `report`, `sweep`, `certify`."""
