"""The consumers: one handler module per consumer, the registry that names them, and the process that
runs them (``authnotify worker``).

Layer 4: imports the layers below it, never the ingress or the command line.
"""
