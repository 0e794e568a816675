"""Training: the loop (trainer.py), processes and sharding (distributed.py), optimisers and schedules
(optim.py), atomic checkpoints (checkpoint.py)."""
