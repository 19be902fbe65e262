"""The ``authnotify`` command line: the parser (:mod:`authnotify.cli.main`) and the operator commands.

Layer 6, the top: nothing imports it.
"""
