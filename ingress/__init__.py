"""The HTTP ingress Alipay talks to: verify, publish with confirms, then answer (``authnotify ingress``).

Layer 4: imports the layers below it, never the workers or the command line.
"""
