"""Training: the loop (trainer.py), processes and sharding (distributed.py), optimisers and schedules
(optim.py). Checkpoints and the device live at the package level: eval, generate and export use them too."""
