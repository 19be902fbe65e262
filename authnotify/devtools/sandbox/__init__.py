"""Fakes of the outside world (Alipay gateway, merchant endpoint) for tests and ``authnotify dev``."""
