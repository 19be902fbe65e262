"""authnotify: the command line and the operator tools (dlq, authorizations, dev, simulate)."""
