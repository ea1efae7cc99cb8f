"""`python -m services.datasets`: the datasets service on its own."""

from services.datasets.component import DatasetsComponent
from services.kit.runtime import main

if __name__ == "__main__":
    main([DatasetsComponent], "datasets")
