"""The HTTP ingress Alipay talks to: verify, publish with confirms, then answer."""
