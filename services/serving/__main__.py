"""`python -m services.serving`: the serving service on its own (it calls the jobs service at
TUNEFORGE_JOBS_ADDRESS)."""

from services.kit.runtime import main
from services.serving.component import ServingComponent

if __name__ == "__main__":
    main([ServingComponent], "serving")
