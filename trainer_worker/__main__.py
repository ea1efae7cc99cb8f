"""``python -m trainer_worker``: run the worker agent."""

from trainer_worker.agent import main

main()
