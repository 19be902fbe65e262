"""Alipay, as both providers (AMS and Alipay+) speak it: the RSA256 signature scheme, the notifications
(paths, types and field rules) and the client for Alipay's gateway (``applyToken``).

Layer 2: imports errors, config and observability only.
"""
