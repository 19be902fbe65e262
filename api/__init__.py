"""The internal API (``authnotify api``): authorizations, their access tokens and revocations over HTTP for
the payment services, behind API keys with scopes. Never the ingress's listener, never exposed publicly.

Layer 4: imports the layers below it (the shared operations among them), never the other services or the
command line.
"""
