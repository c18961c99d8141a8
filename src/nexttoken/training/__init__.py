"""Training: the LightningModule and what runs around it (optimizer groups and their audit, callbacks
for throughput, threads, phases and non-finite steps, the start summary, progress and report)."""
