"""fedmq.relay: a site aggregator, master of its devices and slave of an upstream job."""
