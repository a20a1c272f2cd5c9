"""Training: WIDER-format labels, augmentation, anchor matching and the multi-task loss, and one
training loop (checkpoints, resume, logs, DistributedDataParallel) shared by every trainer."""
