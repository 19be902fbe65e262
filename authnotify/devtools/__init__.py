"""Developer tools: ``authnotify dev`` (the whole pipeline in one process), ``authnotify simulate`` (plays
Alipay), the development keys, and the sandbox fakes of the outside world (Alipay's gateway, a merchant).

Layer 5: may import everything below it; nothing below imports it.
"""
