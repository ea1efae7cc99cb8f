"""The estimation service: memory, time and cost of a job spec before it runs, from a versioned catalog of
hardware and base models and plain architecture arithmetic (no torch, no downloads)."""
