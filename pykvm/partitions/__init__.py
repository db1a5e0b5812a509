"""Several partitions on one host: the topology, and the broker that starts them and relays between them."""
