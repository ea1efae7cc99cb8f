"""`python -m services.metrics`: the metrics service on its own."""

from services.kit.runtime import main
from services.metrics.component import MetricsComponent

if __name__ == "__main__":
    main([MetricsComponent], "metrics")
