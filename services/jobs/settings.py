"""Settings of the jobs service: the kit's TUNEFORGE_* settings plus what CreateJob admits."""

from __future__ import annotations

from tuneforge_core.settings import KitSettings


class JobSettings(KitSettings):
    # TUNEFORGE_ALLOW_USER_REWARD_CODE: admit GRPO jobs whose reward function is code written by the user.
    # Off by default; workers have their own switch (TUNEFORGE_WORKER_ALLOW_USER_REWARD_CODE) and refuse
    # such jobs unless it is on too.
    allow_user_reward_code: bool = False
