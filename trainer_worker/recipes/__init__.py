"""Training recipes: one readable file per method, run by ``trainer_worker.train``."""
