"""orbax checkpoints of adapter trees (and banks), with a job-level writer lock."""
