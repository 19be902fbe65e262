"""authnotify: Alipay (AMS) and Alipay+ (APS) authorization notifications, from the webhook to the merchant.

One import root over the repository's folders (see ``docs/architecture.md``): ``authnotify.ingress``
(``ingress/``), ``authnotify.workers`` (``workers/``), the layers they share (``shared/``: ``config``,
``observability``, ``alipay``, ``domain``, ``messaging``, ``store``), and on top the command line
(``authnotify.cli``) and the developer tools (``authnotify.devtools``).
"""
