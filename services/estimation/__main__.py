"""`python -m services.estimation`: the estimation service on its own."""

from services.estimation.component import EstimationComponent
from services.kit.runtime import main

if __name__ == "__main__":
    main([EstimationComponent], "estimation")
