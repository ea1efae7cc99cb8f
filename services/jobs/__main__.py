"""`python -m services.jobs`: the jobs service on its own."""

from services.jobs.component import JobsComponent
from services.kit.runtime import main

if __name__ == "__main__":
    main([JobsComponent], "jobs")
