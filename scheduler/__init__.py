"""The lifecycle scheduler (``authnotify scheduler``): finds due refreshes, expiries and expiry warnings in
the database and publishes them with confirms. Safe with several replicas.

Layer 4: imports the layers below it, never the other services or the command line.
"""
