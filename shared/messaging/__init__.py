"""Messaging: the topology as data, the broker connection, the one confirmed publisher, the consumer runtime
that maps handler outcomes to AMQP, the dead-letter queues, and each process's health server and lifecycle.

Layer 3: imports the layers below (errors, config, observability, alipay, domain), never the store, the
services or the command line. No module outside this package builds an AMQP message or awaits a confirm.
"""
