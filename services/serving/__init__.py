"""Serving: a finished job's model behind an OpenAI-compatible chat-completions endpoint
(DeploymentService)."""
