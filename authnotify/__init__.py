"""authnotify: Alipay (AMS) and Alipay+ (APS) authorization notifications, from the webhook to the merchant.

One import root over the repository's folders (see ``docs/architecture.md``): ``authnotify.ingress``
(``ingress/``), ``authnotify.workers`` (``workers/``), the layers they share (``shared/``: ``config``,
``observability``, ``alipay``, ``domain``, ``messaging``, ``store``), and on top the command line
(``authnotify.cli``) and the developer tools (``authnotify.devtools``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("authnotify")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"
