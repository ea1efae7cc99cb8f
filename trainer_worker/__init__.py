"""TuneForge trainer worker: an agent that pulls jobs from NATS and recipes that train them."""
