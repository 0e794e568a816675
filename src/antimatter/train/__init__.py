"""Training: the loop (trainer.py), what it reports (metrics.py), the model made ready to train from outside
(parallelize.py: fp8, activation checkpointing, DDP / FSDP2, compile), processes and collectives
(distributed.py), optimisers and schedules (optim.py). Checkpoints and the device live at the package level:
eval, generate and export use them too."""
