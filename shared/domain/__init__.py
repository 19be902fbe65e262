"""The domain: authorizations (never a raw token), what notifications tell us about them, the merchant
events and the rules that decide when one is due, and the merchant registry.

Layer 2: imports errors, config and observability only.
"""
