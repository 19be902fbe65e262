"""Logs, metrics and redaction: what every layer may use to say what happened, without secrets.

Layer 1: imports only :mod:`authnotify.errors`.
"""
