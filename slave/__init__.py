"""fedmq.slave."""
