"""What the ingress and the workers share: configuration, keys, signatures, topology, store, logging."""
