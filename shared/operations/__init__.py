"""Operations on authorizations that the command line and the internal API share, in one implementation:
finding one by any of its keys, revoking it, handing out its access token (refreshed first when it is about
to expire), and waiting for a command's outcome.

Layer 4: imports the layers below it (messaging, store and what they use); the API and the command line
import it, the ingress and the workers never do.
"""
