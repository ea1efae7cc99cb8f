"""`python -m services.identity`: API keys and the audit log on their own."""

from services.identity.component import IdentityComponent
from services.kit.runtime import main

if __name__ == "__main__":
    main([IdentityComponent], "identity")
